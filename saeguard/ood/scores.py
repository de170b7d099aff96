"""OOD scores of SPEC section 5, computed from a text's activations and the fitted ID statistics.

Every score is "higher = more out-of-distribution". Per text, over its kept tokens:

- ``fallacious_count``: mean per token of the number of fallacious latents active there. A latent
  is fallacious at a token when it is active and either rare in-distribution (firing rate
  ``r_i < tau_rate``; never-seen latents count as rare) or above its ID p99.9 activation by more
  than ``range_margin`` (``|f_i| > p99.9_i * (1 + margin)``);
- ``fallacious_mass``: the fallacious latents' share of the total latent activation
  ``sum |f|`` over the text's tokens;
- ``recon_error``: mean per-token ``||x - x_hat||^2 / ||x||^2``, divided by its ID mean (1 is
  typical in-distribution);
- ``l0_shift``: ``|mean L0 - mu_L0| / sigma_L0`` against ID tokens. For TopK SAEs every token has
  exactly k active latents, so L0 is read before the top-k cut (positive pre-activations);
- ``energy``: the mean of the four scores above, each z-scored against its per-text distribution
  on reference ID texts that the statistics were not fitted on (components constant on ID are
  left out);
- ``fallacious_surprisal``: each fallacious firing weighted by its ID rarity
  ``-log max(r_i, r_floor)`` (never-seen latents at the floor) times how far it exceeds its ID
  range ``max(1, |f_i| / p99.9_i)`` (1 when the latent has no ID range), summed per token and
  averaged over the text's tokens; ``fallacious_surprisal_top``: the mean of its top ``top_q``
  share of tokens (at least one), for texts that leave the distribution in one place;
- ``fused`` (:mod:`saeguard.ood.fusion`): the per-text scores turned into ID p-values and
  combined.

Baselines on the same inputs: ``mahalanobis`` (squared distance of the mean-pooled raw activation
under a Ledoit-Wolf covariance of pooled ID texts), ``knn`` (distance of the L2-normalised pooled
activation to its k-th nearest pooled ID text), and from the LM's own predictions ``msp``
(1 - mean max-softmax probability), ``entropy`` (mean predictive entropy) and ``perplexity``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from saeguard.sae.base import SparseAutoencoder
from saeguard.sae.kernels import sparse_decode

SAE_SCORES: tuple[str, ...] = (
    "fallacious_count",
    "fallacious_mass",
    "fallacious_surprisal",
    "fallacious_surprisal_top",
    "recon_error",
    "l0_shift",
    "energy",
)
ENERGY_COMPONENTS: tuple[str, ...] = (
    "fallacious_count",
    "fallacious_mass",
    "recon_error",
    "l0_shift",
)
ACTIVATION_BASELINES: tuple[str, ...] = ("mahalanobis", "knn")
LM_BASELINES: tuple[str, ...] = ("msp", "entropy", "perplexity")
BASELINES: tuple[str, ...] = ACTIVATION_BASELINES + LM_BASELINES
FUSED = "fused"
"""The default flag score: every other per-text score as an ID p-value, combined."""
SINGLE_SCORES: tuple[str, ...] = SAE_SCORES + BASELINES
ALL_SCORES: tuple[str, ...] = (FUSED,) + SINGLE_SCORES
SCORE_VERSIONS: dict[str, int] = {name: 1 for name in ALL_SCORES}
"""Version of each score's definition: a score whose definition changes gets a new version (or
a new name), so that numbers recorded with an older saeguard stay reproducible by name."""
TOKEN_SCORES: tuple[str, ...] = ("recon_error", "fallacious_surprisal", "lm_surprisal")
"""Per-token scores (``ood score --tokens``): relative reconstruction error over its ID mean,
summed fallacious surprisal of the token's latents, and the LM's surprisal of the token
(``-log p``, nats; needs the full forward)."""


@dataclass
class SparseCodes:
    """Active latents of a batch of tokens in sparse form."""

    values: torch.Tensor
    """[n, m] latent values (0 marks padding when tokens have fewer than m active latents)."""
    indices: torch.Tensor
    """[n, m] latent indices."""
    l0: torch.Tensor
    """[n] L0 per token (for TopK: positive pre-activations before the cut)."""


@torch.no_grad()
def sparse_codes(sae: SparseAutoencoder, x: torch.Tensor) -> SparseCodes:
    """Latents of activations [n, d_in] without materialising more than the SAE must (see
    :meth:`SparseAutoencoder.sparse_codes`)."""
    return SparseCodes(*sae.sparse_codes(x))


@torch.no_grad()
def reconstruct(sae: SparseAutoencoder, codes: SparseCodes) -> torch.Tensor:
    """``x_hat`` from sparse codes (an embedding-bag decode: k rows per token, not d_sae)."""
    return sparse_decode(codes.values, codes.indices, sae.W_dec, sae.b_dec)


def fallacious_mask(
    codes: SparseCodes,
    rate: torch.Tensor,
    p999: torch.Tensor,
    tau_rate: float,
    range_margin: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fallacious, rare, out_of_range) boolean masks [n, m] over the active latents; a latent
    counts as out of range only when it is not rare."""
    active = codes.values != 0
    rare = active & (rate[codes.indices] < tau_rate)
    # A rare latent's p99.9 rests on a handful of firings (0 when never seen): "rare" says it all.
    beyond = codes.values.abs() > p999[codes.indices] * (1.0 + range_margin)
    out_of_range = active & ~rare & beyond
    return rare | out_of_range, rare, out_of_range


