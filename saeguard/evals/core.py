"""Core reconstruction metrics (SPEC §4) over packed contexts of the evaluation split.

- ``fvu`` = Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over the whole set (not a mean of per-batch FVUs);
  ``explained_variance`` = 1 − fvu.
- ``mse`` = Σ‖x − x̂‖² / (N·d); ``cosine`` = mean cos(x, x̂); ``l2_ratio`` = mean ‖x̂‖/‖x‖.
- ``l0`` = mean number of latents with f_i ≠ 0 per token.
- ``dead_frac``: latents never active over the whole evaluation set; ``dense_frac``: active on
  more than 10% of its tokens. The latent-frequency histogram is kept for the report.

Intervals: contexts are the bootstrap unit (tokens within a context are not independent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from saeguard.activations.subject import EvalSubject
from saeguard.evals.results import MetricResult, sampled_metric
from saeguard.models.hooks import run_to_hooks

VERSION = 1


@dataclass(kw_only=True)
class CoreConfig:
    """Settings of the core reconstruction metrics."""

    contexts: int = 256
    """Packed contexts of the evaluation split to read (each ctx_len tokens)."""
    batch_size: int = 16
    """Contexts per forward pass."""
    dense_threshold: float = 0.1
    """A latent active on more than this fraction of tokens counts as dense."""


@dataclass
class CoreSums:
    """Per-context sums from which every core metric follows."""

    err: list[float]
    var: list[float]
    cos: list[float]
    l2_ratio: list[float]
    l0: list[float]
    tokens: list[float]
    fire_counts: torch.Tensor
    abs_sums: torch.Tensor
    abs_per_context: list[torch.Tensor]


def accumulate(
    encode_decode: Any,
    contexts: list[torch.Tensor],
    mean: torch.Tensor,
    d_sae: int,
    device: torch.device | str = "cpu",
) -> CoreSums:
    """Sums per context; ``contexts`` are kept activations [n_c, d] and ``encode_decode`` maps
    x to (f, x_hat). ``mean`` is the mean activation of the whole set. The arithmetic runs on
    ``device`` (the SAE's); the sums come back on the CPU."""
    zeros = torch.zeros(d_sae, device=device), torch.zeros(d_sae, device=device)
    sums = CoreSums([], [], [], [], [], [], *zeros, [])
    mean = mean.to(device)
    for x in contexts:
        x = x.to(device)
        f, x_hat = encode_decode(x)
        active = f != 0
        sums.err.append(float((x - x_hat).pow(2).sum()))
        sums.var.append(float((x - mean).pow(2).sum()))
        cos = torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-12)
        sums.cos.append(float(cos.sum()))
        sums.l2_ratio.append(float((x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum()))
        sums.l0.append(float(active.sum()))
        sums.tokens.append(float(len(x)))
        sums.fire_counts += active.sum(0).float()
        absolute = f.abs().sum(0).float()
        sums.abs_sums += absolute
        sums.abs_per_context.append(absolute.cpu())
    sums.fire_counts, sums.abs_sums = sums.fire_counts.cpu(), sums.abs_sums.cpu()
    return sums


def metrics_from_sums(
    sums: CoreSums, d_in: int, dense_threshold: float = 0.1
) -> tuple[list[MetricResult], dict[str, Any]]:
    """The core metrics (with intervals) and the latent-frequency details for the report."""
    tokens = np.asarray(sums.tokens)
    out = [
        sampled_metric("fvu", VERSION, {"num": sums.err, "den": sums.var}, "ratio", "context"),
        sampled_metric(
            "explained_variance",
            VERSION,
            {"num": sums.err, "den": sums.var},
            "one_minus_ratio",
            "context",
        ),
        sampled_metric(
            "mse", VERSION, {"num": sums.err, "den": (tokens * d_in).tolist()}, "ratio", "context"
        ),
        sampled_metric(
            "cosine", VERSION, {"num": sums.cos, "den": sums.tokens}, "ratio", "context"
        ),
        sampled_metric(
            "l2_ratio", VERSION, {"num": sums.l2_ratio, "den": sums.tokens}, "ratio", "context"
        ),
        sampled_metric("l0", VERSION, {"num": sums.l0, "den": sums.tokens}, "ratio", "context"),
    ]
    total = max(float(tokens.sum()), 1.0)
    freq = (sums.fire_counts / total).numpy()
    out.append(
        MetricResult("dead_frac", VERSION, float((freq == 0).mean()), n=int(total), unit="token")
    )
    out.append(
        MetricResult(
            "dense_frac",
            VERSION,
            float((freq > dense_threshold).mean()),
            n=int(total),
            unit="token",
        )
    )
    alive = freq[freq > 0]
    edges = np.linspace(-7, 0, 36)
    hist, _ = np.histogram(np.log10(alive), bins=edges) if len(alive) else (np.zeros(35), edges)
    details = {
        "latent_frequency_log10_histogram": {"edges": edges.tolist(), "counts": hist.tolist()},
        "eval_tokens": int(total),
        "never_active": int((freq == 0).sum()),
    }
    return out, details


@torch.no_grad()
def kept_context_activations(
    subject: EvalSubject, n_contexts: int, batch_size: int
) -> list[torch.Tensor]:
    """Kept activations [n_c, d] of the first ``n_contexts`` packed contexts of the eval split."""
    key = ("core_contexts", n_contexts)
    if key in subject.memo:
        return list(subject.memo[key])
    point = subject.loaded.hook_point(subject.hook)
    contexts = [c for _, c in zip(range(n_contexts), subject.source.contexts(), strict=False)]
    out: list[torch.Tensor] = []
    for start in tqdm(range(0, len(contexts), batch_size), desc="core: activations", unit="batch"):
        tokens = torch.tensor(contexts[start : start + batch_size], dtype=torch.long)
        with torch.inference_mode():
            acts = run_to_hooks(subject.loaded.model, tokens.to(subject.loaded.device), [point])
        acts_h = acts[subject.hook].float().cpu()
        keep = subject.source.rules.keep_mask(tokens, acts_h, subject.hook)
        out.extend(acts_h[i][keep[i]] for i in range(len(tokens)))
    subject.memo[key] = out
    return out


def run_core(
    subject: EvalSubject, cfg: CoreConfig
) -> tuple[list[MetricResult], dict[str, Any], list[torch.Tensor]]:
    """Core metrics; also returns the per-context |f| sums that effective features reuse."""
    contexts = kept_context_activations(subject, cfg.contexts, cfg.batch_size)
    if not contexts or sum(len(c) for c in contexts) == 0:
        from saeguard.errors import CorpusError

        raise CorpusError("the evaluation split gave no kept activations; use a larger corpus")
    mean = torch.cat(contexts).mean(0)
    sae = subject.sae

    def encode_decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            f = sae.encode(x)
            return f, sae.decode(f)

    sums = accumulate(encode_decode, contexts, mean, sae.cfg.d_sae, subject.device)
    results, details = metrics_from_sums(sums, sae.cfg.d_in, cfg.dense_threshold)
    return results, details, sums.abs_per_context
