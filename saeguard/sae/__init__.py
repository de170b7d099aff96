"""SAE architectures, their registry, and saving / loading (SAELens-compatible).

Importing this package imports every module in it, so each architecture registers itself
(``relu``, ``topk``, ``batchtopk``, ``jumprelu``, ``abstopk``, ``matryoshka``, ``mp``, ``vsae``,
``gated`` today):
adding one is adding a module with its class and its ``@register``.
"""

import importlib
import pkgutil

from saeguard.sae.base import SparseAutoencoder, StepOutput
from saeguard.sae.config import SAEConfig
from saeguard.sae.registry import (
    ARCHITECTURES,
    architecture_options,
    config_class,
    create_sae,
    make_sae_config,
    register,
    sae_config_from_dict,
)

_NOT_ARCHITECTURES = {"base", "config", "registry", "io", "kernels", "hub"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _NOT_ARCHITECTURES and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ARCHITECTURES",
    "SAEConfig",
    "SparseAutoencoder",
    "StepOutput",
    "architecture_options",
    "config_class",
    "create_sae",
    "make_sae_config",
    "register",
    "sae_config_from_dict",
]
