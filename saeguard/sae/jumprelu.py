"""JumpReLU SAE (Rajamanoharan et al. 2024): ``f = z * H(z - theta)`` with a learnable threshold per
latent, trained through straight-through estimators with a rectangle kernel of width epsilon."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from saeguard.sae.base import (
    SparseAutoencoder,
    StepOutput,
    dense_step_stats,
    mse_sum,
    token_mean,
)
from saeguard.sae.config import SAEConfig
from saeguard.sae.registry import register


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # type: ignore[override]
        z, theta = ctx.saved_tensors
        grad_z = grad * (z > theta)
        grad_theta = (-(theta / ctx.eps) * _rectangle((z - theta) / ctx.eps) * grad).sum(0)
        return grad_z, grad_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # type: ignore[override]
        z, theta = ctx.saved_tensors
        grad_theta = (-(1.0 / ctx.eps) * _rectangle((z - theta) / ctx.eps) * grad).sum(0)
        return torch.zeros_like(z), grad_theta, None


@dataclass(kw_only=True)
class JumpReLUConfig(SAEConfig):
    """JumpReLU's settings beside the shared ones (its k only sets the initial threshold)."""

    jumprelu_bandwidth: float = 0.05
    """Width epsilon of the straight-through rectangle kernel of JumpReLU (inputs are scaled to
    E|x|^2 = d_in in training, so pre-activations are of order 1)."""
    jumprelu_init_threshold: float = 0.0
    """Initial JumpReLU threshold; 0 = set from the first batch so that its mean L0 equals k."""
    l0_target: float = 0.0
    """JumpReLU: if > 0, penalise (L0 / target - 1)^2 instead of L0."""


@register("jumprelu", config=JumpReLUConfig)
class JumpReLUSAE(SparseAutoencoder):
    """Loss ``|x - x_hat|^2 + lambda L0``, or ``lambda (L0/target - 1)^2`` with ``l0_target``."""

    cfg: JumpReLUConfig

    def __init__(self, cfg: JumpReLUConfig) -> None:
        super().__init__(cfg)
        initial = cfg.jumprelu_init_threshold if cfg.jumprelu_init_threshold > 0 else 0.1
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(initial)))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def encode_flat(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.pre_acts(x))
        return z * (z > self.threshold)

    def training_step(
        self, x: torch.Tensor, dead_mask: torch.Tensor | None, sparsity_scale: float
    ) -> StepOutput:
        z = torch.relu(self.pre_acts(x))
        theta = self.threshold
        f = _JumpReLU.apply(z, theta, self.cfg.jumprelu_bandwidth)
        x_hat = f @ self.W_dec + self.b_dec
        mse = mse_sum(x, x_hat)
        l0 = token_mean(_Step.apply(z, theta, self.cfg.jumprelu_bandwidth).sum(-1))
        coef = self.cfg.sparsity_coef(1.0) * sparsity_scale
        penalty = (l0 / self.cfg.l0_target - 1) ** 2 if self.cfg.l0_target > 0 else l0
        fired, l0_value = dense_step_stats(f)
        return StepOutput(mse + coef * penalty, x_hat, fired, l0_value, {"mse": mse.detach()})

    def splits_across_ranks(self) -> str:
        if self.cfg.l0_target > 0:
            return "--l0-target penalises the square of the whole batch's mean L0"
        return ""

    @torch.no_grad()
    def init_from_batch_(self, x: torch.Tensor) -> None:
        """Unless a threshold was given, start where the batch's mean L0 equals k: with a tiny
        threshold half the latents fire and the short STE window cannot pull it up in time."""
        if self.cfg.jumprelu_init_threshold > 0:
            return
        z = torch.relu(self.pre_acts(x)).reshape(-1)
        keep = min(self.cfg.k * x.shape[0], z.numel())
        theta = float(z.topk(keep, sorted=False).values.min().clamp_min(1e-3))
        self.log_threshold.fill_(math.log(theta))

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {"threshold": self.threshold.detach()}

    def load_extra_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "threshold" in tensors:
            with torch.no_grad():
                self.log_threshold.copy_(tensors["threshold"].clamp_min(1e-12).log())
