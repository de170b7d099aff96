"""The configuration of an SAE: architecture, sizes and the hyper-parameters of its loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from saeguard.errors import ConfigError


@dataclass(kw_only=True)
class SAEConfig:
    """Everything needed to build an SAE and to compute its training loss."""

    architecture: str = "topk"
    """Architecture name (see `saeguard.sae.ARCHITECTURES`)."""
    d_in: int
    """Width of the activations the SAE reads."""
    d_sae: int
    """Number of latents."""
    k: int = 32
    """Active latents per token (TopK family, MP) or on average (BatchTopK, Matryoshka)."""
    k_aux: int = 0
    """Latents used by the AuxK loss on dead latents (0: d_in / 2)."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss (0 disables it)."""
    dead_tokens: int = 65_536
    """A latent that has not fired for this many training tokens counts as dead."""
    l1_coef: float | None = None
    """Sparsity coefficient lambda of relu (L1) and jumprelu (L0); None: 5 and 1 respectively."""
    jumprelu_bandwidth: float = 0.05
    """Width epsilon of the straight-through rectangle kernel of JumpReLU (inputs are scaled to
    E|x|^2 = d_in in training, so pre-activations are of order 1)."""
    jumprelu_init_threshold: float = 0.0
    """Initial JumpReLU threshold; 0 = set from the first batch so that its mean L0 equals k."""
    l0_target: float = 0.0
    """JumpReLU: if > 0, penalise (L0 / target - 1)^2 instead of L0."""
    matryoshka_prefixes: list[int] = field(default_factory=list)
    """Matryoshka prefix sizes (empty: d_sae/16, d_sae/4, d_sae)."""
    threshold_momentum: float = 0.9
    """Momentum of the running BatchTopK inference threshold (each batch's minimum kept
    activation is already an average over k x batch values, so a short window suffices and
    short runs are not anchored to the first steps' scale)."""

    def __post_init__(self) -> None:
        if self.d_in < 1:
            raise ConfigError(f"d_in must be positive, got {self.d_in}")
        if self.d_sae < 1:
            raise ConfigError(
                f"d_sae must be positive, got {self.d_sae} (is --expansion negative or zero?)"
            )
        if self.k < 1:
            raise ConfigError(f"--k must be at least 1, got {self.k}")
        if self.architecture in SPARSE_K_ARCHITECTURES and self.k > self.d_sae:
            raise ConfigError(
                f"--k ({self.k}) cannot exceed the number of latents d_sae ({self.d_sae}); "
                "lower --k or raise --expansion"
            )
        if self.k_aux < 0 or self.aux_coef < 0 or (self.l1_coef or 0) < 0:
            raise ConfigError("k_aux, aux_coef and l1_coef must be non-negative")
        for size in self.matryoshka_prefixes:
            if not 0 < size <= self.d_sae:
                raise ConfigError(f"matryoshka prefix {size} must lie in 1..d_sae ({self.d_sae})")

    def sparsity_coef(self, default: float) -> float:
        return default if self.l1_coef is None else self.l1_coef

    @property
    def effective_k_aux(self) -> int:
        return min(self.k_aux or self.d_in // 2, self.d_sae)

    def prefixes(self) -> list[int]:
        """Sorted Matryoshka prefix sizes, always ending with the full dictionary."""
        sizes = self.matryoshka_prefixes or [self.d_sae // 16, self.d_sae // 4]
        return sorted({s for s in sizes if s > 0} | {self.d_sae})

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


# Architectures whose k must not exceed d_sae.
SPARSE_K_ARCHITECTURES = {"topk", "abstopk", "batchtopk", "matryoshka", "mp"}
