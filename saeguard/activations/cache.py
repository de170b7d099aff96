"""The sharded on-disk activation cache.

Layout of a cache directory::

    manifest.json              model, hooks, dtype, corpus, split, exclusions, token counts,
                               and one entry per finished shard with its SHA-256
    shard_00000.safetensors    tokens [contexts, ctx_len] int32, and per hook H:
                               acts.H [n, d] and index.H [n] int64 (context * ctx_len + position)

Shards and the manifest are written atomically (temporary file + rename), and a shard is listed
in the manifest only after it is on disk, so a crash at any moment leaves a consistent cache that
the same harvest command completes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saeguard.errors import CorruptFileError, SaeguardError
from saeguard.fileio import (
    atomic_path,
    atomic_write_json,
    check_schema,
    read_json,
    sha256_file,
)

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = Path(__file__).with_name("manifest.schema.json")
"""JSON schema of ``manifest.json``."""
FORMAT = "saeguard-activation-cache"
FORMAT_VERSION = 1


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write one shard atomically and return its SHA-256."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        digest = sha256_file(tmp)
    return digest


def read_manifest(directory: Path) -> dict[str, Any]:
    """Parse a cache manifest, with clear errors for a missing or corrupt one."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise SaeguardError(
            f"{directory} is not an activation cache (no {MANIFEST}); "
            "create one with `saeguard harvest ... --out DIR`"
        )
    manifest = read_json(
        path,
        "activation-cache manifest",
        f"If {directory} is a saeguard activation cache, its manifest is corrupt: move the "
        "folder aside and run the harvest again.",
    )
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptFileError(f"{path} is not a saeguard activation-cache manifest")
    version = manifest.get("format_version", 0)
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise SaeguardError(
            f"{path} was written by a newer saeguard (format {version}); "
            "upgrade saeguard to read it"
        )
    # The schema also pins every shard's "file" to a plain shard_NNNNN.safetensors name: a path
    # read from the manifest is never used to read, write or delete anything else.
    check_schema(manifest, MANIFEST_SCHEMA, path,
                 "Move the folder aside and run the harvest again.")  # fmt: skip
    return dict(manifest)


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(Path(directory) / MANIFEST, manifest)


def corrupt_shard_error(directory: Path, name: str, reason: str) -> CorruptFileError:
    return CorruptFileError(
        f"shard {name} of the activation cache {directory} is corrupt ({reason}). Fix: delete "
        f"{Path(directory) / name} and re-run the same `saeguard harvest` command; only the "
        "missing shard is recomputed."
    )


_VERIFIED: dict[tuple[str, int, int], str] = {}
"""Shards whose SHA-256 this process has checked, by (path, size, mtime): a training run that
cycles over a cache hashes each shard once, not once per pass."""


def check_shard(directory: Path, entry: dict[str, Any]) -> Path:
    """The path of a shard whose size and SHA-256 match the manifest (size first: it is free)."""
    path = Path(directory) / entry["file"]
    try:
        status = path.stat()
    except OSError:
        raise corrupt_shard_error(directory, entry["file"], "file missing") from None
    if status.st_size != entry["bytes"]:
        reason = f"{status.st_size:,} bytes where the manifest says {entry['bytes']:,}"
        raise corrupt_shard_error(directory, entry["file"], reason)
    key = (str(path.resolve()), status.st_size, status.st_mtime_ns)
    if _VERIFIED.get(key) != entry["sha256"]:
        if sha256_file(path) != entry["sha256"]:
            raise corrupt_shard_error(directory, entry["file"], "SHA-256 mismatch")
        _VERIFIED[key] = entry["sha256"]
    return path


def load_shard(directory: Path, entry: dict[str, Any], verify: bool = True) -> dict[str, Any]:
    """Load a shard's tensors, checking its size and SHA-256 against the manifest first."""
    path = Path(directory) / entry["file"]
    if verify:
        check_shard(directory, entry)
    elif not path.is_file():
        raise corrupt_shard_error(directory, entry["file"], "file missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise corrupt_shard_error(directory, entry["file"], f"unreadable: {exc}") from exc


@dataclass
class ActivationCache:
    """Read access to a finished (or partial) activation cache."""

    directory: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, directory: str | Path) -> ActivationCache:
        directory = Path(directory)
        return cls(directory, read_manifest(directory))

    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def shards(self) -> list[dict[str, Any]]:
        return list(self.manifest["shards"])

    def d_model(self, hook: str) -> int:
        return int(self.manifest["hooks"][self._check_hook(hook)]["d_model"])

    def n_tokens(self, hook: str) -> int:
        hook = self._check_hook(hook)
        return sum(int(s["counts"].get(hook, 0)) for s in self.shards)

    def _check_hook(self, hook: str) -> str:
        if hook not in self.manifest["hooks"]:
            raise SaeguardError(
                f"hook {hook!r} is not in the cache {self.directory}; it holds: "
                f"{', '.join(self.hooks)}"
            )
        return hook

    def verify(self) -> None:
        """Check every shard's size and SHA-256; raises naming the first corrupt shard."""
        for entry in self.shards:
            check_shard(self.directory, entry)

    def iter_shards(
        self, hook: str, verify: bool = True, with_index: bool = False
    ) -> Iterator[Any]:
        """Yield each shard's activations [n, d] as float32 (with their indices if asked)."""
        hook = self._check_hook(hook)
        for entry in self.shards:
            if int(entry["counts"].get(hook, 0)) == 0:
                continue
            tensors = load_shard(self.directory, entry, verify=verify)
            acts = tensors[f"acts.{hook}"].float()
            yield (acts, tensors[f"index.{hook}"]) if with_index else acts

    def shard_activations(
        self, entry: dict[str, Any], hook: str, verify: bool = True
    ) -> torch.Tensor:
        """One shard's activations [n, d] of ``hook`` as float32."""
        return load_shard(self.directory, entry, verify=verify)[f"acts.{hook}"].float()

    def load(self, hook: str, verify: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """All activations [n, d] (float32) of one hook and their global token indices [n]."""
        parts = list(self.iter_shards(hook, verify=verify, with_index=True))
        if not parts:
            return torch.empty(0, self.d_model(hook)), torch.empty(0, dtype=torch.long)
        return torch.cat([a for a, _ in parts]), torch.cat([i for _, i in parts])

    def tokens(self, verify: bool = True) -> torch.Tensor:
        """Token ids [contexts, ctx_len] of every cached context, in order."""
        parts = [load_shard(self.directory, e, verify=verify)["tokens"] for e in self.shards]
        return torch.cat(parts).long()
