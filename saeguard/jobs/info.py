"""Configs of the commands that only describe things: `saeguard cache`, `hooks`, `corpora`."""

from __future__ import annotations

from dataclasses import dataclass

from saeguard.devices import check_device_name


@dataclass(kw_only=True)
class CacheInfoConfig:
    """`saeguard cache`: which activation cache, and whether to check it."""

    directory: str
    """Directory written by `saeguard harvest`."""
    verify: bool = True
    """Check every shard's SHA-256 against the manifest."""


@dataclass(kw_only=True)
class HooksConfig:
    """`saeguard hooks`: which model."""

    model: str
    """Embedded name (smollm2-135m, gemma3-270m), HF id or directory."""
    json: bool = False
    """Print JSON instead of a table."""
    device: str = "auto"
    """Torch device: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps; under
    torchrun each process takes the GPU of its local rank."""

    def __post_init__(self) -> None:
        check_device_name(self.device)


@dataclass(kw_only=True)
class CorporaConfig:
    """`saeguard corpora`: how to print the list."""

    json: bool = False
    """Print JSON instead of a table."""
