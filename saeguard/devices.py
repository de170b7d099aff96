"""Which torch device a command runs on: ``--device auto|cpu|cuda|cuda:N|mps``.

One function turns the user's word into a ``torch.device`` and fails in one line when the
machine lacks it, so no command discovers a missing GPU halfway through its work. Under
``torchrun`` each process takes the GPU of its local rank.
"""

from __future__ import annotations

import os
import re

import torch

from saeguard.errors import ConfigError

DEVICE_HELP = (
    "Torch device: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps; under "
    "torchrun each process takes the GPU of its local rank."
)
"""The help line of every command's ``--device``."""

_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device_name(name: str) -> None:
    """Fail in one line for a word that names no device (the availability is checked later,
    by :func:`resolve_device`)."""
    if not _PATTERN.match(name):
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps")


def local_rank() -> int:
    """This process's rank on its node under torchrun (0 otherwise)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def resolve_device(name: str) -> torch.device:
    """The device ``name`` means on this machine; one clear line when it is not here."""
    check_device_name(name)
    if name == "auto":
        return (
            torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")
        )
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError("--device mps: this machine has no Apple GPU (MPS); use --device cpu")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"--device {name}: this machine has no CUDA GPU (or this torch build has no CUDA); "
            "use --device cpu, or auto to use a GPU only where there is one"
        )
    index = int(name.split(":")[1]) if ":" in name else local_rank()
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            f"--device {name}: this machine has {count} CUDA GPU(s), numbered 0 to {count - 1}"
        )
    return torch.device("cuda", index)


def describe_device(device: torch.device) -> str:
    """What to record in outputs: the device and, for a GPU, its name."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def autocast_device_type(device: torch.device) -> str:
    """The device type ``torch.autocast`` takes for ``device``."""
    return "cuda" if device.type == "cuda" else "cpu" if device.type != "mps" else "mps"
