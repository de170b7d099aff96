"""How an OOD monitor is fitted and calibrated: the settings of `saeguard ood fit`.

The config is frozen: calibrating a monitor records the false-positive rate its thresholds are set
for in ``Monitor.calibration`` and never rewrites the config it was fitted with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from saeguard.configs import validate_literals
from saeguard.errors import ConfigError
from saeguard.ood.fusion import FusionRule, Tail
from saeguard.ood.scores import ALL_SCORES, FUSED, LM_BASELINES, SINGLE_SCORES

DEFAULT_FUSED_SCORES: tuple[str, ...] = tuple(s for s in SINGLE_SCORES if s != "energy")
"""Components of the fused score: every single score but ``energy`` (itself a combination)."""


@dataclass(frozen=True, kw_only=True)
class MonitorConfig:
    """How a monitor is fitted and calibrated (`saeguard ood fit`)."""

    fit_texts: int = 1500
    """ID texts (train split of the corpus) the statistics are fitted on."""
    calibration_texts: int = 500
    """Held-out ID texts (validation split) the threshold is calibrated on."""
    target_fpr: float = 0.05
    """False-positive rate the threshold is set for on held-out ID text."""
    flag_score: str = FUSED
    """Score that raises the flag: fused, or any single SAE score or baseline (the LM baselines,
    and a fused score that includes them, need the full model)."""
    fused_scores: list[str] = field(default_factory=lambda: list(DEFAULT_FUSED_SCORES))
    """Scores the fused score combines (their p-values against held-out ID texts)."""
    fused_with_lm: bool = True
    """Include the LM baselines in the fused score (scoring then runs the model past the hook
    to its logits); --no-fused-with-lm keeps scoring to the forward up to the hook."""
    fusion_rule: FusionRule = "fisher"
    """How the components' p-values are combined: fisher (-2 sum log p) or min_p (Sidak)."""
    fusion_tail: Tail = "none"
    """P-values beyond every reference value: none (all 1 / (n + 1)) or exponential (an
    exponential tail fitted to the top of the reference keeps their order; measured worse on
    jailbreak wrapping, docs/ood.md)."""
    top_q: float = 0.1
    """Share of a text's tokens (most surprising first) that fallacious_surprisal_top averages."""
    tau_rate: float = 1e-4
    """A latent firing on fewer than this fraction of ID tokens is rare (fallacious when active)."""
    range_margin: float = 0.1
    """A latent above its ID p99.9 x (1 + this) is out of range (fallacious)."""
    reference_fraction: float = 0.2
    """Share of the fit texts held back from the statistics to z-score the energy components."""
    knn_k: int = 10
    """Neighbour rank for the k-NN distance baseline."""
    id_contexts: int = 5
    """Top-activating ID contexts kept per latent for explanations."""
    explain_latents: int = 3
    """Fallacious latents listed in each flagged text's explanation."""
    max_windows: int = 64
    """Windows of ctx_len tokens scored per text; a longer text is cut and marked truncated."""
    batch_size: int = 16
    """Windows per forward pass."""
    seed: int = 0
    """Seed of the text samples and the reference split."""

    def __post_init__(self) -> None:
        validate_literals(self)
        if self.flag_score not in ALL_SCORES:
            raise ConfigError(
                f"unknown --flag-score {self.flag_score!r}; choose from {', '.join(ALL_SCORES)}"
            )
        unknown = [s for s in self.fused_scores if s not in SINGLE_SCORES]
        if unknown or not self.fused_scores:
            raise ConfigError(
                f"--fused-scores: {'unknown ' + ', '.join(unknown) if unknown else 'empty'}; "
                f"choose from {', '.join(SINGLE_SCORES)}"
            )
        if not 0 < self.top_q <= 1:
            raise ConfigError(f"--top-q must lie in (0, 1], got {self.top_q}")
        if not 0 < self.target_fpr < 0.5:
            raise ConfigError(f"--target-fpr must lie in (0, 0.5), got {self.target_fpr}")
        if not 0 < self.tau_rate < 1:
            raise ConfigError(f"--tau-rate must lie in (0, 1), got {self.tau_rate}")
        if self.range_margin < 0:
            raise ConfigError(f"--range-margin must be >= 0, got {self.range_margin}")
        if not 0 < self.reference_fraction < 0.9:
            raise ConfigError("--reference-fraction must lie in (0, 0.9)")
        if self.fit_texts < 20:
            raise ConfigError(f"--fit-texts must be at least 20, got {self.fit_texts}")
        if self.calibration_texts < 20:
            raise ConfigError(
                f"--calibration-texts must be at least 20 (got {self.calibration_texts}): "
                "a threshold for a 5% FPR needs enough held-out texts to place it"
            )
        if not self.fusion_components:
            raise ConfigError(
                "--fused-scores lists only LM baselines but --no-fused-with-lm leaves them out; "
                "name at least one SAE score or activation baseline"
            )
        for name in ("knn_k", "id_contexts", "explain_latents", "max_windows", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")

    @property
    def fusion_components(self) -> list[str]:
        """The scores the fused score combines (the LM baselines only with ``fused_with_lm``)."""
        return [s for s in self.fused_scores if self.fused_with_lm or s not in LM_BASELINES]

    @property
    def flag_needs_lm(self) -> bool:
        """Whether the flag score needs the LM's logits (the forward past the hook)."""
        if self.flag_score == FUSED:
            return any(s in LM_BASELINES for s in self.fusion_components)
        return self.flag_score in LM_BASELINES
