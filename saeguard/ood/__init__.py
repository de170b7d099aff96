"""OOD diagnostics: fallacious concepts, baselines, a calibrated monitor and its benchmark."""

from saeguard.ood.config import MonitorConfig
from saeguard.ood.explain import TextScore
from saeguard.ood.monitor import Monitor
from saeguard.ood.scores import ALL_SCORES, BASELINES, SAE_SCORES
from saeguard.ood.stats import IDStats

__all__ = [
    "ALL_SCORES",
    "BASELINES",
    "IDStats",
    "Monitor",
    "MonitorConfig",
    "SAE_SCORES",
    "TextScore",
]