def surprisal_weights(
    codes: SparseCodes,
    fallacious: torch.Tensor,
    rate: torch.Tensor,
    p999: torch.Tensor,
    rate_floor: float,
) -> torch.Tensor:
    """[n, m] weight of each active latent: 0 unless fallacious, else its ID surprisal
    ``-log max(r_i, r_floor)`` times its range excess ``max(1, |f_i| / p99.9_i)`` (1 when the
    latent has no ID range: never seen, or p99.9 of 0)."""
    surprisal = -torch.log(rate.double().clamp_min(rate_floor))[codes.indices]
    bound = p999[codes.indices].double()
    magnitude = codes.values.abs().double()
    ratio = torch.where(bound > 0, magnitude / bound.clamp_min(1e-30), torch.ones_like(bound))
    return torch.where(fallacious, surprisal * ratio.clamp_min(1.0), torch.zeros_like(bound))


def top_share_mean(values: torch.Tensor, fraction: float) -> float:
    """Mean of the largest ``ceil(fraction * n)`` values (at least one; 0 for none)."""
    n = len(values)
    if n == 0:
        return 0.0
    take = max(1, math.ceil(fraction * n))
    return float(values.double().topk(take).values.mean())


def relative_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-token ``||x - x_hat||^2 / ||x||^2``."""
    return (x - x_hat).pow(2).sum(-1) / x.pow(2).sum(-1).clamp_min(1e-12)


def segment_mean(values: torch.Tensor, segments: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of ``values`` [rows] within each of ``n`` segments (rows labelled 0..n-1)."""
    sums = torch.zeros(n, dtype=torch.float64, device=values.device).index_add_(
        0, segments, values.double()
    )
    counts = torch.bincount(segments, minlength=n).clamp_min(1)
    return sums / counts


def mahalanobis(pooled: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each row of ``pooled`` [n, d]."""
    centred = pooled - mean
    return np.einsum("nd,de,ne->n", centred, precision, centred)


def knn_distance(pooled: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """Distance of each L2-normalised row to its k-th nearest row of ``bank`` (normalised)."""
    from sklearn.neighbors import NearestNeighbors

    unit = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    k = min(k, len(bank))
    distances, _ = NearestNeighbors(n_neighbors=k).fit(bank).kneighbors(unit)
    return np.asarray(distances[:, -1])


def energy(components: dict[str, float], reference: dict[str, tuple[float, float]]) -> float:
    """Mean z-score of the energy components against their ID reference (mean, std)."""
    zs = [
        (components[name] - mean) / std
        for name, (mean, std) in reference.items()
        if name in components and std > 1e-12
    ]
    return float(np.mean(zs)) if zs else 0.0
