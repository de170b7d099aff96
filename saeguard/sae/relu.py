"""ReLU SAE with an L1 penalty weighted by decoder norms (Anthropic, April 2024 update)."""

from __future__ import annotations

import torch

from saeguard.sae.base import (
    SparseAutoencoder,
    StepOutput,
    dense_step_stats,
    mse_sum,
    token_mean,
)
from saeguard.sae.registry import register


@register("relu", saelens_name="standard")
class ReLUSAE(SparseAutoencoder):
    """``f = ReLU(W_enc (x - b_dec) + b_enc)``; loss ``|x - x_hat|^2 + lambda sum f_i |W_dec,i|``.

    Decoder norms are left free (the penalty uses them), as in the SPEC.
    """

    unit_norm_decoder = False

    def encode_flat(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_acts(x))

    def training_step(
        self, x: torch.Tensor, dead_mask: torch.Tensor | None, sparsity_scale: float
    ) -> StepOutput:
        f = self.encode_flat(x)
        x_hat = f @ self.W_dec + self.b_dec
        mse = mse_sum(x, x_hat)
        l1 = token_mean((f * self.W_dec.norm(dim=-1)).sum(-1))
        coef = self.cfg.sparsity_coef(5.0) * sparsity_scale
        fired, l0 = dense_step_stats(f)
        return StepOutput(
            mse + coef * l1,
            x_hat,
            fired,
            l0,
            {"mse": mse.detach(), "l1": l1.detach()},
        )
