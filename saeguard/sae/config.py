"""The configuration of an SAE: architecture, sizes and the hyper-parameters of its loss.

:class:`SAEConfig` holds the fields every architecture shares. An architecture with settings of
its own declares a subclass beside its SAE class (e.g. ``JumpReLUConfig`` in ``jumprelu.py``) and
names it in its ``@register``; :func:`saeguard.sae.registry.make_sae_config` builds the right one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from saeguard.defaults import DEFAULT_K
from saeguard.errors import ConfigError

_K_BOUNDS_L0: set[str] = set()
"""Architectures whose k counts active latents, so k must not exceed d_sae; filled by
``saeguard.sae.registry.register`` from each architecture's ``k_bounds_l0``."""


@dataclass(kw_only=True)
class SAELossSettings:
    """The loss settings every architecture shares (a training job sets them for all its SAEs)."""

    k_aux: int = 0
    """Latents used by the AuxK loss on dead latents (0: d_in / 2)."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss (0 disables it)."""
    dead_tokens: int = 65_536
    """A latent that has not fired for this many training tokens counts as dead."""
    l1_coef: float | None = None
    """Sparsity coefficient lambda of relu (L1), gated (L1 of the gate) and jumprelu (L0); None:
    5, 5 and 1 respectively."""

    def __post_init__(self) -> None:
        if self.k_aux < 0:
            raise ConfigError(f"--k-aux must be >= 0, got {self.k_aux}")
        for name, value in (("aux-coef", self.aux_coef), ("l1-coef", self.l1_coef)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"--{name} must be a finite number >= 0, got {value}")


@dataclass(kw_only=True)
class SAEConfig(SAELossSettings):
    """Everything needed to build an SAE and to compute its training loss."""

    architecture: str = "topk"
    """Architecture name (see `saeguard.sae.ARCHITECTURES`)."""
    d_in: int
    """Width of the activations the SAE reads."""
    d_sae: int
    """Number of latents."""
    k: int = DEFAULT_K
    """Active latents per token (TopK family, MP) or on average (BatchTopK, Matryoshka)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_in < 1:
            raise ConfigError(f"d_in must be positive, got {self.d_in}")
        if self.d_sae < 1:
            raise ConfigError(
                f"d_sae must be positive, got {self.d_sae} (is --expansion negative or zero?)"
            )
        if self.k < 1:
            raise ConfigError(f"--k must be at least 1, got {self.k}")
        if self.architecture in _K_BOUNDS_L0 and self.k > self.d_sae:
            raise ConfigError(
                f"--k ({self.k}) cannot exceed the number of latents d_sae ({self.d_sae}); "
                "lower --k or raise --expansion"
            )

    def sparsity_coef(self, default: float) -> float:
        return default if self.l1_coef is None else self.l1_coef

    @property
    def effective_k_aux(self) -> int:
        return min(self.k_aux or self.d_in // 2, self.d_sae)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
