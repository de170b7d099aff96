"""SAE architectures, their registry, and saving / loading (SAELens-compatible).

Importing this package registers every architecture: ``relu``, ``topk``, ``batchtopk``,
``jumprelu``, ``abstopk``, ``matryoshka`` and ``mp``.
"""

from saeguard.sae import abstopk, batchtopk, jumprelu, matryoshka, mp, relu, topk  # noqa: F401
from saeguard.sae.base import SparseAutoencoder, StepOutput
from saeguard.sae.config import SAEConfig
from saeguard.sae.registry import ARCHITECTURES, create_sae, register

__all__ = [
    "ARCHITECTURES",
    "SAEConfig",
    "SparseAutoencoder",
    "StepOutput",
    "create_sae",
    "register",
]
