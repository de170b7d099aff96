"""BatchTopK SAE (Bussmann et al. 2024): the top k*B pre-activations across a batch of B tokens.

Training runs on sparse kernels, as TopK's does: the latents are kept in CSR form (tokens keep
different numbers of them), decoded by ``embedding_bag`` and differentiated only where kept.
After training, inference uses a fixed threshold theta (running mean of the smallest activation
kept in each training batch), i.e. it behaves as a JumpReLU with one shared threshold, so a
token's latents no longer depend on the rest of its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saeguard.sae.base import (
    SparseAutoencoder,
    StepOutput,
    aux_latents,
    auxk_loss,
    normalized_mse,
)
from saeguard.sae.config import SAEConfig
from saeguard.sae.kernels import batch_topk_select, sparse_batch_topk_encode, sparse_decode_csr
from saeguard.sae.registry import register


def csr_step_stats(
    values: torch.Tensor, cols: torch.Tensor, n_tokens: int, n_latents: int
) -> tuple[torch.Tensor, float]:
    """(fired [d_sae], mean L0) of CSR latents (only positive values are kept)."""
    fired = torch.zeros(n_latents, dtype=torch.bool, device=cols.device)
    fired[cols] = True
    return fired, len(values) / max(n_tokens, 1)


@dataclass(kw_only=True)
class BatchTopKConfig(SAEConfig):
    """BatchTopK's settings beside the shared ones."""

    threshold_momentum: float = 0.9
    """Momentum of the running BatchTopK inference threshold (each batch's minimum kept
    activation is already an average over k x batch values, so a short window suffices and
    short runs are not anchored to the first steps' scale)."""


# SAELens runs it as a JumpReLU with the stored threshold, which is how SAELens itself saves
# BatchTopK SAEs for inference.
@register("batchtopk", config=BatchTopKConfig, saelens_name="jumprelu", k_bounds_l0=True)
class BatchTopKSAE(SparseAutoencoder):
    """Batch-level TopK in training, threshold at inference."""

    cfg: BatchTopKConfig
    threshold: torch.Tensor

    def __init__(self, cfg: BatchTopKConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.full((cfg.d_sae,), -1.0))
        self._last_min_kept: float | None = None

    def splits_across_ranks(self) -> str:
        return "it keeps the top k x batch latents of the whole batch"

    def batch_topk(self, pre: torch.Tensor) -> torch.Tensor:
        """Dense latents keeping the k * N largest ReLU pre-activations of the whole batch."""
        rows, cols, _ = batch_topk_select(pre.detach(), self.cfg.k)
        return torch.zeros_like(pre).index_put((rows, cols), pre[rows, cols])

    def encode_flat(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        if float(self.threshold[0]) < 0:  # no threshold yet: fall back to the batch rule
            return self.batch_topk(pre)
        return pre * (pre > self.threshold)

    def encode_batch_sparse(
        self, x: torch.Tensor, dead: torch.Tensor | None = None, k_aux: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training latents of a flat batch as CSR (values, cols, crow) and AuxK's (values,
        positions into ``dead``); records the smallest kept value for the inference
        threshold."""
        out = sparse_batch_topk_encode(x, self.b_dec, self.W_enc, self.b_enc, self.cfg.k, dead,
                                       k_aux)  # fmt: skip
        values = out[0]
        self._last_min_kept = float(values.detach().min()) if values.numel() else None
        return out

    def training_step(
        self, x: torch.Tensor, dead_mask: torch.Tensor | None, sparsity_scale: float
    ) -> StepOutput:
        dead, k_aux = aux_latents(self, dead_mask)
        values, cols, crow, aux_values, aux_local = self.encode_batch_sparse(x, dead, k_aux)
        x_hat = sparse_decode_csr(values, cols, crow, self.W_dec, self.b_dec)
        mse = normalized_mse(x, x_hat)
        aux = auxk_loss(self, x, x_hat, dead, aux_values, aux_local)
        fired, l0 = csr_step_stats(values, cols, len(x), self.cfg.d_sae)
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
