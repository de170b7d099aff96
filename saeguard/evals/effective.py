"""Effective features (superposition, SPEC §4).

p_i = E|f_i| / Σ_j E|f_j| over evaluation tokens; F = exp(−Σ_i p_i ln p_i), the exponential of
the entropy of the mean-activation distribution. F equals the number of latents when every
latent has the same mean |activation|, and 1 when a single latent carries everything.
Also reported: F / d (d = the SAE's input width), how many "features per dimension" it uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from saeguard.evals.results import MetricResult, bootstrap_ci

VERSION = 1


def effective_count(mean_abs: torch.Tensor | np.ndarray) -> float:
    """exp(entropy) of the normalised mean |activation| vector."""
    p = np.asarray(mean_abs, dtype=np.float64)
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p[p > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def run_effective(
    abs_per_context: Sequence[torch.Tensor], d_in: int, seed: int = 0
) -> list[MetricResult]:
    """F and F/d with bootstrap intervals over contexts (from per-context Σ|f| vectors)."""
    per_context = torch.stack(list(abs_per_context)).double().numpy()
    value = effective_count(per_context.sum(0))
    ci = bootstrap_ci(
        {"rows": np.arange(len(per_context))},
        lambda s: effective_count(per_context[s["rows"].astype(int)].sum(0)),
        resamples=200,
        seed=seed,
    )
    n = len(per_context)
    return [
        MetricResult("effective_features", VERSION, value, ci, n, "context"),
        MetricResult(
            "effective_features_per_dim",
            VERSION,
            value / d_in,
            (ci[0] / d_in, ci[1] / d_in),
            n,
            "context",
        ),
    ]
