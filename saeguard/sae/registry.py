"""Registry of SAE architectures: adding one is one file and one ``@register``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from saeguard.errors import UnknownChoiceError
from saeguard.sae.base import SparseAutoencoder
from saeguard.sae.config import SAEConfig

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {}

T = TypeVar("T", bound=type[SparseAutoencoder])


def register(name: str) -> Callable[[T], T]:
    """Class decorator that makes an architecture available under ``name``."""

    def wrap(cls: T) -> T:
        cls.architecture = name
        ARCHITECTURES[name] = cls
        return cls

    return wrap


def create_sae(cfg: SAEConfig) -> SparseAutoencoder:
    """Build an SAE of ``cfg.architecture``; unknown names list the registered ones."""
    if cfg.architecture not in ARCHITECTURES:
        raise UnknownChoiceError("SAE architecture", cfg.architecture, ARCHITECTURES)
    return ARCHITECTURES[cfg.architecture](cfg)
