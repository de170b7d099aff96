"""Matryoshka SAE (Bussmann et al. 2025; Nabeshima 2024): BatchTopK whose dictionary prefixes must
each reconstruct the input on their own, so early latents learn general features and later ones
specialise instead of absorbing them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from saeguard.errors import ConfigError
from saeguard.sae.base import StepOutput, aux_latents, auxk_loss, normalized_mse
from saeguard.sae.batchtopk import BatchTopKConfig, BatchTopKSAE, csr_step_stats
from saeguard.sae.kernels import sparse_decode_csr
from saeguard.sae.registry import register


@dataclass(kw_only=True)
class MatryoshkaConfig(BatchTopKConfig):
    """Matryoshka's settings beside BatchTopK's."""

    matryoshka_prefixes: list[int] = field(default_factory=list)
    """Matryoshka prefix sizes (empty: d_sae/16, d_sae/4, d_sae)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for size in self.matryoshka_prefixes:
            if not 0 < size <= self.d_sae:
                raise ConfigError(f"matryoshka prefix {size} must lie in 1..d_sae ({self.d_sae})")

    def prefixes(self) -> list[int]:
        """Sorted Matryoshka prefix sizes, always ending with the full dictionary."""
        sizes = self.matryoshka_prefixes or [self.d_sae // 16, self.d_sae // 4]
        return sorted({s for s in sizes if s > 0} | {self.d_sae})


@register("matryoshka", config=MatryoshkaConfig, saelens_name="jumprelu", k_bounds_l0=True)
class MatryoshkaSAE(BatchTopKSAE):
    """Loss: mean over prefixes m of the normalised MSE of ``f[:, :m] W_dec[:m] + b_dec``; AuxK."""

    cfg: MatryoshkaConfig

    def training_step(
        self, x: torch.Tensor, dead_mask: torch.Tensor | None, sparsity_scale: float
    ) -> StepOutput:
        dead, k_aux = aux_latents(self, dead_mask)
        values, cols, crow, aux_values, aux_local = self.encode_batch_sparse(x, dead, k_aux)
        losses = []
        x_hat = self.b_dec.expand_as(x)
        no_bias = torch.zeros_like(self.b_dec)
        start = 0
        for size in self.cfg.prefixes():  # each group's latents decoded on their own, summed
            in_group = (cols >= start) & (cols < size)
            x_hat = x_hat + sparse_decode_csr(values * in_group, cols, crow, self.W_dec, no_bias)
            losses.append(normalized_mse(x, x_hat))
            start = size
        mse = torch.stack(losses).mean()
        aux = auxk_loss(self, x, x_hat, dead, aux_values, aux_local)
        fired, l0 = csr_step_stats(values, cols, len(x), self.cfg.d_sae)
        metrics = {
            "mse": losses[-1].detach(),
            "prefix_mse": mse.detach(),
            "auxk": aux.detach(),
        }
        return StepOutput(mse + aux, x_hat, fired, l0, metrics)
