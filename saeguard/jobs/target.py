"""The model, hook point and corpus a job studies (shared by `saeguard run` and the studies)."""

from __future__ import annotations

from dataclasses import dataclass

from saeguard.defaults import DEFAULT_CORPUS, DEFAULT_HOOK, DEFAULT_MODEL
from saeguard.devices import check_device_name


@dataclass(kw_only=True)
class TargetConfig:
    """Which model, hook point and in-distribution corpus."""

    model: str = DEFAULT_MODEL
    """Model: an embedded name, a Hugging Face id or a local directory."""
    hook: str = DEFAULT_HOOK
    """Hook point the SAEs read."""
    corpus: str = DEFAULT_CORPUS
    """ID corpus: its train split trains the SAEs (and fits the monitor); held-out splits
    calibrate and evaluate."""
    device: str = "auto"
    """Torch device: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps; under
    torchrun each process takes the GPU of its local rank."""

    def __post_init__(self) -> None:
        check_device_name(self.device)
