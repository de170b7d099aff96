"""Harvest activations into a sharded, checksummed, resumable on-disk cache.

The context stream is deterministic (seeded document order, fixed packing), and each shard covers
a fixed range of contexts, so a shard's bytes depend only on the arguments: a harvest killed at
any point and run again with the same arguments skips the shards already on disk and produces a
cache whose checksums equal those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterator
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
    check_shard,
    load_shard,
    read_manifest,
    shard_name,
    write_manifest,
    write_shard,
)
from saeguard.activations.source import (
    ActivationHarvester,
    ActivationSourceConfig,
    PreparedSource,
    prepare,
)
from saeguard.configs import config_to_dict
from saeguard.devices import describe_device, resolve_device
from saeguard.distributed import World, join_world
from saeguard.errors import ConfigError, SaeguardError
from saeguard.fileio import LOCK_FILE, output_lock, remove_stale_temporaries
from saeguard.models import LoadedModel

log = logging.getLogger(__name__)

CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Settings that do not change a cache's content; every other field must match to resume.
# (The device type is compared through the content fingerprint instead.)
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
    """Replace a cache in --out made with other arguments or inputs (only its files are deleted)."""

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

    A complete cache made with the same arguments is returned without loading anything. An
    unfinished one is resumed if its arguments *and* content fingerprints (model weights, corpus
    text, device type) match. ``after_shard`` is called with each newly written shard's number
    (tests use it to simulate a crash between shards).
    """
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SaeguardError(f"--out {out} is an existing file; pass a directory for the cache")
    previous = _peek_manifest(out)
    if previous is not None and previous.get("config") == cfg.identity():
        present = all((out / e["file"]).is_file() for e in previous["shards"])
        if previous.get("complete") and present:
            cache = ActivationCache(out, previous)
            cache.verify()  # "complete" must mean intact: a corrupt shard is named now
            log.info("%s already holds a complete, verified cache for these arguments", out)
            return cache
    elif previous is not None and not cfg.overwrite:
        raise _different_arguments_error(out, previous, cfg)

    world = join_world(loaded.device if loaded is not None else resolve_device(cfg.device))
    prepared = prepare(cfg, loaded)  # loads and checks everything before touching the disk
    fingerprint = prepared.fingerprint()
    harvester = ActivationHarvester(prepared.loaded, cfg.hooks, prepared.rules, prepared.masking)
    contexts = prepared.contexts()
    calibration = list(itertools.islice(contexts, cfg.calibration_contexts))
    if not calibration:
        raise ConfigError(f"corpus {cfg.corpus!r} is shorter than one {cfg.ctx_len}-token context")
    with contextlib.ExitStack() as held:

        def start() -> None:
            """Rank 0 takes the folder, and writes a new manifest or checks the one to resume
            while the other ranks wait."""
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(output_lock(out))
            manifest = _resume_manifest(cfg, out, fingerprint)
            removed = remove_stale_temporaries(out)
            if manifest is None:
                if cfg.outlier_multiple > 0:
                    harvester.calibrate(calibration, cfg.batch_size)
                write_manifest(out, _new_manifest(cfg, prepared, harvester, fingerprint))
            else:
                log.info(
                    "resuming %s: %d shards done%s",
                    out,
                    len(manifest["shards"]),
                    f", {removed} partial files removed" if removed else "",
                )
                write_manifest(out, manifest)  # without the shards found missing or corrupt

        world.on_main(start)
        manifest = read_manifest(out)
        harvester.rules.median_norms = {
            h: manifest["hooks"][h]["median_norm"]
            for h in cfg.hooks
            if manifest["hooks"][h]["median_norm"] is not None
        }
        _fill_shards(cfg, harvester, itertools.chain(calibration, contexts), manifest, out,
                     after_shard, world)  # fmt: skip
    return ActivationCache(out, manifest)


