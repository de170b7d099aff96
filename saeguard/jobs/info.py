"""Configs of the commands that only describe things: `saeguard cache`, `hooks`, `corpora`."""

from __future__ import annotations

from dataclasses import dataclass


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


@dataclass(kw_only=True)
class CorporaConfig:
    """`saeguard corpora`: how to print the list."""

    json: bool = False
    """Print JSON instead of a table."""
