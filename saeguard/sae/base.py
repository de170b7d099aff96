"""The SAE base class shared by every architecture.

Every SAE reconstructs ``x_hat = f(x) @ W_dec + b_dec`` with SAELens-compatible parameters
``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in]. Subclasses
say how latents are computed (:meth:`encode`) and how they are trained
(:meth:`training_step`). ``encode``/``decode``/``forward`` accept any batch shape ``(..., d_in)``.

"Active" means ``f_i != 0`` everywhere (AbsTopK latents can be negative).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from saeguard.errors import CorruptFileError, SaeguardError
from saeguard.sae.config import SAEConfig


@dataclass
class StepOutput:
    """What one training forward returns to the trainer."""

    loss: torch.Tensor
    """Scalar loss to back-propagate."""
    x_hat: torch.Tensor
    """Reconstruction [N, d_in]."""
    fired: torch.Tensor
    """Boolean [d_sae]: latents active on at least one token of the batch."""
    l0: torch.Tensor | float
    """Mean number of active latents per token (a 0-d tensor left on the device: reading it
    would wait for the device every step)."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Loss terms to log (detached scalars)."""


def dense_step_stats(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fired [d_sae], mean L0) of a dense latent matrix."""
    active = f != 0
    return active.any(0), active.sum().double() / max(f.shape[0], 1)


def sparse_step_stats(
    values: torch.Tensor, indices: torch.Tensor, n_latents: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fired [d_sae], mean L0) of (values, indices) latents."""
    active = values != 0
    fired = torch.zeros(n_latents, dtype=torch.bool, device=values.device)
    fired[indices[active]] = True
    return fired, active.sum().double() / max(values.shape[0], 1)


