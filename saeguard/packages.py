"""Finding the files of installed model and data packages without importing them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from saeguard.errors import MissingPackageError


def package_dir(module: str, pip_args: str, what: str) -> Path:
    """Directory of an installed package, found with ``find_spec`` (the package is not run).

    A missing package raises :class:`MissingPackageError` with ``pip install {pip_args}``.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(what, pip_args)
    return Path(next(iter(spec.submodule_search_locations)))
