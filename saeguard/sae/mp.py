"""Matching-pursuit SAE (MP-SAE): latents are chosen greedily, one at a time, by projecting the
residual on the decoder atoms, so later atoms explain what earlier ones left (no encoder matrix).

The coefficient rule ``<r, w> / |w|^2`` works for atoms of any norm, so folding an input scale
into the decoder keeps encoding exact.
"""

from __future__ import annotations

import torch

from saeguard.sae.base import SparseAutoencoder, StepOutput, dense_step_stats, normalized_mse
from saeguard.sae.registry import register


@register("mp")
class MatchingPursuitSAE(SparseAutoencoder):
    """k greedy steps: ``j = argmax <r, w_j>/|w_j|``; ``f_j += <r, w_j>/|w_j|^2``; ``r -= ...``."""

    def pursue(self, x: torch.Tensor) -> torch.Tensor:
        residual = x - self.b_dec
        f = x.new_zeros(x.shape[0], self.cfg.d_sae)
        sq_norms = self.W_dec.pow(2).sum(-1).clamp_min(1e-12)
        norms = sq_norms.sqrt()
        rows = torch.arange(x.shape[0], device=x.device)
        for _ in range(self.cfg.k):
            proj = residual @ self.W_dec.t()
            j = (proj / norms).argmax(-1)
            coef = proj[rows, j] / sq_norms[j]
            f = f.index_put((rows, j), coef, accumulate=True)
            residual = residual - coef.unsqueeze(-1) * self.W_dec[j]
        return f

    def encode_flat(self, x: torch.Tensor) -> torch.Tensor:
        return self.pursue(x)

    def training_step(
        self, x: torch.Tensor, dead_mask: torch.Tensor | None, sparsity_scale: float
    ) -> StepOutput:
        f = self.pursue(x)
        x_hat = f @ self.W_dec + self.b_dec
        mse = normalized_mse(x, x_hat)
        fired, l0 = dense_step_stats(f)
        return StepOutput(mse, x_hat, fired, l0, {"mse": mse.detach()})

    @torch.no_grad()
    def after_step_(self) -> None:
        self.W_enc.copy_(self.W_dec.t())  # kept for SAELens-format tools that read W_enc

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        super().fold_input_scale_(scale)
        self.W_enc.copy_(self.W_dec.t())
