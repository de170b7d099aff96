"""Fitting a monitor's ID statistics: the SAE's codes on ID text, streamed into a
:class:`~saeguard.ood.stats.StatsAccumulator`, with a share of the texts held back."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from saeguard.activations.reader import ActivationReader, ReadFailure, TextActivations
from saeguard.ood.config import MonitorConfig
from saeguard.ood.scores import reconstruct, relative_error, sparse_codes
from saeguard.ood.stats import IDStats, StatsAccumulator
from saeguard.sae.base import SparseAutoencoder


def fit_stats(
    reader: ActivationReader,
    sae: SparseAutoencoder,
    cfg: MonitorConfig,
    texts: Sequence[str],
    progress: bool,
    reference_with_lm: bool = False,
) -> tuple[IDStats, list[TextActivations]]:
    """ID statistics from most texts; the rest (``reference_fraction``) come back unscored, to
    measure every score's ID distribution on text the statistics never saw (read with the LM's
    logits when ``reference_with_lm``)."""
    rng = random.Random(f"{cfg.seed}:reference")
    n_ref = max(2, round(cfg.reference_fraction * len(texts)))
    reference_idx = sorted(rng.sample(range(len(texts)), n_ref))
    held_back = set(reference_idx)
    fit_texts = [t for i, t in enumerate(texts) if i not in held_back]
    acc = StatsAccumulator(sae.cfg.d_sae, cfg.id_contexts, device=sae.W_dec.device)
    reference = [
        item
        for _, item in reader.read(
            [texts[i] for i in reference_idx],
            with_lm=reference_with_lm,
            max_windows=cfg.max_windows,
            progress="read reference ID texts" if progress else None,
        )
        if not isinstance(item, ReadFailure)
    ]
    pending: list[tuple[TextActivations, int]] = []
    rows = 0
    for _, item in reader.read(
        fit_texts,
        max_windows=cfg.max_windows,
        progress="fit ID statistics" if progress else None,
    ):
        if isinstance(item, ReadFailure):
            continue
        pending.append((item, acc.add_windows(item.windows)))
        rows += len(item.acts)
        if rows >= 2048:
            _accumulate(sae, acc, pending)
            pending, rows = [], 0
    if pending:
        _accumulate(sae, acc, pending)
    return acc.finish(reader.spec.ctx_len), reference


def _accumulate(
    sae: SparseAutoencoder, acc: StatsAccumulator, items: list[tuple[TextActivations, int]]
) -> None:
    device = sae.W_dec.device  # the codes and the per-latent sums live with the SAE
    x = torch.cat([it.acts for it, _ in items]).to(device)
    codes = sparse_codes(sae, x)
    err = relative_error(x, reconstruct(sae, codes))
    window = torch.cat([it.window + first for it, first in items]).to(device)
    position = torch.cat([it.position for it, _ in items]).to(device)
    pooled = torch.stack([it.acts.mean(0) for it, _ in items])
    acc.add(codes, err, window, position, pooled)
