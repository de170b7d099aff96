"""Registry of SAE architectures: adding one is one file and one ``@register``.

An architecture's module holds its SAE class, its configuration class when it has settings of
its own, and everything else saeguard needs to know about it, given to :func:`register`::

    @dataclass(kw_only=True)
    class JumpReLUConfig(SAEConfig):
        jumprelu_bandwidth: float = 0.05
        "Width epsilon of the straight-through rectangle kernel (one line under each field)."

    @register("jumprelu", config=JumpReLUConfig)
    class JumpReLUSAE(SparseAutoencoder): ...

``saeguard.sae`` imports every module of its package, so no list needs editing.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

from saeguard.configs import field_docs
from saeguard.errors import ConfigError, UnknownChoiceError
from saeguard.sae.base import SparseAutoencoder
from saeguard.sae.config import _K_BOUNDS_L0, SAEConfig

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {}

T = TypeVar("T", bound=type[SparseAutoencoder])


def register(
    name: str,
    *,
    config: type[SAEConfig] | None = None,
    saelens_name: str | None = None,
    k_bounds_l0: bool | None = None,
) -> Callable[[T], T]:
    """Class decorator that makes an architecture available under ``name``.

    ``config``: its ``SAEConfig`` subclass (holding its own settings); ``saelens_name``: the
    architecture SAELens runs it as for inference ("": ``name``); ``k_bounds_l0``: k is a number
    of active latents, so it may not exceed d_sae. Each one left at None is inherited from the
    parent class (``SparseAutoencoder``: ``SAEConfig``, "", False). SAELens's
    ``activation_fn_str`` and sparse encoding are methods the class may override
    (:meth:`SparseAutoencoder.saelens_activation`, :meth:`SparseAutoencoder.sparse_codes`).
    """

    def wrap(cls: T) -> T:
        cls.architecture = name
        if config is not None:
            cls.config_class = config
        if saelens_name is not None:
            cls.saelens_name = saelens_name
        if k_bounds_l0 is not None:
            cls.k_bounds_l0 = k_bounds_l0
        if cls.k_bounds_l0:
            _K_BOUNDS_L0.add(name)
        else:
            _K_BOUNDS_L0.discard(name)
        ARCHITECTURES[name] = cls
        return cls

    return wrap


def sae_class(name: str) -> type[SparseAutoencoder]:
    """The SAE class of architecture ``name``; unknown names list the registered ones."""
    if name not in ARCHITECTURES:
        raise UnknownChoiceError("SAE architecture", name, ARCHITECTURES)
    return ARCHITECTURES[name]


def config_class(name: str) -> type[SAEConfig]:
    """The configuration class of architecture ``name``; unknown names list the registered ones."""
    return sae_class(name).config_class


def make_sae_config(architecture: str, *, strict: bool = True, **values: Any) -> SAEConfig:
    """The configuration of an ``architecture`` SAE from its field ``values``. A key its class
    lacks (another architecture's setting) is an error, or ignored with ``strict=False``."""
    cls = config_class(architecture)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown and strict:
        raise ConfigError(
            f"SAE architecture {architecture!r} has no setting {', '.join(unknown)}; "
            f"its settings: {', '.join(sorted(known - {'architecture'}))}"
        )
    return cls(architecture=architecture, **{k: v for k, v in values.items() if k in known})


def sae_config_from_dict(values: Mapping[str, Any]) -> SAEConfig:
    """The configuration saved by :meth:`SAEConfig.to_dict` (``saeguard.sae_config`` in an SAE's
    cfg.json). Keys its architecture lacks are ignored: configs saved before the per-architecture
    classes carry every architecture's settings."""
    rest = dict(values)
    architecture = rest.pop("architecture", SAEConfig.architecture)
    return make_sae_config(architecture, strict=False, **rest)


def create_sae(cfg: SAEConfig) -> SparseAutoencoder:
    """Build an SAE of ``cfg.architecture``; unknown names list the registered ones. A config of
    another class (e.g. a plain ``SAEConfig``) is converted to the architecture's own, whose
    settings then take their defaults."""
    cls = sae_class(cfg.architecture)
    if not isinstance(cfg, cls.config_class):
        cfg = make_sae_config(strict=False, **cfg.to_dict())
    return cls(cfg)


class ArchitectureOption(NamedTuple):
    """A setting that only some architectures have (a field of their config subclass)."""

    field: dataclasses.Field[Any]
    """The dataclass field (name, default, default_factory)."""
    hint: Any
    """Its resolved type hint."""
    doc: str
    """The docstring written under it."""
    architectures: list[str]
    """Sorted names of the architectures whose config class has it."""


def architecture_options() -> dict[str, ArchitectureOption]:
    """Every field declared by a registered architecture's config class beyond ``SAEConfig``'s
    (e.g. ``jumprelu_bandwidth``), by name; one declared by several classes is listed once, so
    its type must agree."""
    shared = {f.name for f in dataclasses.fields(SAEConfig)}
    options: dict[str, ArchitectureOption] = {}
    for name in sorted(ARCHITECTURES):
        cls = ARCHITECTURES[name].config_class
        hints = typing.get_type_hints(cls)
        docs = field_docs(typing.cast(type, cls))  # a class is hashable; mypy sees eq=True
        for f in dataclasses.fields(cls):
            if f.name in shared:
                continue
            if f.name not in options:
                options[f.name] = ArchitectureOption(f, hints[f.name], docs.get(f.name, ""), [])
            elif options[f.name].hint != hints[f.name]:
                raise TypeError(
                    f"{cls.__name__}.{f.name} is {hints[f.name]} but another architecture's "
                    f"config declares it {options[f.name].hint}"
                )
            options[f.name].architectures.append(name)
    return options
