"""Train one or several SAEs from any iterator of activation batches.

The trainer knows nothing about where batches come from (a cache, a live model, a test's random
tensors). It implements what makes short SAE runs work: sign-SGD (or Adam) inside schedule-free
averaging, or LR warm-up and a final linear decay (see :mod:`saeguard.train.optim`); a
sparsity-coefficient warm-up, unit-norm decoder rows with the parallel gradient removed,
``b_dec`` initialised at the geometric median (or mean) of the first batch, inputs scaled so that
E|x|^2 = d_in (folded into the weights at save), dead-latent tracking feeding AuxK, gradient
clipping, checkpoints every N steps and every few minutes that resume to bit-identical weights,
a progress bar, a JSONL metrics log and optional TensorBoard / W&B logging.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from saeguard.configs import config_to_dict, validate_literals
from saeguard.devices import autocast_device_type
from saeguard.distributed import World
from saeguard.errors import ConfigError, CorruptFileError, MissingPackageError, SaeguardError
from saeguard.fileio import atomic_path, atomic_write_json, atomic_write_text, failpoint
from saeguard.sae import SparseAutoencoder, sae_config_from_dict
from saeguard.sae.base import batch_share, normalized_mse
from saeguard.sae.io import save_sae
from saeguard.steps import read_record, same_signature
from saeguard.train.optim import OptimizerName, SaeOptimizer, default_lr

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
# Settings that may change between an interrupted run and its resume.
# (The thread count stays in: it changes reduction order, so resumed weights would differ.)
_NOT_IDENTITY = {
    "out",
    "device",
    "eval_tokens",
    "logger",
    "log_every",
    "checkpoint_every",
    "checkpoint_minutes",
}


@dataclass(kw_only=True)
class TrainerConfig:
    """Optimisation settings shared by every SAE trained in one pass."""

    tokens: int = 2_000_000
    """Training activations per SAE (after exclusions and masking drops)."""
    batch_tokens: int = 4096
    """Activations per optimisation step."""
    optimizer: OptimizerName = "signsgd"
    """Update rule: signsgd (sign of the gradient) or adam; see docs/training.md."""
    schedule_free: bool = True
    """Wrap the optimiser in schedule-free averaging (replaces the LR decay; the saved SAE is
    the running average)."""
    sf_momentum: float = 0.95
    """Schedule-free interpolation momentum beta."""
    lr: float | None = None
    """Learning rate (none: the optimiser's width-aware default, signsgd 5e-3 and adam 3e-4 at
    16,384 latents, times sqrt(16384 / d_sae))."""
    lr_warmup_steps: int = 50
    """Steps of linear LR warm-up from 0 (capped at a tenth of the run)."""
    lr_decay_fraction: float = 0.2
    """Final fraction of the steps over which the LR decays linearly to 0 (without
    schedule-free only)."""
    sparsity_warmup_steps: int = 100
    """Steps of linear warm-up of the sparsity coefficient (relu, jumprelu)."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """Initial decoder bias: geometric median or mean of the first batch, or zeros."""
    normalize: bool = True
    """Scale inputs so E|x|^2 = d_in during training (folded into the saved weights)."""
    grad_clip: float = 1.0
    """Clip each SAE's gradient norm to this (0 disables; sign-SGD ignores the scale anyway)."""
    checkpoint_every: int = 100
    """Write a resumable checkpoint every this many steps (0 disables step checkpoints)."""
    checkpoint_minutes: float = 2.0
    """Also write one whenever this many minutes passed since the last (0 disables)."""
    log_every: int = 10
    """Write a metrics line every this many steps."""
    train_seed: int = 0
    """Seed of the SAE initialisation and of the shuffle buffer."""
    buffer_tokens: int = 262_144
    """Activations mixed in the shuffle buffer."""
    logger: Literal["none", "tensorboard", "wandb"] = "none"
    """Also log metrics to TensorBoard or Weights & Biases (needs the package)."""
    autocast_bf16: bool = False
    """Run SAE forward/backward under bfloat16 autocast (weights and Adam stay fp32)."""

    def __post_init__(self) -> None:
        validate_literals(self)
        if self.tokens < 1 or self.batch_tokens < 1:
            raise ConfigError("--tokens and --batch-tokens must be positive")
        if self.tokens < self.batch_tokens:
            raise ConfigError(
                f"--tokens ({self.tokens}) is less than one batch (--batch-tokens "
                f"{self.batch_tokens}): nothing would be trained"
            )
        if self.lr is not None and (self.lr <= 0 or not math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if not 0 < self.sf_momentum < 1:
            raise ConfigError(f"--sf-momentum must lie in (0, 1), got {self.sf_momentum}")
        if self.checkpoint_minutes < 0:
            raise ConfigError("--checkpoint-minutes must be >= 0")
        if not 0 <= self.lr_decay_fraction <= 1:
            raise ConfigError("--lr-decay-fraction must lie in [0, 1]")
        if self.buffer_tokens < 2 * self.batch_tokens:
            raise ConfigError("--buffer-tokens must hold at least two batches")

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_tokens


def lr_factor(step: int, total: int, warmup: int, decay_fraction: float) -> float:
    """Linear warm-up, constant, then linear decay to 0 over the last ``decay_fraction``.

    The warm-up is capped at a tenth of the run so short runs still reach the full rate.
    """
    warmup = min(warmup, total // 10)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    decay_start = int(total * (1 - decay_fraction))
    if decay_fraction > 0 and step >= decay_start:
        return max(0.0, (total - step) / max(total - decay_start, 1))
    return 1.0


def geometric_median(points: torch.Tensor, iterations: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=-1).clamp_min(eps)
        new = (weights.unsqueeze(1) * points).sum(0) / weights.sum()
        if (new - median).norm() < eps * max(float(median.norm()), 1.0):
            return new
        median = new
    return median


_FLAT_LOSS_SETTINGS = ("k_aux", "aux_coef", "dead_tokens", "l1_coef")
"""Loss settings a training job held flat before they moved into its ``sae`` sub-config."""


def _comparable(identity: Any) -> Any:
    """A checkpoint's identity in today's form: each SAE config re-read by today's config classes
    (one written when every architecture's settings were stored flat still matches its run),
    and a job's flat loss settings and ``l0_target`` moved to where the job now holds them."""
    if not isinstance(identity, dict):
        return identity
    identity = dict(identity)
    trainer = identity.get("trainer")
    if isinstance(trainer, dict) and "sae" not in trainer and "aux_coef" in trainer:
        trainer = dict(trainer)
        trainer["sae"] = {k: trainer.pop(k) for k in _FLAT_LOSS_SETTINGS if k in trainer}
        l0_target = trainer.pop("l0_target", 0.0)
        trainer["architecture_options"] = {"l0_target": l0_target} if l0_target else {}
        identity["trainer"] = trainer
    saes = identity.get("saes")
    if not isinstance(saes, dict):
        return identity
    try:
        configs = {name: sae_config_from_dict(values).to_dict() for name, values in saes.items()}
    except (SaeguardError, TypeError, ValueError, AttributeError):
        return identity  # unreadable: it differs from this run's identity as it stands
    return {**identity, "saes": configs}  # compared in JSON form by same_signature


class Trainer:
    """Trains named SAEs side by side on one stream of activation batches."""

    def __init__(
        self,
        saes: dict[str, SparseAutoencoder],
        cfg: TrainerConfig,
        out: str | Path,
        metadata: dict[str, Any] | None = None,
        device: torch.device | None = None,
        world: World | None = None,
    ) -> None:
        """``device``: where the SAEs, their optimiser state and counters live (CPU by
        default); ``world``: the data-parallel ranks that share each global batch (under
        torchrun), or None for one process."""
        if not saes:
            raise ConfigError("nothing to train: no SAE given")
        widths = {s.cfg.d_in for s in saes.values()}
        if len(widths) != 1:
            raise ConfigError(f"SAEs trained in one pass must share d_in, got {sorted(widths)}")
        self.device = device or torch.device("cpu")
        self.world = world or World()
        if self.world.distributed:
            _check_data_parallel(saes, cfg, self.world)
        self.saes = {name: sae.to(self.device) for name, sae in saes.items()}
        self.cfg = cfg
        self.out = Path(out)
        self.metadata = metadata or {}
        self.d_in = widths.pop()
        self.lrs = {
            name: cfg.lr if cfg.lr is not None else default_lr(cfg.optimizer, sae.cfg.d_sae)
            for name, sae in saes.items()
        }
        self.optimizers = {
            name: SaeOptimizer(
                sae, cfg.optimizer, self.lrs[name], cfg.schedule_free, cfg.sf_momentum
            )  # fmt: skip
            for name, sae in saes.items()
        }
        self.since_fired = {
            name: torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=self.device)
            for name, sae in saes.items()
        }
        self.step = 0
        self.scale = 1.0
        self.tokens_per_s = 0.0
        self.trained_steps = 0
        self.history: dict[str, dict[str, float]] = {}

    # --- checkpoints --------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        settings = config_to_dict(self.cfg)
        for key in _NOT_IDENTITY:
            settings.pop(key, None)
        return {
            "trainer": settings,
            "saes": {n: s.cfg.to_dict() for n, s in self.saes.items()},
        }

    def save_checkpoint(self) -> None:
        """Write the resumable state (rank 0 only; every tensor on the CPU, so a run started
        on one device resumes on any other)."""
        if not self.world.is_main:
            return
        tensors: dict[str, torch.Tensor] = {}
        for name, sae in self.saes.items():
            for key, value in sae.state_dict().items():
                tensors[f"{name}/param/{key}"] = value.detach().cpu().clone()
            for key, value in self.optimizers[name].state_tensors().items():
                tensors[f"{name}/opt/{key}"] = value.cpu()
            tensors[f"{name}/since_fired"] = self.since_fired[name].cpu().clone()
        tensors["rng/torch"] = torch.get_rng_state()
        directory = self.out / CHECKPOINT_DIR
        directory.mkdir(parents=True, exist_ok=True)
        # Step, scale and settings live in the same file as the weights, so a kill between two
        # writes can never pair weights of one step with the step number of another.
        state = {"step": self.step, "scale": self.scale, "identity": self._identity()}
        metadata = {
            "state": json.dumps(state),
            "optimizer": json.dumps({n: o.state_scalars() for n, o in self.optimizers.items()}),
            "history": json.dumps(self.history),
            "tokens_per_s": str(self.tokens_per_s),
            # What the live stream has counted so far (masked fraction, outlier thresholds): a
            # re-run that finds the training finished reads no stream, and reports these.
            "stream_stats": json.dumps(
                {k: self.metadata[k] for k in STREAM_STATS if k in self.metadata}
            ),
        }
        with atomic_path(directory / "state.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        atomic_write_json(directory / "state.json", state)  # for people; not read back

    def try_resume(self) -> bool:
        """Load the checkpoint in ``out`` if it was made with the same settings."""
        directory = self.out / CHECKPOINT_DIR
        if not (directory / "state.safetensors").is_file():
            return False
        try:
            return self._resume_from(directory)
        except SaeguardError:
            raise
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CorruptFileError(
                f"the checkpoint in {directory} is corrupt ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:200]}); delete {directory} to train from the start"
            ) from exc

    def _resume_from(self, directory: Path) -> bool:
        with safe_open(str(directory / "state.safetensors"), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = json.loads(metadata.get("state", "{}"))
        if not isinstance(state, dict) or not same_signature(
            _comparable(state.get("identity")), self._identity()
        ):
            raise SaeguardError(
                f"{directory} holds a checkpoint of a run with other settings; use another --out "
                "or delete the checkpoint to start over"
            )
        tensors = load_file(str(directory / "state.safetensors"))
        scalars = json.loads(metadata.get("optimizer", "{}"))
        for name, sae in self.saes.items():
            prefix = f"{name}/param/"
            sae.load_state_dict(
                {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            )
            opt_prefix = f"{name}/opt/"
            self.optimizers[name].load_state(
                {k[len(opt_prefix) :]: v for k, v in tensors.items() if k.startswith(opt_prefix)},
                scalars.get(name, []),
            )
            self.since_fired[name] = tensors[f"{name}/since_fired"].to(self.device)
        torch.set_rng_state(tensors["rng/torch"])
        self.step, self.scale = int(state["step"]), float(state["scale"])
        self.history = json.loads(metadata.get("history", "{}"))
        stream_stats = json.loads(metadata.get("stream_stats", "{}"))
        self.metadata.update({k: v for k, v in stream_stats.items() if k in STREAM_STATS})
        # A kill between the two checkpoint writes left the copy for people behind: renew it.
        if self.world.is_main and read_record(directory / "state.json") != state:
            atomic_write_json(directory / "state.json", state)
        self.tokens_per_s = float(metadata.get("tokens_per_s", "0"))
        log.info("resumed from %s at step %d", directory, self.step)
        return True

    # --- training -------------------------------------------------------------------------------
    def _initialise(self, first: torch.Tensor) -> None:
        self.scale = (
            math.sqrt(self.d_in) / float(first.norm(dim=-1).pow(2).mean().sqrt())
            if self.cfg.normalize
            else 1.0
        )
        sample = first * self.scale
        if self.cfg.b_dec_init == "geometric_median":
            centre = geometric_median(sample)
        elif self.cfg.b_dec_init == "mean":
            centre = sample.mean(0)
        else:
            centre = torch.zeros(self.d_in, device=sample.device)
        for name, sae in self.saes.items():
            # Each SAE's initial weights depend only on the seed and its own name, not on which
            # other SAEs share the pass.
            seed = self.cfg.train_seed * 1_000_003 + zlib.crc32(name.encode())
            sae.reset_parameters(torch.Generator().manual_seed(seed))
            with torch.no_grad():
                sae.b_dec.copy_(centre)
            sae.init_from_batch_(sample)

    def _check(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.ndim != 2 or batch.shape[1] != self.d_in:
            raise SaeguardError(
                f"activation batch has shape {tuple(batch.shape)}, but the SAEs read "
                f"[n, {self.d_in}]: check the hook point and model"
            )
        batch = batch.float()
        if not torch.isfinite(batch).all():  # checked where the batch was made: no device sync
            bad = int((~torch.isfinite(batch)).any(-1).sum())
            raise SaeguardError(
                f"{bad} activations in the batch of step {self.step} are NaN or inf; check the "
                "model dtype (try --dtype float32) and the source"
            )
        return batch.to(self.device, non_blocking=True)

    def fit(
        self,
        batches: Iterable[torch.Tensor],
        on_step: Callable[[Trainer], None] | None = None,
    ) -> dict[str, dict[str, float]]:
        """Train until ``cfg.tokens`` per SAE or the end of ``batches``; save every SAE.

        ``on_step`` is called after every step (e.g. a benchmark measuring held-out quality
        along the way); its time is not counted in the tokens/s rate. Under torchrun every rank
        iterates the same global batches and trains on its share of each; rank 0 alone writes.
        """
        main = self.world.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        resumed = self.try_resume()
        metrics_path = self.out / "metrics.jsonl"
        if main:
            _truncate_metrics(metrics_path, self.step)
        self.trained_steps = 0
        if resumed and self.step >= self.cfg.steps:
            log.info("%s already holds a finished run: nothing to train", self.out)
            if main and not self._all_saved():  # a kill after the final checkpoint cut saves
                self.save_all()
            return self.history
        stream: Iterator[torch.Tensor] = iter(batches)
        first = self._check(next(stream))
        if not resumed:
            self._initialise(first)
        stream = _chain_first(first, stream)
        for _ in range(self.step):  # fast-forward the deterministic stream
            next(stream, None)
        writer = _external_logger(self.cfg, self.out) if main else None
        total = self.cfg.steps
        bar = tqdm(total=total, initial=self.step, unit="step", desc="train",
                   dynamic_ncols=True, disable=not main or None)  # fmt: skip
        started, trained_tokens = time.perf_counter(), 0
        last_checkpoint = time.monotonic()
        try:
            with open(metrics_path, "a", encoding="utf-8") if main else _no_file() as metrics:
                while self.step < total:
                    batch = next(stream, None)
                    if batch is None:
                        log.warning(
                            "the activation stream ended at step %d of %d", self.step, total
                        )
                        break
                    x = self._check(batch) * self.scale
                    stats = self._train_step(x)
                    trained_tokens += len(x)
                    self.step += 1
                    failpoint()
                    self.trained_steps += 1
                    if on_step is not None:
                        paused = time.perf_counter()
                        on_step(self)
                        started += time.perf_counter() - paused
                    if self.step % self.cfg.log_every == 0 or self.step == total:
                        # Numbers leave the device only here, every log_every steps.
                        row = self._record(stats)
                        rate = trained_tokens / max(time.perf_counter() - started, 1e-9)
                        line = {"step": self.step, "tokens": self.step * self.cfg.batch_tokens,
                                "tokens_per_s": rate, **row}  # fmt: skip
                        if metrics is not None:
                            metrics.write(json.dumps(line) + "\n")
                            metrics.flush()
                        if writer is not None:
                            writer(line)
                        first_name = next(iter(self.saes))
                        bar.set_postfix(
                            loss=f"{row[f'{first_name}/loss']:.4f}",
                            fvu=f"{row[f'{first_name}/fvu']:.3f}",
                            l0=f"{row[f'{first_name}/l0']:.1f}",
                            dead=f"{100 * row[f'{first_name}/dead_frac']:.1f}%",
                            tok_s=f"{rate:,.0f}",
                        )
                    bar.update(1)
                    if main and self._checkpoint_due(last_checkpoint):
                        self.save_checkpoint()
                        last_checkpoint = time.monotonic()
                if self.trained_steps and self.step % self.cfg.log_every and self.step < total:
                    self._record(stats)  # a stream that ended early: keep its last numbers
        finally:
            bar.close()
        self.tokens_per_s = trained_tokens / max(time.perf_counter() - started, 1e-9)
        self.save_checkpoint()
        self.save_all()
        return self.history

    def _checkpoint_due(self, last_checkpoint: float) -> bool:
        """Every ``checkpoint_every`` steps, and whenever ``checkpoint_minutes`` have passed, so a
        kill never loses more than a few minutes whatever a step costs."""
        if self.step >= self.cfg.steps:
            return False  # the final checkpoint follows at once
        every, minutes = self.cfg.checkpoint_every, self.cfg.checkpoint_minutes
        if every and self.step % every == 0:
            return True
        return bool(minutes) and time.monotonic() - last_checkpoint >= 60 * minutes

    def _train_step(self, x: torch.Tensor) -> dict[str, dict[str, torch.Tensor | float]]:
        """One optimisation step of every SAE on the global batch ``x`` (this rank's share of
        it under torchrun); returns each SAE's numbers, still on the device."""
        world = self.world
        share, first_row = x, 0
        if world.distributed:
            size = len(x) // world.size
            first_row = world.rank * size
            share = x[first_row : first_row + size]
        stats: dict[str, dict[str, torch.Tensor | float]] = {}
        decay = 0.0 if self.cfg.schedule_free else self.cfg.lr_decay_fraction
        factor = lr_factor(self.step, self.cfg.steps, self.cfg.lr_warmup_steps, decay)
        sparsity = min(1.0, (self.step + 1) / max(self.cfg.sparsity_warmup_steps, 1))
        autocast = autocast_device_type(self.device)
        for name, sae in self.saes.items():
            opt = self.optimizers[name]
            dead = self.since_fired[name] >= sae.cfg.dead_tokens
            with (
                torch.autocast(autocast, dtype=torch.bfloat16, enabled=self.cfg.autocast_bf16),
                _rank_share(world, first_row),
            ):
                out = sae.training_step(share, dead, sparsity)
            opt.zero_grad()
            out.loss.backward()
            fired = out.fired
            if world.distributed:
                _sum_gradients(sae, world)
                fired = world.max_(fired.to(torch.uint8)).bool()
            sae.remove_parallel_decoder_grad_()
            if self.cfg.grad_clip > 0 and self.cfg.optimizer != "signsgd":  # sign: scale-free
                torch.nn.utils.clip_grad_norm_(sae.parameters(), self.cfg.grad_clip)
            opt.step(self.lrs[name] * factor)
            sae.normalize_decoder_()
            sae.after_step_()
            self.since_fired[name] += len(x)
            self.since_fired[name][fired] = 0
            with torch.no_grad(), _rank_share(world, first_row):
                fvu = normalized_mse(share, out.x_hat.float())
            stats[name] = {
                "loss": out.loss.detach(),
                "fvu": fvu,
                "l0": out.l0,
                "dead_frac": dead.float().mean(),
                "lr": self.lrs[name] * factor,
                **{k: v.detach() for k, v in out.metrics.items()},
            }
        return stats

    def _record(self, stats: dict[str, dict[str, torch.Tensor | float]]) -> dict[str, float]:
        """The step's numbers as one flat row of floats (summed over the ranks' shares: each
        rank's loss terms are its part of the global batch's; L0 is averaged), kept in
        ``history``."""
        row: dict[str, float] = {}
        for name, values in stats.items():
            keys = sorted(values)
            # float64 holds every float32 tensor and Python float exactly.
            vector = torch.stack([_as_float64(values[k], self.device) for k in keys])
            if self.world.distributed:
                shared = [k not in _SAME_ON_EVERY_RANK for k in keys]
                mask = torch.tensor(shared, device=self.device)
                summed = self.world.sum_(torch.where(mask, vector, 0.0))
                vector = torch.where(mask, summed, vector)
                vector[keys.index("l0")] /= self.world.size
            numbers = dict(zip(keys, vector.tolist(), strict=True))
            ordered = {k: numbers[k] for k in values}  # the step's own key order
            row.update({f"{name}/{k}": v for k, v in ordered.items()})
            self.history[name] = ordered
        return row

    def folded(self, name: str) -> SparseAutoencoder:
        """A CPU copy of an SAE that reads and reconstructs raw (unscaled) activations."""
        sae = copy.deepcopy(self.saes[name]).cpu()
        with torch.no_grad():
            for key, value in self.optimizers[name].eval_parameters().items():
                sae.get_parameter(key).copy_(value)
        sae.fold_input_scale_(self.scale)
        return sae.eval()

    def _all_saved(self) -> bool:
        """Whether every SAE's weights and cfg.json (written last) are on disk."""
        return all(
            (sae_directory(self.out, name, len(self.saes)) / file).is_file()
            for name in self.saes
            for file in ("sae_weights.safetensors", "cfg.json")
        )

    def save_all(self) -> None:
        """Save each SAE (scale folded in) into ``out`` (one SAE) or ``out/NAME`` (several);
        rank 0 only."""
        if not self.world.is_main:
            return
        for name in self.saes:
            directory = sae_directory(self.out, name, len(self.saes))
            metadata = {
                **self.metadata,
                "name": name,
                "normalization": {"train_scale": self.scale, "folded": True},
                "training_tokens": self.step * self.cfg.batch_tokens,
                "trainer": config_to_dict(self.cfg),
                "final_train_metrics": self.history.get(name, {}),
            }
            save_sae(self.folded(name), directory, metadata)


STREAM_STATS = ("masking", "exclusions")
"""Metadata keys counted by a live activation stream, kept in checkpoints."""


def _as_float64(value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A logged number as a float64 scalar on ``device`` (exact for float32 tensors and for
    Python floats alike)."""
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(()).double()
    return torch.tensor(float(value), dtype=torch.float64, device=device)


_SAME_ON_EVERY_RANK = frozenset({"lr", "dead_frac"})
"""Logged numbers every rank computes whole (the others are each rank's share)."""


def _check_data_parallel(
    saes: dict[str, SparseAutoencoder], cfg: TrainerConfig, world: World
) -> None:
    """Refuse, in one line, what a split of each global batch over the ranks would change."""
    if cfg.batch_tokens % world.size:
        raise ConfigError(
            f"--batch-tokens {cfg.batch_tokens} does not split evenly over {world.size} ranks; "
            f"use a multiple of {world.size}"
        )
    for name, sae in saes.items():
        reason = sae.splits_across_ranks()
        if reason:
            raise ConfigError(
                f"SAE {name} ({sae.architecture}) cannot train data-parallel: {reason}. Train it "
                "as one process (without torchrun)"
            )


def _rank_share(world: World, first_row: int) -> contextlib.AbstractContextManager[None]:
    """Global batch statistics in the losses when the batch is split over ranks (this rank's
    share starting at row ``first_row`` of the global batch)."""
    if not world.distributed:
        return contextlib.nullcontext()
    return batch_share(world.sum_, first_row)


def _sum_gradients(sae: SparseAutoencoder, world: World) -> None:
    """Sum the gradients over the ranks in one collective: each rank's is the gradient of its
    share of the global loss, so the sum is the whole batch's gradient."""
    grads = [p.grad for p in sae.parameters() if p.grad is not None]
    if not grads:
        return
    flat = world.sum_(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


@contextlib.contextmanager
def _no_file() -> Iterator[None]:
    yield None


def _chain_first(first: torch.Tensor, rest: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    yield first
    yield from rest


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line torn by a kill mid-write
            continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def sae_directory(out: str | Path, name: str, n_saes: int) -> Path:
    """Where a run that trains ``n_saes`` SAEs saves SAE ``name``: ``out`` itself for one SAE,
    ``out/NAME`` for several."""
    return Path(out) if n_saes == 1 else Path(out) / name


def _external_logger(cfg: TrainerConfig, out: Path) -> Any:
    if cfg.logger == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise MissingPackageError("TensorBoard", "tensorboard") from exc
        writer = SummaryWriter(str(out / "tensorboard"))

        def write(line: dict[str, float]) -> None:
            for key, value in line.items():
                if key != "step":
                    writer.add_scalar(key, value, int(line["step"]))
            writer.flush()  # the writer is never closed: without this a line may stay buffered

        return write
    if cfg.logger == "wandb":
        try:
            import wandb  # type: ignore[import-not-found]
        except ImportError as exc:
            raise MissingPackageError("Weights & Biases", "wandb") from exc
        run = wandb.init(project="saeguard", dir=str(out), config=config_to_dict(cfg))
        return lambda line: run.log(line, step=line["step"])
    return None