class SparseAutoencoder(nn.Module):
    """Base class: parameters, shapes, decoder-norm maintenance and input-scale folding."""

    architecture: ClassVar[str] = ""
    """Registered name (set by ``@register``)."""
    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    """Configuration class: ``SAEConfig`` or a subclass with the architecture's own settings."""
    saelens_name: ClassVar[str] = ""
    """Architecture SAELens runs this one as for inference ("": the registered name)."""
    k_bounds_l0: ClassVar[bool] = False
    """Whether k counts active latents, so that it may not exceed d_sae."""
    unit_norm_decoder: ClassVar[bool] = True
    """Whether decoder rows are kept at unit norm during training."""
    file_names: ClassVar[dict[str, str]] = {}
    """Names under which standard parameters are saved when SAELens calls them otherwise (the
    Gated SAE's encoder bias is SAELens's ``b_gate``); the others keep their own names."""
    cfg: SAEConfig

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.empty(d, n))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(torch.empty(n, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows and the encoder tied to the decoder's transpose."""
        with torch.no_grad():
            w = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=generator)
            w /= w.norm(dim=-1, keepdim=True)
            self.W_dec.copy_(w * (0.1 if not self.unit_norm_decoder else 1.0))
            self.W_enc.copy_(self.W_dec.t())
            self.b_enc.zero_()
            self.b_dec.zero_()

    # --- shape handling -------------------------------------------------------------------
    def _flat(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        if x.shape[-1] != self.cfg.d_in:
            raise SaeguardError(
                f"activations have width {x.shape[-1]} but this SAE reads d_in={self.cfg.d_in}: "
                "was it trained on another model or hook point?"
            )
        return x.reshape(-1, self.cfg.d_in), tuple(x.shape[:-1])

    # --- inference --------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations ``(x - b_dec) @ W_enc + b_enc`` for a flat batch [N, d_in]."""
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)

    def encode_flat(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents [N, d_sae] of a flat batch; subclasses define the activation."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [..., d_sae] of activations [..., d_in]."""
        flat, lead = self._flat(x)
        return self.encode_flat(flat).reshape(*lead, self.cfg.d_sae)

    def sparse_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values [n, m], indices [n, m], L0 [n]) of the active latents of activations
        [n, d_in], where m is the largest L0 of the batch and values of 0 pad the rows of tokens
        with fewer. This default encodes densely; sparse architectures override it."""
        dense = self.encode(x)
        l0 = (dense != 0).sum(-1)
        width = max(int(l0.max()) if len(l0) else 0, 1)
        _, indices = dense.abs().topk(width, dim=-1, sorted=False)
        return dense.gather(-1, indices), indices, l0

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction [..., d_in] of latents [..., d_sae]."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of activations [..., d_in]."""
        return self.decode(self.encode(x))

    # --- training -----------------------------------------------------------------------------
    def training_step(
        self, x: torch.Tensor, dead_mask: torch.Tensor | None, sparsity_scale: float
    ) -> StepOutput:
        """Loss and reconstruction of a flat batch; ``dead_mask`` marks latents dead so far and
        ``sparsity_scale`` (0..1) warms up the sparsity coefficient."""
        raise NotImplementedError

    def splits_across_ranks(self) -> str:
        """Why a global batch split across data-parallel ranks would not train this SAE as one
        process does ('' when it does: its loss is a per-token mean, or a variance-normalised
        sum, whose batch statistics :func:`batch_share` makes global)."""
        return ""

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Project out the gradient component along each (unit) decoder row."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)
            self.W_dec.grad -= parallel * self.W_dec

    @torch.no_grad()
    def init_from_batch_(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation on the first (scaled) training batch, after b_dec."""

    @torch.no_grad()
    def after_step_(self) -> None:
        """Hook for state updated after each optimiser step (e.g. running thresholds)."""

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """Make an SAE trained on ``x * scale`` read raw ``x`` and reconstruct raw ``x``.

        Encoder: ``(x s - b) W + c = (x - b/s)(s W) + c``; decoder: ``(f W_d + b) / s``. Latent
        values are unchanged, so thresholds stay valid.
        """
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)

    # --- saving ------------------------------------------------------------------------------
    @classmethod
    def saelens_architecture(cls) -> str:
        """The ``architecture`` SAELens reads in cfg.json."""
        return cls.saelens_name or cls.architecture

    def saelens_activation(self) -> tuple[str, dict[str, Any]]:
        """SAELens's ``activation_fn_str`` and ``activation_fn_kwargs`` for this SAE."""
        return "relu", {}

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Architecture-specific tensors to save beside the four standard ones."""
        return {}

    def load_extra_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`extra_tensors`."""

    @classmethod
    def file_name(cls, parameter: str) -> str:
        """The name a standard parameter (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``) is saved
        under (see :attr:`file_names`)."""
        return cls.file_names.get(parameter, parameter)

    @torch.no_grad()
    def centre_encoder_input_(self) -> None:
        """Make an encoder that read raw ``x`` read ``x - b_dec`` instead, as saeguard's always
        does (SAELens's ``apply_b_dec_to_input: false``): ``x W + c = (x - b_dec) W + (c +
        b_dec W)``. Architectures with more encoder biases shift them too."""
        self.b_enc.add_(self.b_dec @ self.W_enc)


def saved_tensor(
    tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]
) -> torch.Tensor:
    """Tensor ``name`` of a loaded SAE file, checked for presence, ``shape`` and finite values
    (one line naming what is wrong)."""
    if name not in tensors:
        raise CorruptFileError(f"SAE weights lack the tensor {name!r}")
    tensor = tensors[name]
    if tuple(tensor.shape) != shape:
        raise CorruptFileError(
            f"SAE tensor {name} has shape {tuple(tensor.shape)}, expected {shape} from cfg.json"
        )
    if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
        raise CorruptFileError(f"SAE tensor {name} holds NaN, inf or non-float values")
    return tensor


_RANK_SUM: ContextVar[Callable[[torch.Tensor], torch.Tensor] | None] = ContextVar(
    "saeguard_rank_sum", default=None
)
_FIRST_ROW: ContextVar[int] = ContextVar("saeguard_first_row", default=0)


@contextmanager
def batch_share(
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor], first_row: int = 0
) -> Iterator[None]:
    """Within this block a training step sees one rank's share of a global batch, starting at
    row ``first_row`` of it.

    The losses' batch statistics (token count, mean, variance) are then those of the global
    batch, summed over the ranks by ``sum_over_ranks``, so that each rank's loss is its exact
    share of the global loss and the sum of the ranks' gradients is the single-process
    gradient of the whole batch. Random draws per token (vsae's noise) are indexed by the
    global row (:func:`share_first_row`), so they too are those of one process.
    """
    token = _RANK_SUM.set(sum_over_ranks)
    row_token = _FIRST_ROW.set(first_row)
    try:
        yield
    finally:
        _FIRST_ROW.reset(row_token)
        _RANK_SUM.reset(token)


