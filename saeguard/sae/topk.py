"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations (through a ReLU), plus AuxK.

Training runs on the sparse kernels: the decode and every gradient touch only the k kept latents.
"""

from __future__ import annotations

from typing import Any

import torch

from saeguard.sae.base import (
    SparseAutoencoder,
    StepOutput,
    aux_latents,
    auxk_loss,
    normalized_mse,
    sparse_step_stats,
)
from saeguard.sae.kernels import (
    scatter_dense,
    sparse_decode,
    sparse_topk_encode,
    sparse_topk_encode_aux,
)
from saeguard.sae.registry import register


@register("topk", k_bounds_l0=True)
class TopKSAE(SparseAutoencoder):
    """``f = TopK_k(ReLU(W_enc (x - b_dec) + b_enc))``; loss normalised MSE + AuxK."""

    signed = False
    """Keep the largest |pre-activation| with its sign instead (AbsTopK)."""

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [N, k], indices [N, k]) of a flat batch."""
        return sparse_topk_encode(x, self.b_dec, self.W_enc, self.b_enc, self.cfg.k, self.signed)

    def encode_flat(self, x: torch.Tensor) -> torch.Tensor:
        values, indices = self.encode_sparse(x)
        return scatter_dense(values, indices, self.cfg.d_sae)

    def sparse_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The k kept latents of each token (0 where fewer than k pre-activations are positive);
        L0 counts the positive pre-activations before the top-k cut, since after it every token
        has exactly k. AbsTopK keeps the dense default."""
        if self.signed:
            return super().sparse_codes(x)
        pre = self.pre_acts(x)
        l0 = (pre > 0).sum(-1)
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return values.clamp_min(0), indices, l0

    def saelens_activation(self) -> tuple[str, dict[str, Any]]:
        return ("abstopk" if self.signed else "topk"), {"k": self.cfg.k}

    def training_step(
        self, x: torch.Tensor, dead_mask: torch.Tensor | None, sparsity_scale: float
    ) -> StepOutput:
        dead, k_aux = aux_latents(self, dead_mask)
        values, indices, aux_values, aux_indices = sparse_topk_encode_aux(
            x, self.b_dec, self.W_enc, self.b_enc, self.cfg.k, self.signed, dead, k_aux
        )
        x_hat = sparse_decode(values, indices, self.W_dec, self.b_dec)
        mse = normalized_mse(x, x_hat)
        aux = auxk_loss(self, x, x_hat, dead, aux_values, aux_indices)
        fired, l0 = sparse_step_stats(values, indices, self.cfg.d_sae)
        return StepOutput(mse + aux, x_hat, fired, l0, {"mse": mse.detach(), "auxk": aux.detach()})
