"""The browser's document: everything the feature browser shows of every latent, as plain data.

:func:`build_document` runs the pass (:mod:`saeguard.browse.collect`), the logit effects and the
decoder neighbours (:mod:`saeguard.browse.logits`) and returns one dict that
:mod:`saeguard.report.browser_site` renders into a static site (``summary``, one entry per
latent under ``latents``, the 'text -> latents' texts under ``texts``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from saeguard import __version__
from saeguard.activations.reader import ActivationReader
from saeguard.browse.collect import (
    ActivationLookup,
    CollectConfig,
    TokenDecoder,
    latent_contexts,
    latent_stats,
    read_held_out,
    round_value,
    text_pages,
)
from saeguard.browse.logits import decoder_neighbours, logit_effects
from saeguard.models.loading import LoadedModel
from saeguard.sae.base import SparseAutoencoder

FORMAT = "saeguard-browse"
FORMAT_VERSION = 1
LOGIT_TOP = 10
"""Promoted and suppressed tokens listed per latent."""
NEIGHBOURS = 5
"""Nearest latents (decoder cosine) listed per latent."""


@dataclass
class MonitorColumns:
    """What a fitted OOD monitor knows of each latent on in-distribution text."""

    rate: torch.Tensor
    """[d_sae] ID firing rate."""
    p999: torch.Tensor
    """[d_sae] p99.9 of |activation| where active on ID text (0 if never active)."""
    tau_rate: float
    """The monitor's rarity threshold: a latent rarer than this on ID text is 'rare on ID', so
    every firing of it counts as fallacious in the monitor's scores."""
    n_tokens: int
    """ID tokens the statistics were fitted on."""
    source: str
    """Where they come from (the monitor directory)."""


def build_document(
    reader: ActivationReader,
    sae: SparseAutoencoder,
    loaded: LoadedModel,
    texts: Sequence[str],
    cfg: CollectConfig,
    monitor: MonitorColumns | None = None,
    progress: bool = True,
    about: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Read ``texts`` (held-out, in order) up to ``cfg.tokens`` tokens and return the browser's
    document; ``about`` (SAE, model, corpus, ...) goes into its summary as given."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    collection = read_held_out(reader, sae, texts, cfg, progress)
    timings["read"] = collection.seconds

    clock = time.perf_counter()
    stats = latent_stats(collection, cfg.bins)
    lookup = ActivationLookup(collection)
    decode = TokenDecoder(loaded.tokenizer)
    first = 1 if reader.spec.start_id is not None else 0
    contexts = latent_contexts(collection, stats, lookup, decode, cfg, first)
    texts_shown = text_pages(collection, lookup, decode, cfg, first)
    timings["contexts"] = time.perf_counter() - clock

    clock = time.perf_counter()
    effects = logit_effects(sae.W_dec, loaded.model, len(loaded.tokenizer), LOGIT_TOP)
    timings["logit_effects"] = time.perf_counter() - clock
    clock = time.perf_counter()
    near_ids, near_cos = decoder_neighbours(sae.W_dec, NEIGHBOURS)
    timings["neighbours"] = time.perf_counter() - clock

    clock = time.perf_counter()
    n = collection.n_tokens
    count = stats.count.tolist()
    top_value, mean = stats.max.tolist(), stats.mean.tolist()
    hist = stats.hist.tolist()
    pos_ids, pos_values = effects.pos_ids.tolist(), effects.pos_values.tolist()
    neg_ids, neg_values = effects.neg_ids.tolist(), effects.neg_values.tolist()
    near_ids_l, near_cos_l = near_ids.tolist(), near_cos.tolist()
    id_rate = monitor.rate.tolist() if monitor else []
    id_p999 = monitor.p999.tolist() if monitor else []
    latents: list[dict[str, Any]] = []
    for i in range(collection.d_sae):
        rate = count[i] / n
        entry: dict[str, Any] = {
            "index": i,
            "count": count[i],
            "rate": rate,
            "max": round_value(top_value[i]),
            "mean": round_value(mean[i]),
            "dead": count[i] == 0,
            "dense": rate >= cfg.dense_rate,
            "hist": {"width": top_value[i] / cfg.bins, "counts": hist[i]},
            **contexts[i],
            "logits": {
                "pos": [
                    [decode(t), round_value(v)]
                    for t, v in zip(pos_ids[i], pos_values[i], strict=True)
                ],
                "neg": [
                    [decode(t), round_value(v)]
                    for t, v in zip(neg_ids[i], neg_values[i], strict=True)
                ],
            },  # fmt: skip
            "neighbours": [
                [j, round_value(c)] for j, c in zip(near_ids_l[i], near_cos_l[i], strict=True)
            ],  # fmt: skip
        }
        if monitor is not None:
            entry["id"] = {
                "rate": id_rate[i],
                "p999": round_value(id_p999[i]),
                "rare": id_rate[i] < monitor.tau_rate,
            }
        latents.append(entry)
    timings["assemble"] = time.perf_counter() - clock
    timings["total"] = time.perf_counter() - started
    dead = sum(1 for c in count if c == 0)
    dense = sum(1 for c in count if c / n >= cfg.dense_rate)
    summary: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "saeguard_version": __version__,
        **(about or {}),
        "d_sae": collection.d_sae,
        "tokens_read": n,
        "texts_read": collection.n_texts,
        "active_entries": len(collection.value),
        "dead": dead,
        "dense": dense,
        "dense_rate": cfg.dense_rate,
        "settings": asdict(cfg),
        "logit_effects": effects.how,
        "histogram": f"|activation| where active, {cfg.bins} linear bins from 0 to the "
        "latent's own max",
        "quantile_bands": f"{cfg.quantile_buckets} equal bands of each latent's firings ranked "
        f"by |activation|, {cfg.per_bucket} samples at evenly spaced ranks in each",
        "monitor": None
        if monitor is None
        else {
            "source": monitor.source,
            "tau_rate": monitor.tau_rate,
            "id_tokens": monitor.n_tokens,
        },  # fmt: skip
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    return {"summary": summary, "latents": latents, "texts": texts_shown}
