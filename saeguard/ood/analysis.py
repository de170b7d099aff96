"""Score a batch of texts against fitted ID statistics (the arithmetic of SPEC section 5).

Kept separate from the monitor so that each score can be checked on hand-built statistics and
activations, with no model in the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from saeguard.ood.scores import (
    SparseCodes,
    energy,
    fallacious_mask,
    knn_distance,
    mahalanobis,
    reconstruct,
    relative_error,
    segment_mean,
    sparse_codes,
    surprisal_weights,
    top_share_mean,
)
from saeguard.ood.stats import IDStats
from saeguard.sae.base import SparseAutoencoder


@dataclass
class TextAnalysis:
    """Scores of one text plus what its explanation needs (codes and fallacious masks)."""

    scores: dict[str, float]
    codes: SparseCodes
    fallacious: torch.Tensor
    """[n, m] active latents that are fallacious."""
    rare: torch.Tensor
    """[n, m] active latents that are rare in-distribution."""
    out_of_range: torch.Tensor
    """[n, m] active latents above their ID p99.9 by the margin."""
    weights: torch.Tensor
    """[n, m] surprisal weight of each active latent (0 unless fallacious)."""
    token_scores: dict[str, torch.Tensor]
    """Per-token scores [n] (``TOKEN_SCORES``; ``lm_surprisal`` once the LM ran)."""
    p_values: dict[str, float] = field(default_factory=dict)
    """The fused score's components as ID p-values, once the fused score is computed."""


@torch.no_grad()
def analyse(
    sae: SparseAutoencoder,
    acts: Sequence[torch.Tensor],
    stats: IDStats,
    tau_rate: float,
    range_margin: float,
    knn_k: int,
    reference: dict[str, tuple[float, float]],
    top_q: float = 0.1,
) -> list[TextAnalysis]:
    """Every SAE score and activation baseline of each text (``acts``: [n_i, d] per text).

    The SAE scores are computed on the SAE's device (``stats`` should have their per-latent
    tensors there: :meth:`IDStats.to`); the baselines in numpy; what is returned (scores, and
    the codes and masks explanations read) is on the CPU."""
    if not acts:
        return []
    device = sae.W_dec.device
    stats = stats.to(device)  # itself when the monitor already keeps them there
    x = torch.cat(list(acts)).float().to(device)
    segments = torch.cat([torch.full((len(a),), i, dtype=torch.long) for i, a in enumerate(acts)])
    segments = segments.to(device)
    n = len(acts)
    codes = sparse_codes(sae, x)
    err = relative_error(x, reconstruct(sae, codes))
    fall, rare, oor = fallacious_mask(codes, stats.rate.float(), stats.p999, tau_rate, range_margin)
    weights = surprisal_weights(codes, fall, stats.rate, stats.p999, stats.rate_floor)
    token_surprisal = weights.sum(-1)
    mag = codes.values.abs().float()
    count = segment_mean(fall.sum(-1).float(), segments, n)
    surprisal = segment_mean(token_surprisal, segments, n)
    token_recon = err.double() / max(stats.recon_mean, 1e-12)
    fall_mass = torch.zeros(n, dtype=torch.float64, device=device).index_add_(
        0, segments, (mag * fall).sum(-1).double()
    )
    total_mass = torch.zeros(n, dtype=torch.float64, device=device).index_add_(
        0, segments, mag.sum(-1).double()
    )
    recon = segment_mean(err, segments, n) / max(stats.recon_mean, 1e-12)
    l0 = segment_mean(codes.l0.float(), segments, n)
    if stats.l0_std > 1e-12:
        l0_shift = (l0 - stats.l0_mean).abs() / stats.l0_std
    else:
        l0_shift = torch.zeros(n, dtype=torch.float64)
    # One transfer each back to the CPU (no-ops there), instead of one per text and score.
    count, fall_mass, total_mass, recon, l0_shift, surprisal = (
        t.cpu() for t in (count, fall_mass, total_mass, recon, l0_shift, surprisal)
    )
    codes = SparseCodes(codes.values.cpu(), codes.indices.cpu(), codes.l0.cpu())
    fall, rare, oor, weights = fall.cpu(), rare.cpu(), oor.cpu(), weights.cpu()
    token_surprisal, token_recon = token_surprisal.cpu(), token_recon.cpu()
    pooled = torch.stack([a.float().mean(0) for a in acts]).cpu().numpy().astype(np.float64)
    maha = mahalanobis(
        pooled,
        stats.pooled_mean.cpu().numpy().astype(np.float64),
        stats.pooled_precision.cpu().numpy().astype(np.float64),
    )
    knn = knn_distance(pooled, stats.knn_bank.cpu().numpy().astype(np.float64), knn_k)
    out = []
    start = 0
    for i, a in enumerate(acts):
        stop = start + len(a)
        scores = {
            "fallacious_count": float(count[i]),
            "fallacious_mass": float(fall_mass[i] / max(float(total_mass[i]), 1e-12)),
            "fallacious_surprisal": float(surprisal[i]),
            "fallacious_surprisal_top": top_share_mean(token_surprisal[start:stop], top_q),
            "recon_error": float(recon[i]),
            "l0_shift": float(l0_shift[i]),
        }
        scores["energy"] = energy(scores, reference) if reference else 0.0
        scores["mahalanobis"] = float(maha[i])
        scores["knn"] = float(knn[i])
        sliced = SparseCodes(
            codes.values[start:stop], codes.indices[start:stop], codes.l0[start:stop]
        )
        tokens = {
            "recon_error": token_recon[start:stop],
            "fallacious_surprisal": token_surprisal[start:stop],
        }
        out.append(
            TextAnalysis(
                scores,
                sliced,
                fall[start:stop],
                rare[start:stop],
                oor[start:stop],
                weights[start:stop],
                tokens,
            )
        )
        start = stop
    return out