def _fill_shards(
    cfg: HarvestConfig,
    harvester: ActivationHarvester,
    stream: Iterator[list[int]],
    manifest: dict[str, Any],
    out: Path,
    after_shard: Callable[[int], None] | None,
    world: World,
) -> None:
    """Walk the shards in order, computing the ones not on disk, until every hook is full.

    Shards go in rounds of one per rank (shard ``i`` is rank ``i % size``'s). A rank computes
    its shard against the totals known when the round starts; once the round's entries are
    gathered, the shard where a hook fills up is cut to what one process would have kept and
    shards past the end are removed, so the cache is the one a single process writes.
    """
    done = {entry["index"]: entry for entry in manifest["shards"]}
    totals = dict.fromkeys(cfg.hooks, 0)
    cache_dtype = CACHE_DTYPES[cfg.cache_dtype]
    bar = tqdm(
        total=cfg.tokens,
        unit="tok",
        unit_scale=True,
        desc=f"harvest {','.join(cfg.hooks)}",
        dynamic_ncols=True,
        disable=not world.is_main or None,
    )
    started, forward_tokens = time.perf_counter(), 0
    first_shard = 0
    try:
        while min(totals.values()) < cfg.tokens:
            rounds = [list(itertools.islice(stream, cfg.shard_contexts)) for _ in range(world.size)]
            index = first_shard + world.rank
            mine, fresh = done.get(index), False
            if mine is None and rounds[world.rank]:
                first_context = index * cfg.shard_contexts
                mine = _compute_shard(cfg, harvester, rounds[world.rank], first_context, totals,
                                      cache_dtype, out, index)  # fmt: skip
                fresh = True
                forward_tokens += len(rounds[world.rank]) * cfg.ctx_len
            keep = _cut_plan(cfg, world.gather_json(mine), totals)[world.rank]
            final = mine
            if fresh and mine is not None:
                if keep is None:  # past the end: one process never wrote it
                    (out / mine["file"]).unlink(missing_ok=True)
                    final = None
                elif keep != mine["counts"]:
                    final = _cut_shard(out, mine, keep)
            entries = world.gather_json({"entry": final, "fresh": fresh})
            for item in entries:
                entry = item["entry"]
                if entry is None:
                    continue
                if item["fresh"]:
                    manifest["shards"].append(entry)
                for hook in cfg.hooks:
                    totals[hook] += int(entry["counts"].get(hook, 0))
            if any(item["fresh"] for item in entries):
                manifest["world_size"] = world.size
                manifest["shards"].sort(key=lambda e: e["index"])
                if world.is_main:
                    write_manifest(out, manifest)
            if after_shard is not None and fresh and final is not None:
                after_shard(final["index"])
            bar.n = min(min(totals.values()), cfg.tokens)
            elapsed = time.perf_counter() - started
            bar.set_postfix(forward=f"{forward_tokens / max(elapsed, 1e-9):,.0f} tok/s")
            bar.refresh()
            first_shard += world.size
    finally:
        bar.close()
    manifest["complete"] = True
    manifest["token_counts"] = totals
    if manifest.get("masking", {}).get("mask_prob", 0) > 0:
        masked = sum(e.get("masked_tokens", 0) for e in manifest["shards"])
        eligible = sum(e.get("eligible_tokens", 0) for e in manifest["shards"])
        manifest["masking"]["masked_fraction"] = masked / max(eligible, 1)
    manifest["contexts"] = sum(e["contexts"][1] - e["contexts"][0] for e in manifest["shards"])
    if world.is_main:
        write_manifest(out, manifest)
    world.barrier()  # every rank returns the finished cache
    elapsed = time.perf_counter() - started
    log.info(
        "harvest complete: %s tokens per hook in %s (%d shards, %.1fs, %.0f forward tok/s)",
        cfg.tokens,
        out,
        len(manifest["shards"]),
        elapsed,
        forward_tokens / max(elapsed, 1e-9),
    )


def _cut_plan(
    cfg: HarvestConfig, entries: list[dict[str, Any] | None], totals: dict[str, int]
) -> list[dict[str, int] | None]:
    """Per shard of a round, the activations per hook one process would have kept (None: a
    shard past the end); fails as one process does when the corpus ran out first."""
    running = dict(totals)
    plan: list[dict[str, int] | None] = []
    for entry in entries:
        if min(running.values()) >= cfg.tokens:
            plan.append(None)
            continue
        if entry is None:
            raise SaeguardError(
                f"corpus {cfg.corpus!r} ({cfg.split}) ran out after {min(running.values())} "
                f"of {cfg.tokens} tokens; pass --repeat, lower --tokens or use a larger corpus"
            )
        pending = [h for h in cfg.hooks if running[h] < cfg.tokens]
        keep = {h: min(int(entry["counts"].get(h, 0)), cfg.tokens - running[h]) for h in pending}
        for hook, count in keep.items():
            running[hook] += count
        plan.append(keep)
    return plan


