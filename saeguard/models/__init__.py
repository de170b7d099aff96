"""Loading language models and naming their hook points uniformly."""

from saeguard.models.hooks import (
    FAMILIES,
    HOOK_KINDS,
    HookPoint,
    UnknownHookError,
    capture_hooks,
    parse_hook,
    run_to_hooks,
)
from saeguard.models.loading import EMBEDDED_MODELS, LoadedModel, ensure_embedded_cached, load_model

__all__ = [
    "EMBEDDED_MODELS",
    "FAMILIES",
    "HOOK_KINDS",
    "HookPoint",
    "LoadedModel",
    "UnknownHookError",
    "capture_hooks",
    "ensure_embedded_cached",
    "load_model",
    "parse_hook",
    "run_to_hooks",
]