def share_first_row() -> int:
    """Row of the global batch where this rank's share starts (0 in one process)."""
    return _FIRST_ROW.get()


def token_mean(per_token: torch.Tensor) -> torch.Tensor:
    """Mean over the batch's tokens of a per-token quantity (this rank's share of the global
    batch's mean inside :func:`batch_share`)."""
    rank_sum = _RANK_SUM.get()
    if rank_sum is None:
        return per_token.mean()
    n = rank_sum(torch.tensor([float(per_token.shape[0])], device=per_token.device))
    return per_token.sum() / n[0]


def batch_variance(x: torch.Tensor) -> torch.Tensor:
    """``sum_t |x_t - mean(x)|^2`` over the (global) batch, without a gradient: the denominator
    of :func:`normalized_mse`, for other loss terms put on the same scale."""
    target = x.detach().float()
    rank_sum = _RANK_SUM.get()
    if rank_sum is None:
        return (target - target.mean(0)).pow(2).sum().clamp_min(1e-12)
    n = rank_sum(torch.tensor([float(target.shape[0])], device=target.device))
    mean = rank_sum(target.sum(0)) / n
    return rank_sum((target - mean).pow(2).sum().reshape(1))[0].clamp_min(1e-12)


def mse_sum(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the squared reconstruction error."""
    return token_mean((x_hat - x).pow(2).sum(-1))


def normalized_mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Squared error over the batch variance (FVU of the batch): scale-free."""
    if _RANK_SUM.get() is None:
        return (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    return (x_hat - x).pow(2).sum() / batch_variance(x)


def aux_latents(
    sae: SparseAutoencoder, dead_mask: torch.Tensor | None
) -> tuple[torch.Tensor | None, int]:
    """(ids of the dead latents, k_aux) for this step's AuxK, or (None, 0) when it is off: the
    sparse encoders select AuxK's latents from the pre-activations they already compute."""
    if dead_mask is None or sae.cfg.aux_coef == 0 or not bool(dead_mask.any()):
        return None, 0
    dead = dead_mask.nonzero().squeeze(1)
    return dead, min(sae.cfg.effective_k_aux, len(dead))


def auxk_loss(
    sae: SparseAutoencoder,
    x: torch.Tensor,
    x_hat: torch.Tensor,
    dead: torch.Tensor | None,
    aux_values: torch.Tensor,
    aux_local: torch.Tensor,
) -> torch.Tensor:
    """AuxK (Gao et al. 2024): the dead latents' top-k_aux pre-activations (``aux_values`` of
    ``dead[aux_local]`` [N, k_aux], from the encoder) reconstruct the residual ``x - x_hat``."""
    if dead is None or aux_values.shape[-1] == 0:
        return x.new_zeros(())
    from saeguard.sae.kernels import aux_decode

    aux = aux_decode(aux_values, aux_local, dead, sae.W_dec)
    return sae.cfg.aux_coef * normalized_mse((x - x_hat).detach(), aux)
