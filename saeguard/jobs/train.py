"""`saeguard train`: activation source + SAE grid + trainer, then a held-out evaluation."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from saeguard import __version__
from saeguard.activations import (
    ActivationSourceConfig,
    CachedActivationSource,
    ModelActivationSource,
    ShuffleBuffer,
)
from saeguard.activations.cache import ActivationCache
from saeguard.configs import EXTRA_OPTIONS
from saeguard.defaults import DEFAULT_EXPANSION, DEFAULT_K
from saeguard.devices import describe_device, resolve_device
from saeguard.distributed import join_world, part_ways
from saeguard.errors import ConfigError
from saeguard.fileio import atomic_write_json, claim_output_directory
from saeguard.sae import (
    ARCHITECTURES,
    SAEConfig,
    SparseAutoencoder,
    architecture_options,
    create_sae,
    make_sae_config,
)
from saeguard.sae.config import SAELossSettings
from saeguard.train.evaluate import evaluate_reconstruction, held_out_activations
from saeguard.train.trainer import Trainer, TrainerConfig

log = logging.getLogger(__name__)

TRAIN_INDEX = ("train_results.json", "cfg.json", "checkpoint", "metrics.jsonl")
"""Files by which an output of an older saeguard (before output markers) is recognised."""


@dataclass(kw_only=True)
class TrainJobConfig(ActivationSourceConfig, TrainerConfig):
    """A training run: where activations come from, which SAEs, and how to optimise them."""

    out: str
    """Output directory: the SAE (or one sub-directory per SAE), metrics and checkpoints."""
    acts: str = ""
    """Train from this activation cache (from `saeguard harvest`) instead of running the model."""
    architectures: list[str] = field(default_factory=lambda: ["topk"])
    """SAE architectures; several values train several SAEs from one activation stream."""
    k: list[int] = field(default_factory=lambda: [DEFAULT_K])
    """Active latents per token (TopK, MP; mean for BatchTopK, Matryoshka); several allowed."""
    expansion: list[int] = field(default_factory=lambda: [DEFAULT_EXPANSION])
    """Latents per input dimension (d_sae = expansion x d_in); several allowed."""
    sae: SAELossSettings = field(default_factory=SAELossSettings)
    """Loss settings every SAE of the job shares."""
    architecture_options: dict[str, Any] = field(
        default_factory=dict, metadata={EXTRA_OPTIONS: architecture_options}
    )
    """Settings of particular architectures by name (e.g. jumprelu_bandwidth): each goes to
    every trained architecture that has it (see `saeguard train --help`)."""
    eval_tokens: int = 16_384
    """Held-out activations (validation split, no masking) for the final FVU / L0 / dead report."""
    replicas: int = 1
    """SAEs per (architecture, k, expansion) that differ only in their initial weights (seeds)."""

    def __post_init__(self) -> None:
        ActivationSourceConfig.__post_init__(self)
        TrainerConfig.__post_init__(self)
        unknown = [a for a in self.architectures if a not in ARCHITECTURES]
        if unknown:
            raise ConfigError(
                f"unknown SAE architecture(s) {unknown}; choose from {', '.join(ARCHITECTURES)}"
            )
        if any(e < 1 for e in self.expansion):
            raise ConfigError(f"--expansion must be a positive integer, got {self.expansion}")
        if any(k < 1 for k in self.k):
            raise ConfigError(f"--k must be at least 1, got {self.k}")
        if self.eval_tokens < 0:
            raise ConfigError("--eval-tokens must be >= 0")
        if self.replicas < 1:
            raise ConfigError(f"--replicas must be at least 1, got {self.replicas}")
        known = architecture_options() if self.architecture_options else {}
        for option in self.architecture_options:
            if option not in known:
                raise ConfigError(
                    f"unknown architecture setting {option!r}; choose from {', '.join(known)}"
                )
            if not set(known[option].architectures) & set(self.architectures):
                owners = ", ".join(known[option].architectures)
                log.warning("--%s only applies to %s, not trained here", option, owners)

    def _cells(self) -> Iterator[tuple[str, str, int, int]]:
        """(name, architecture, k, expansion) of every SAE, in training order."""
        grid = itertools.product(self.architectures, self.k, self.expansion, range(self.replicas))
        for arch, k, expansion, replica in grid:
            # Each SAE's initial weights follow from its name, so replicas differ by suffix.
            suffix = f"_s{replica}" if self.replicas > 1 else ""
            yield f"{arch}_k{k}_x{expansion}{suffix}", arch, k, expansion

    def sae_names(self) -> list[str]:
        """Names of the SAEs this job trains (their sub-directories when there are several)."""
        return [name for name, *_ in self._cells()]

    def sae_configs(self, d_in: int) -> dict[str, SAEConfig]:
        """One SAE config per (architecture, k, expansion); impossible ones fail here."""
        configs = {}
        for name, arch, k, expansion in self._cells():
            configs[name] = make_sae_config(  # settings an architecture lacks are left out
                arch,
                strict=False,
                d_in=d_in,
                d_sae=d_in * expansion,
                k=k,
                **asdict(self.sae),
                **self.architecture_options,
            )
        return configs


def source_config_from_cache(job: TrainJobConfig, cache: ActivationCache) -> TrainJobConfig:
    """The job with its source fields replaced by those the cache was harvested with."""
    recorded = cache.manifest["config"]
    fields = {f.name for f in dataclasses.fields(ActivationSourceConfig)}
    overrides = {k: v for k, v in recorded.items() if k in fields}
    return dataclasses.replace(job, **overrides)


def run_training(job: TrainJobConfig) -> dict[str, Any]:
    """Train every SAE of the job, evaluate on held-out text, write ``train_results.json``.

    Under torchrun each rank computes its share of the activations (model forwards or cache
    shards), every rank sees every global batch and trains on its share of it, and rank 0
    alone writes; the other ranks return an empty dict.
    """
    device = resolve_device(job.device)
    world = join_world(device)
    world.on_main(lambda: claim_output_directory(Path(job.out), "train", index=TRAIN_INDEX))
    hook = job.hooks[0]
    if job.acts:
        cache_hooks = _cache_hooks(job)
        if hook not in cache_hooks:
            log.warning("hook %s is not in %s: training on its %s", hook, job.acts, cache_hooks[0])
        cached = CachedActivationSource(
            job.acts, hook=hook if hook in cache_hooks else None, cycle=job.repeat
        )
        hook = cached.hook
        source_job = source_config_from_cache(job, cached.cache)
        source: Any = cached
        d_in = cached.d_model
        provenance = {
            "source": "cache",
            "acts": str(job.acts),
            "exclusions": cached.cache.manifest["exclusions"],
            "masking": cached.cache.manifest.get("masking", {"mask_prob": 0.0}),
        }
    else:
        live = ModelActivationSource(job, hook=hook)
        source_job, source, d_in = job, live, live.d_model
        provenance = {"source": "model"}
    saes: dict[str, SparseAutoencoder] = {
        name: create_sae(cfg) for name, cfg in job.sae_configs(d_in).items()
    }
    metadata = {
        "model": source_job.model,
        "hook": hook,
        "corpus": source_job.corpus,
        "split": source_job.split,
        "ctx_len": source_job.ctx_len,
        "prepend_bos": source_job.prepend_bos,
        "saeguard_version": __version__,
        "device": describe_device(device),
        **world.describe(),
        **provenance,
    }
    # Under torchrun every rank holds the whole stream, each chunk computed once by its owner,
    # so the shuffled global batches are those of one process.
    chunks = world.replicate(source.chunks(world)) if world.distributed else source
    batches = ShuffleBuffer(chunks, job.batch_tokens, job.buffer_tokens, seed=job.train_seed)
    trainer = Trainer(saes, job, job.out, metadata, device=device, world=world)
    on_step = None
    if isinstance(source, ModelActivationSource):
        trainer.metadata["masking"] = source.describe()["masking"]

        def on_step(trainer: Trainer) -> None:  # checkpoints carry the stream's counts so far
            described = source.describe()
            trainer.metadata["masking"] = described["masking"]
            trainer.metadata["exclusions"] = described["exclusions"]

    trainer.fit(batches, on_step=on_step)
    ranks = world.describe()
    world = part_ways(world)  # rank 0 evaluates alone
    if not world.is_main:
        return {}
    if isinstance(source, ModelActivationSource) and trainer.trained_steps:
        # The final masked fraction and thresholds, known once the stream has been read.
        trainer.metadata["masking"] = source.describe()["masking"]
        trainer.metadata["exclusions"] = source.describe()["exclusions"]
        trainer.save_all()
    masking = trainer.metadata.get("masking", {})
    if masking.get("mask_prob", 0) > 0:
        log.info(
            "masked regularization: %.4f of eligible tokens were masked (p=%s)",
            masking.get("masked_fraction", float("nan")),
            masking["mask_prob"],
        )
    results: dict[str, Any] = {
        "training_tokens": trainer.step * job.batch_tokens,
        "tokens_per_s": trainer.tokens_per_s,
        "device": describe_device(device),
        **ranks,
        "masking": masking,
        "saes": {},
    }
    if source_job.split in ("all", "validation") and job.eval_tokens > 0:
        log.warning(
            "the held-out report reads the validation split, which this run trained on "
            "(--split %s): its numbers are not held out",
            source_job.split,
        )
    medians = (trainer.metadata.get("exclusions") or {}).get("median_norms")
    held_out = held_out_activations(source_job, hook, job.eval_tokens, medians)
    for name in saes:
        entry: dict[str, Any] = {"final_train": trainer.history.get(name, {})}
        if held_out is not None:
            entry["held_out"] = evaluate_reconstruction(trainer.folded(name), held_out)
        results["saes"][name] = entry
    atomic_write_json(Path(job.out) / "train_results.json", results)
    return results


def _cache_hooks(job: TrainJobConfig) -> list[str]:
    return ActivationCache.open(job.acts).hooks
