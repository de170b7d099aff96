"""Harvest activations into a sharded, checksummed, resumable on-disk cache.

The context stream is deterministic (seeded document order, fixed packing), and each shard covers
a fixed range of contexts, so a shard's bytes depend only on the arguments: a harvest killed at
any point and run again with the same arguments skips the shards already on disk and produces a
cache whose checksums equal those of an uninterrupted run.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from saeguard import __version__
from saeguard.activations.cache import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    ActivationCache,
    corrupt_shard_error,
    read_manifest,
    shard_name,
    write_manifest,
    write_shard,
)
from saeguard.activations.source import ActivationHarvester, ActivationSourceConfig, prepare
from saeguard.configs import config_to_dict
from saeguard.errors import ConfigError, SaeguardError
from saeguard.fileio import remove_stale_temporaries, sha256_file
from saeguard.models import LoadedModel

log = logging.getLogger(__name__)

CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Settings that do not change a cache's content; every other field must match to resume.
_NOT_IDENTITY = {"out", "overwrite", "device", "threads"}


@dataclass(kw_only=True)
class HarvestConfig(ActivationSourceConfig):
    """A harvest: an activation source plus how much to cache and where."""

    out: str
    """Directory of the activation cache (created; an unfinished one is resumed)."""
    tokens: int = 200_000
    """Activations to cache per hook, counted after exclusions."""
    shard_tokens: int = 32_768
    """Approximate tokens per shard (the unit of checkpointing and checksums)."""
    cache_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype of the stored activations (float16/bfloat16 halve the disk use)."""
    overwrite: bool = False
    """Delete an existing cache made with different arguments instead of refusing."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tokens < 1:
            raise ConfigError(f"--tokens must be positive, got {self.tokens}")
        if self.shard_tokens < self.ctx_len:
            raise ConfigError(
                f"--shard-tokens ({self.shard_tokens}) must be at least --ctx-len ({self.ctx_len})"
            )
        if not self.out:
            raise ConfigError("--out is required: the directory to write the cache to")

    @property
    def shard_contexts(self) -> int:
        return self.shard_tokens // self.ctx_len

    def identity(self) -> dict[str, Any]:
        """The fields that determine the cache's content."""
        return {k: v for k, v in config_to_dict(self).items() if k not in _NOT_IDENTITY}


def harvest(
    cfg: HarvestConfig,
    loaded: LoadedModel | None = None,
    after_shard: Callable[[int], None] | None = None,
) -> ActivationCache:
    """Run (or resume) a harvest and return the finished cache.

    ``after_shard`` is called with each newly written shard's number (tests use it to simulate a
    crash between shards).
    """
    out = Path(cfg.out)
    manifest = _existing_manifest(cfg, out)
    if manifest is not None and manifest.get("complete"):
        log.info("%s already holds a complete cache for these arguments", out)
        return ActivationCache(out, manifest)

    loaded, spec, contexts, rules = prepare(cfg, loaded)
    harvester = ActivationHarvester(loaded, cfg.hooks, rules)
    calibration = list(itertools.islice(contexts, cfg.calibration_contexts))
    if not calibration:
        raise ConfigError(f"corpus {cfg.corpus!r} is shorter than one {cfg.ctx_len}-token context")

    if manifest is None:
        if cfg.outlier_multiple > 0:
            harvester.calibrate(calibration, cfg.batch_size)
        manifest = _new_manifest(cfg, loaded, spec.__dict__, harvester)
        out.mkdir(parents=True, exist_ok=True)
        write_manifest(out, manifest)
    else:
        rules.median_norms = {h: manifest["hooks"][h]["median_norm"] for h in cfg.hooks}
        removed = remove_stale_temporaries(out)
        log.info(
            "resuming %s: %d shards done%s",
            out,
            len(manifest["shards"]),
            f", {removed} partial files removed" if removed else "",
        )

    done = {entry["index"]: entry for entry in manifest["shards"]}
    totals = dict.fromkeys(cfg.hooks, 0)
    stream = itertools.chain(calibration, contexts)
    cache_dtype = CACHE_DTYPES[cfg.cache_dtype]
    bar = tqdm(
        total=cfg.tokens,
        unit="tok",
        unit_scale=True,
        desc=f"harvest {','.join(cfg.hooks)}",
        dynamic_ncols=True,
    )
    started, forward_tokens = time.perf_counter(), 0
    shard = 0
    try:
        while min(totals.values()) < cfg.tokens:
            batch_contexts = list(itertools.islice(stream, cfg.shard_contexts))
            if not batch_contexts:
                raise SaeguardError(
                    f"corpus {cfg.corpus!r} ({cfg.split}) ran out after {min(totals.values())} "
                    f"of {cfg.tokens} tokens; pass --repeat, lower --tokens or use a larger corpus"
                )
            first_context = shard * cfg.shard_contexts
            entry = done.get(shard)
            if entry is None:
                entry = _compute_shard(
                    cfg, harvester, batch_contexts, first_context, totals, cache_dtype, out, shard
                )
                manifest["shards"].append(entry)
                manifest["shards"].sort(key=lambda e: e["index"])
                write_manifest(out, manifest)
                forward_tokens += len(batch_contexts) * cfg.ctx_len
                if after_shard is not None:
                    after_shard(shard)
            for hook in cfg.hooks:
                totals[hook] += int(entry["counts"].get(hook, 0))
            bar.n = min(min(totals.values()), cfg.tokens)
            elapsed = time.perf_counter() - started
            bar.set_postfix(forward=f"{forward_tokens / max(elapsed, 1e-9):,.0f} tok/s")
            bar.refresh()
            shard += 1
    finally:
        bar.close()

    manifest["complete"] = True
    manifest["token_counts"] = totals
    manifest["contexts"] = shard * cfg.shard_contexts
    write_manifest(out, manifest)
    elapsed = time.perf_counter() - started
    log.info(
        "harvest complete: %s tokens per hook in %s (%d shards, %.1fs, %.0f forward tok/s)",
        cfg.tokens,
        out,
        shard,
        elapsed,
        forward_tokens / max(elapsed, 1e-9),
    )
    return ActivationCache(out, manifest)