def _cut_shard(out: Path, entry: dict[str, Any], keep: dict[str, int]) -> dict[str, Any]:
    """Rewrite a shard with only ``keep[hook]`` activations of each hook, as one process would
    have written it; return its new manifest entry."""
    tensors = load_shard(out, entry)
    cut: dict[str, torch.Tensor] = {"tokens": tensors["tokens"]}
    for hook, count in keep.items():
        cut[f"acts.{hook}"] = tensors[f"acts.{hook}"][:count]
        cut[f"index.{hook}"] = tensors[f"index.{hook}"][:count]
    digest = write_shard(out / entry["file"], cut)
    return {**entry, "counts": dict(keep), "sha256": digest,
            "bytes": (out / entry["file"]).stat().st_size}  # fmt: skip


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
    masked_before, eligible_before = harvester.masked_tokens, harvester.eligible_tokens
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
        "masked_tokens": harvester.masked_tokens - masked_before,
        "eligible_tokens": harvester.eligible_tokens - eligible_before,
        "index": shard,
        "file": name,
        "contexts": [first_context, first_context + len(contexts)],
        "counts": counts,
        "sha256": digest,
        "bytes": (out / name).stat().st_size,
    }


def _new_manifest(
    cfg: HarvestConfig,
    prepared: PreparedSource,
    harvester: ActivationHarvester,
    fingerprint: dict[str, str],
) -> dict[str, Any]:
    rules, loaded = harvester.rules, prepared.loaded
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "saeguard_version": __version__,
        "config": cfg.identity(),
        "fingerprint": fingerprint,
        "model": cfg.model,
        "model_family": loaded.family,
        "n_layers": loaded.n_layers,
        "corpus": cfg.corpus,
        "split": cfg.split,
        "dtype": cfg.dtype,
        "cache_dtype": cfg.cache_dtype,
        "ctx_len": cfg.ctx_len,
        "packing": dataclasses.asdict(prepared.spec),
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
        "masking": prepared.masking.to_dict() if prepared.masking else {"mask_prob": 0.0},
        "device": describe_device(loaded.device),
    }


def _is_bookkeeping(path: Path) -> bool:
    """Our lock file and temporaries left by an interrupted atomic write."""
    return path.name == LOCK_FILE or (path.name.startswith(".") and path.name.endswith(".tmp"))


def _peek_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest in ``out``, or None when there is no cache yet; refuses foreign folders."""
    if not out.exists():
        return None
    if not (out / MANIFEST).exists():
        if any(not _is_bookkeeping(p) for p in out.iterdir()):
            raise SaeguardError(
                f"{out} exists, is not empty and is not an activation cache; "
                "choose another --out (nothing was written)"
            )
        return None
    return read_manifest(out)


def _different_arguments_error(
    out: Path, manifest: dict[str, Any], cfg: HarvestConfig
) -> SaeguardError:
    old, new = manifest.get("config", {}), cfg.identity()
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return SaeguardError(
        f"{out} holds a cache made with different arguments (differs in: {', '.join(diff)}). "
        "Use another --out, or --overwrite to replace it."
    )


def _resume_manifest(
    cfg: HarvestConfig, out: Path, fingerprint: dict[str, str]
) -> dict[str, Any] | None:
    """Under the lock: the manifest to resume from, or None to start a fresh cache."""
    if not (out / MANIFEST).exists():
        return None
    manifest = read_manifest(out)
    same_args = manifest.get("config") == cfg.identity()
    old_print = manifest.get("fingerprint", {})
    if same_args and old_print == fingerprint:
        kept = []
        for entry in manifest["shards"]:
            path = out / entry["file"]
            if not path.is_file():
                log.warning("shard %s is missing: it will be recomputed", entry["file"])
                manifest["complete"] = False
                continue
            check_shard(out, entry)
            kept.append(entry)
        manifest["shards"] = kept
        return manifest
    if not cfg.overwrite:
        if not same_args:
            raise _different_arguments_error(out, manifest, cfg)
        changed = sorted(k for k in fingerprint if old_print.get(k) != fingerprint[k])
        raise SaeguardError(
            f"{out} holds an unfinished cache whose inputs changed since it was started "
            f"({', '.join(changed)} differ): resuming would mix old and new activations. "
            "Use another --out, or --overwrite to start it again."
        )
    log.warning("--overwrite: replacing the cache in %s", out)
    _delete_cache_files(out, manifest)
    return None


def _delete_cache_files(out: Path, manifest: dict[str, Any]) -> None:
    """Remove the manifest and shards of a cache, and nothing else in the folder."""
    names = {e["file"] for e in manifest.get("shards", [])}
    names |= {p.name for p in out.glob("shard_*.safetensors")}
    for name in names:
        (out / name).unlink(missing_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
