"""What the monitor says about a text: its scores and flag, and for an alarm the latents that
raised it, each shown where it fired in the input and in its top in-distribution contexts."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from saeguard.activations.reader import TextActivations
from saeguard.ood.analysis import TextAnalysis
from saeguard.ood.stats import IDStats


@dataclass
class LatentExplanation:
    """Why one latent made a text look out-of-distribution."""

    latent: int
    reason: str
    """"rare" (almost never active on ID text), "out of range" (far above its ID p99.9) or both."""
    id_rate: float
    id_firings: int
    id_p999: float
    max_activation: float
    total_activation: float
    tokens_fired: int
    input_contexts: list[dict[str, Any]]
    """Where it fired in the input: {left, token, right, value}."""
    id_contexts: list[dict[str, Any]]
    """Its top-activating in-distribution contexts: {left, token, right, value}."""
    surprisal: float = 0.0
    """Its summed surprisal weight over the text (what ranks the latents of an explanation)."""
    id_range: list[float] = field(default_factory=list)
    """Its |activation| p50, p99 and p99.9 on ID tokens where it is active (0s: never seen)."""
    token_positions: list[int] = field(default_factory=list)
    """Every token (index into the text's scored tokens, as ``tokens`` lists them) where it
    fired as fallacious."""


@dataclass
class TextScore:
    """The monitor's verdict on one text."""

    index: int
    scores: dict[str, float] = field(default_factory=dict)
    flagged: bool | None = None
    """None when the monitor is uncalibrated or the text could not be scored."""
    n_tokens: int = 0
    n_windows: int = 0
    truncated: bool = False
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    explanation: list[LatentExplanation] = field(default_factory=list)
    p_values: dict[str, float] = field(default_factory=dict)
    """The fused score's components as ID p-values (small: unusual for ID text)."""
    tokens: list[dict[str, Any]] = field(default_factory=list)
    """Per-token scores when asked for (``ood score --tokens``): {token, window, position,
    recon_error, fallacious_surprisal, lm_surprisal, latents}."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for optional in ("explanation", "p_values", "tokens"):
            if not out[optional]:
                out.pop(optional)
        return out


@dataclass(frozen=True)
class Snippets:
    """Shows a token of a window in its context: {left, token, right, value}."""

    decode: Callable[[list[int]], str]
    """The model's tokenizer's decode."""
    start: int
    """First position shown as left context: 1 when windows open with a start token, else 0."""

    def __call__(self, window: list[int], position: int, value: float) -> dict[str, Any]:
        return {
            "left": self.decode(window[max(self.start, position - 12) : position]),
            "token": self.decode(window[position : position + 1]),
            "right": self.decode(window[position + 1 : position + 5]),
            "value": round(value, 4),
        }


def explain_text(
    item: TextActivations,
    analysis: TextAnalysis,
    stats: IDStats,
    d_sae: int,
    n_latents: int,
    snippet: Snippets,
) -> list[LatentExplanation]:
    """The text's top ``n_latents`` fallacious latents (by summed surprisal weight: rarer and
    further out of range first, then by how often they fired) with ID and input contexts."""
    rows, cols = analysis.fallacious.nonzero(as_tuple=True)
    if len(rows) == 0:
        return []
    latents = analysis.codes.indices[rows, cols]
    mags = analysis.codes.values[rows, cols].abs().float()
    weights = analysis.weights[rows, cols].double()
    totals = torch.zeros(d_sae, dtype=torch.float64).index_add_(0, latents, weights)
    top = totals.topk(min(n_latents, int((totals > 0).sum()))).indices
    out = []
    for latent in top.tolist():
        hit = latents == latent
        hit_rows, hit_cols = rows[hit], cols[hit]
        values = mags[hit]
        reasons = []
        if bool(analysis.rare[hit_rows, hit_cols].any()):
            reasons.append("rare")
        if bool(analysis.out_of_range[hit_rows, hit_cols].any()):
            reasons.append("out of range")
        order = values.argsort(descending=True)[:3]
        input_contexts = [
            snippet(
                item.windows[int(item.window[hit_rows[j]])],
                int(item.position[hit_rows[j]]),
                float(values[j]),
            )
            for j in order.tolist()
        ]
        out.append(
            LatentExplanation(
                latent=latent,
                reason=" and ".join(reasons),
                id_rate=float(stats.rate[latent]),
                id_firings=int(stats.firing_count[latent]),
                id_p999=float(stats.p999[latent]),
                max_activation=float(values.max()),
                total_activation=float(values.sum()),
                tokens_fired=len(values),
                input_contexts=input_contexts,
                id_contexts=top_id_contexts(stats, latent, snippet),
                surprisal=round(float(totals[latent]), 4),
                id_range=[round(float(q), 4) for q in stats.quantiles[:, latent]],
                token_positions=sorted(set(hit_rows.tolist())),
            )
        )
    return out


def top_id_contexts(stats: IDStats, latent: int, snippet: Snippets) -> list[dict[str, Any]]:
    """Top-activating in-distribution contexts of a latent (empty if it never fired)."""
    out = []
    for rank in range(stats.top_values.shape[0]):
        value = float(stats.top_values[rank, latent])
        if value <= 0:
            break
        row = stats.context_tokens[int(stats.top_window[rank, latent])].tolist()
        window = [int(t) for t in row if t >= 0]
        out.append(snippet(window, int(stats.top_position[rank, latent]), value))
    return out


def token_rows(
    item: TextActivations,
    analysis: TextAnalysis,
    decode: Callable[[list[int]], str],
    n_latents: int = 3,
) -> list[dict[str, Any]]:
    """One row per scored token, in text order: the token's text, where it sits, its
    per-token scores and its most surprising fallacious latents ({latent, weight, value})."""
    rows = []
    weights = analysis.weights
    for t in range(len(item.tokens)):
        row: dict[str, Any] = {
            "token": decode([int(item.tokens[t])]),
            "window": int(item.window[t]),
            "position": int(item.position[t]),
        }
        for name, values in analysis.token_scores.items():
            value = float(values[t])
            row[name] = None if math.isnan(value) else round(value, 5)
        fired = (weights[t] > 0).nonzero().squeeze(1)
        order = weights[t, fired].argsort(descending=True)[:n_latents]
        row["latents"] = [
            {
                "latent": int(analysis.codes.indices[t, fired[j]]),
                "weight": round(float(weights[t, fired[j]]), 4),
                "value": round(float(analysis.codes.values[t, fired[j]].abs()), 4),
            }
            for j in order.tolist()
        ]
        rows.append(row)
    return rows