def _compute_shard(
    cfg: HarvestConfig,
    harvester: ActivationHarvester,
    contexts: list[list[int]],
    first_context: int,
    totals: dict[str, int],
    cache_dtype: torch.dtype,
    out: Path,
    shard: int,
) -> dict[str, Any]:
    """Run the model over one shard's contexts and write the shard; return its manifest entry."""
    pending = [h for h in cfg.hooks if totals[h] < cfg.tokens]
    acts: dict[str, list[torch.Tensor]] = {h: [] for h in pending}
    index: dict[str, list[torch.Tensor]] = {h: [] for h in pending}
    for start in range(0, len(contexts), cfg.batch_size):
        tokens = torch.tensor(contexts[start : start + cfg.batch_size], dtype=torch.long)
        kept = harvester.kept(tokens, first_context + start)
        for hook in pending:
            acts[hook].append(kept[hook][0])
            index[hook].append(kept[hook][1])
    tensors: dict[str, torch.Tensor] = {
        "tokens": torch.tensor(contexts, dtype=torch.int32),
    }
    counts = {}
    for hook in pending:
        need = cfg.tokens - totals[hook]
        hook_acts = torch.cat(acts[hook])[:need]
        tensors[f"acts.{hook}"] = hook_acts.to(cache_dtype)
        tensors[f"index.{hook}"] = torch.cat(index[hook])[:need].long()
        counts[hook] = len(hook_acts)
    name = shard_name(shard)
    digest = write_shard(out / name, tensors)
    return {
        "index": shard,
        "file": name,
        "contexts": [first_context, first_context + len(contexts)],
        "counts": counts,
        "sha256": digest,
        "bytes": (out / name).stat().st_size,
    }


def _new_manifest(
    cfg: HarvestConfig,
    loaded: LoadedModel,
    packing: dict[str, Any],
    harvester: ActivationHarvester,
) -> dict[str, Any]:
    rules = harvester.rules
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "saeguard_version": __version__,
        "config": cfg.identity(),
        "model": cfg.model,
        "model_family": loaded.family,
        "n_layers": loaded.n_layers,
        "corpus": cfg.corpus,
        "split": cfg.split,
        "dtype": cfg.dtype,
        "cache_dtype": cfg.cache_dtype,
        "ctx_len": cfg.ctx_len,
        "packing": packing,
        "exclusions": rules.to_dict(),
        "hooks": {
            h: {
                "d_model": loaded.d_model,
                "median_norm": rules.median_norms.get(h),
                "outlier_threshold": rules.threshold(h) if rules.median_norms else None,
            }
            for h in cfg.hooks
        },
        "tokens_per_hook": cfg.tokens,
        "shards": [],
        "complete": False,
    }


def _existing_manifest(cfg: HarvestConfig, out: Path) -> dict[str, Any] | None:
    """The manifest to resume from, or None to start fresh (after --overwrite checks)."""
    if not out.exists():
        return None
    if not (out / MANIFEST).exists():
        if any(out.iterdir()):
            raise SaeguardError(
                f"{out} exists, is not empty and is not an activation cache; "
                "choose another --out (nothing was written)"
            )
        return None
    manifest = read_manifest(out)
    if manifest.get("config") == cfg.identity():
        kept = []
        for entry in manifest["shards"]:
            path = out / entry["file"]
            if not path.is_file():
                log.warning("shard %s is missing: it will be recomputed", entry["file"])
                manifest["complete"] = False
                continue
            if sha256_file(path) != entry["sha256"]:
                raise corrupt_shard_error(out, entry["file"], "SHA-256 mismatch")
            kept.append(entry)
        manifest["shards"] = kept
        return manifest
    if not cfg.overwrite:
        old = manifest.get("config", {})
        diff = sorted(
            k for k in set(old) | set(cfg.identity()) if old.get(k) != cfg.identity().get(k)
        )
        raise SaeguardError(
            f"{out} holds a cache made with different arguments (differs in: {', '.join(diff)}). "
            "Use another --out, or --overwrite to delete it."
        )
    log.warning("--overwrite: deleting the cache in %s made with other arguments", out)
    shutil.rmtree(out)
    return None
