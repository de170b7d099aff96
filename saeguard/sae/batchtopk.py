"""BatchTopK SAE (Bussmann et al. 2024): the top k*B pre-activations across a batch of B tokens.

After training, inference uses a fixed threshold theta (running mean of the smallest activation
kept in each training batch), i.e. it behaves as a JumpReLU with one shared threshold, so a
token's latents no longer depend on the rest of its batch.
"""

from __future__ import annotations

import torch

from saeguard.sae.base import (
    SparseAutoencoder,
    StepOutput,
    auxk_loss,
    dense_step_stats,
    normalized_mse,
)
from saeguard.sae.config import SAEConfig
from saeguard.sae.registry import register


@register("batchtopk")
class BatchTopKSAE(SparseAutoencoder):
    """Batch-level TopK in training, threshold at inference."""

    threshold: torch.Tensor

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.full((cfg.d_sae,), -1.0))
        self._last_min_kept: float | None = None

    def batch_topk(self, pre: torch.Tensor) -> torch.Tensor:
        """Keep the k * N largest ReLU pre-activations of the whole batch."""
        acts = torch.relu(pre)
        keep = min(self.cfg.k * acts.shape[0], acts.numel())
        flat = acts.reshape(-1)
        values, indices = flat.topk(keep, sorted=False)
        dense = torch.zeros_like(flat).scatter(0, indices, values).reshape(acts.shape)
        positive = values[values > 0]
        self._last_min_kept = float(positive.detach().min()) if positive.numel() else None
        return dense

    def encode_flat(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        if float(self.threshold[0]) < 0:  # no threshold yet: fall back to the batch rule
            return self.batch_topk(pre)
        return pre * (pre > self.threshold)

    def training_step(
        self, x: torch.Tensor, dead_mask: torch.Tensor | None, sparsity_scale: float
    ) -> StepOutput:
        f = self.batch_topk(self.pre_acts(x))
        x_hat = f @ self.W_dec + self.b_dec
        mse = normalized_mse(x, x_hat)
        aux = auxk_loss(self, x, x_hat, dead_mask)
        fired, l0 = dense_step_stats(f)
        return StepOutput(mse + aux, x_hat, fired, l0, {"mse": mse.detach(), "auxk": aux.detach()})

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {"threshold": self.threshold.detach().clone()}

    def load_extra_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "threshold" in tensors:
            self.threshold.copy_(tensors["threshold"])

    @torch.no_grad()
    def after_step_(self) -> None:
        if self._last_min_kept is None:
            return
        current = float(self.threshold[0])
        m = self.cfg.threshold_momentum
        new = self._last_min_kept if current < 0 else m * current + (1 - m) * self._last_min_kept
        self.threshold.fill_(new)
