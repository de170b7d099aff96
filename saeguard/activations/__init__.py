"""Harvesting activations, the on-disk cache and shuffled training batches."""

from saeguard.activations.buffer import CachedActivationSource, ShuffleBuffer
from saeguard.activations.cache import ActivationCache
from saeguard.activations.exclusion import ExclusionRules
from saeguard.activations.source import (
    ActivationHarvester,
    ActivationSourceConfig,
    ModelActivationSource,
)

__all__ = [
    "ActivationCache",
    "ActivationHarvester",
    "ActivationSourceConfig",
    "CachedActivationSource",
    "ExclusionRules",
    "ModelActivationSource",
    "ShuffleBuffer",
]
