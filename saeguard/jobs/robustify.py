"""`saeguard robustify`: fine-tune LoRA adapters against one shift and measure before and after.

Steps, each leaving its result in ``--out`` so that running the same command again resumes:

1. the monitor: ``--monitor`` or one fitted and calibrated for the SAE into ``OUT/monitor``;
2. ``before.json``: the base model on held-out test-split texts and their perturbed copies;
3. training (:class:`~saeguard.robustify.lora.LoraRobustifier`) with checkpoints in
   ``OUT/checkpoint`` (adapter weights and Adam moments as safetensors); the batches are a
   function of the seed and the step, so a resumed run takes exactly the steps it would have;
4. ``adapter/`` (peft format + ``saeguard_adapter.json``) and ``after.json``, measured by
   merging the saved adapter into a fresh copy of the base model (what users will load);
5. with ``--control``, the same training without the consistency loss (``control/``), to tell
   the consistency loss's effect from that of plain fine-tuning on the ID corpus;
6. ``robustify.json`` (validated against ``robustify.schema.json``) and ``robustify.html``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from saeguard import __version__
from saeguard.configs import validate_literals
from saeguard.data.shifts import id_split_texts
from saeguard.data.tokenize import tokenize_documents
from saeguard.defaults import DEFAULT_CORPUS, DEFAULT_MODEL
from saeguard.devices import check_device_name, describe_device, resolve_device
from saeguard.errors import ConfigError
from saeguard.fileio import (
    atomic_path,
    atomic_write_json,
    claim_output_directory,
    sha256_file,
    validate_document,
)
from saeguard.models.adapters import PEFT_WEIGHTS, merge_adapter, save_adapter
from saeguard.models.loading import LoadedModel, load_model
from saeguard.ood.config import MonitorConfig
from saeguard.ood.monitor import Monitor
from saeguard.robustify.lora import LoraRobustifier, LoraSettings, add_adapters
from saeguard.robustify.measure import (
    CONTINUATION_WORDS,
    MEASUREMENT_VERSION,
    PREFIX_WORDS,
    HeldOutPairs,
    compare,
    fit_topic_probe,
    hash_seed,
    held_out_pairs,
    labelled_split,
    measure,
    perturb,
    pooled_activations,
    typo_rate,
)
from saeguard.sae.hub import resolve_sae_dir
from saeguard.steps import Step

if TYPE_CHECKING:  # scikit-learn loads lazily: the CLI starts without it
    from sklearn.pipeline import Pipeline

log = logging.getLogger(__name__)

SCHEMA = Path(__file__).with_name("robustify.schema.json")
RESULT_FILE = "robustify.json"


@dataclass(kw_only=True)
class RobustifyConfig(LoraSettings):
    """What `saeguard robustify` trains and how it measures the result."""

    out: str = "runs/robustify"
    """Output directory (robust/adapter, before.json, after_*.json, robustify.json and .html)."""
    model: str = DEFAULT_MODEL
    """Base model: an embedded name, a Hugging Face id or a local directory."""
    sae: str = "runs/default/sae"
    """SAE directory whose latents are kept steady (from `saeguard train` or `saeguard run`)."""
    monitor: str = ""
    """Monitor directory for that SAE (`saeguard ood fit`); empty: fit one into OUT/monitor."""
    shift: str = "typos:0.2"
    """Shift to become robust to; it needs a clean counterpart: typos:RATE."""
    steps: int = 80
    """Optimiser steps (a larger value resumes a finished run and trains on)."""
    batch_size: int = 8
    """(clean, perturbed) text pairs per step."""
    train_ctx: int = 128
    """Tokens per training text, start token included (longer texts are cut)."""
    checkpoint_every: int = 10
    """Steps between checkpoints (an interrupted run resumes from the last one)."""
    eval_per_class: int = 25
    """Held-out test-split texts per topic measured before and after (wiki-en has 11 topics)."""
    probe_per_class: int = 40
    """Validation-split texts per topic the downstream topic probe is trained on."""
    eval_windows: int = 1
    """Windows of the SAE's context length measured per held-out text (1: its first window)."""
    capability_corpus: str = "bbc"
    """Clean corpus whose next-token loss checks capability beyond the ID corpus (empty: none)."""
    capability_texts: int = 100
    """Texts of that corpus measured before and after."""
    loss_tolerance: float = 0.02
    """Largest relative rise of the clean next-token loss that counts as capability kept."""
    control: bool = False
    """Also train a control adapter on the LM loss alone (same data and steps; doubles the time)."""
    resamples: int = 1000
    """Bootstrap resamples for the intervals."""
    seed: int = 0
    """Seed of every sampled choice: texts, typos, adapter initialisation, bootstrap."""
    quick: bool = False
    """Smoke-test scale (minutes): few steps, texts and windows. Not a result."""
    threads: int = 0
    """Torch CPU threads (0: library default)."""
    device: str = "auto"
    """Torch device: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps; under
    torchrun each process takes the GPU of its local rank."""
    monitor_fit: MonitorConfig = field(
        default_factory=lambda: MonitorConfig(fit_texts=1000, calibration_texts=300)
    )
    """How the monitor fitted here (when --monitor is empty) is fitted and calibrated: fewer texts
    than `saeguard ood fit` by default (it only guides and measures the adapters); its seed is
    --seed."""

    FOLLOWED = ("monitor_fit.seed",)
    """Sub-config settings that follow a setting of this config (not options of their own)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_literals(self)
        check_device_name(self.device)
        if self.quick:
            self.steps = min(self.steps, 4)
            self.batch_size = min(self.batch_size, 4)
            self.train_ctx = min(self.train_ctx, 64)
            self.eval_per_class = min(self.eval_per_class, 3)
            self.probe_per_class = min(self.probe_per_class, 6)
            self.capability_texts = min(self.capability_texts, 8)
            self.monitor_fit = replace(
                self.monitor_fit,
                fit_texts=min(self.monitor_fit.fit_texts, 120),
                calibration_texts=min(self.monitor_fit.calibration_texts, 40),
            )
            self.resamples = min(self.resamples, 200)
        typo_rate(self.shift)  # an unsupported shift fails now
        for name in ("steps", "batch_size", "checkpoint_every", "eval_per_class", "eval_windows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.probe_per_class < 2:
            raise ConfigError("--probe-per-class must be at least 2 to train a topic probe")
        if self.train_ctx < 8:
            raise ConfigError(f"--train-ctx must be at least 8 tokens, got {self.train_ctx}")
        if not 0 < self.loss_tolerance < 1:
            raise ConfigError("--loss-tolerance is a relative rise in (0, 1), e.g. 0.02")
        if self.resamples < 100:
            raise ConfigError("--resamples must be at least 100")

    def lora(self, **changes: Any) -> LoraSettings:
        """The adapter settings alone (what the trainer needs)."""
        names = LoraSettings.__dataclass_fields__
        return replace(LoraSettings(**{k: getattr(self, k) for k in names}), **changes)


_DIGESTED = ("fit_texts", "calibration_texts", "seed")


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _checkpoint_progress(path: Path) -> dict[str, Any] | None:
    """The progress saved inside a LoRA checkpoint, or None (no checkpoint, or unreadable)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as handle:
            progress = json.loads((handle.metadata() or {})["progress"])
    except (SafetensorError, OSError, KeyError, ValueError):
        log.warning("checkpoint %s is unreadable: training anew", path)
        return None
    ok = isinstance(progress, dict) and isinstance(progress.get("step"), int)
    ok = ok and isinstance(progress.get("losses"), list)
    return progress if ok else None


class _Run:
    """One robustify job: the monitor, held-out texts and probe shared by every step."""

    def __init__(self, cfg: RobustifyConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)  # a missing GPU fails before anything is written
        self.out = Path(cfg.out)
        claim_output_directory(self.out, "robustify", index=("robustify.json", "monitor"))
        self.base = load_model(cfg.model, device=self.device)
        self.monitor_dir = self._monitor_dir()
        self.monitor = Monitor.load(self.monitor_dir, loaded=self.base)
        if not self.monitor.thresholds:
            raise ConfigError(
                f"the monitor in {self.monitor_dir} is not calibrated; fit it with "
                "`saeguard ood fit` (which calibrates) or leave --monitor empty"
            )
        self.corpus = str(self.monitor.sae_metadata.get("corpus") or DEFAULT_CORPUS)
        self.pairs: HeldOutPairs = held_out_pairs(
            self.corpus, cfg.shift, cfg.eval_per_class, cfg.seed,
            cfg.capability_corpus, cfg.capability_texts,
        )  # fmt: skip
        self.probe_docs = labelled_split(self.corpus, "validation", cfg.probe_per_class, cfg.seed)
        self.base_identity = self.base.identity()
        self.monitor_sha = sha256_file(self.monitor_dir / "monitor.json")
        self.measure_signature = _digest(
            self.monitor_sha, cfg.shift, cfg.eval_per_class, cfg.probe_per_class,
            cfg.eval_windows, cfg.seed, self.base_identity, __version__,
            cfg.capability_corpus, cfg.capability_texts, MEASUREMENT_VERSION,
        )  # fmt: skip

    @cached_property
    def probe(self) -> Pipeline:
        """The topic probe on clean base-model activations (fitted only when a measurement
        is not already on disk: a finished run re-run reads no probe text)."""
        x = pooled_activations(
            self.monitor, [d.text for d in self.probe_docs], self.cfg.eval_windows, "probe features"
        )
        return fit_topic_probe(x, [str(d.label) for d in self.probe_docs], self.cfg.seed)

    def _monitor_dir(self) -> Path:
        cfg = self.cfg
        sae_weights = resolve_sae_dir(cfg.sae) / "sae_weights.safetensors"
        if not sae_weights.is_file():
            raise ConfigError(
                f"{cfg.sae} holds no sae_weights.safetensors; pass --sae an SAE directory "
                "(train one with `saeguard train` or `saeguard run`)"
            )
        if cfg.monitor:
            directory = Path(cfg.monitor)
            monitor_sae = directory / "sae" / "sae_weights.safetensors"
            if monitor_sae.is_file() and sha256_file(monitor_sae) != sha256_file(sae_weights):
                raise ConfigError(
                    f"the monitor in {directory} was fitted for another SAE than {cfg.sae}; "
                    "pass the matching --monitor, or none to fit one here"
                )
            return directory
        directory = self.out / "monitor"
        sae_sha = sha256_file(sae_weights)
        fit = replace(cfg.monitor_fit, seed=cfg.seed)
        # Settings left at their defaults are not hashed: the digests of earlier runs stay valid.
        default = asdict(MonitorConfig())
        changed = {k: v for k, v in asdict(fit).items() if k not in _DIGESTED and v != default[k]}
        wanted = _digest(sae_sha, fit.fit_texts, fit.calibration_texts, fit.seed,
                         *([changed] if changed else []))  # fmt: skip
        fitted = Step(self.out / "monitor.signature.json", wanted)
        if (directory / "monitor.json").is_file() and fitted.done():
            return directory
        log.info("fitting a monitor for %s into %s", cfg.sae, directory)
        monitor = Monitor.fit(
            cfg.sae,
            fit,
            loaded=self.base,
            model=cfg.model,
        )
        monitor.calibrate()
        monitor.save(directory)
        fitted.record()
        return directory

    # --- measurement ----------------------------------------------------------------------
    def measured(
        self, name: str, load: Callable[[], LoadedModel], extra: str = ""
    ) -> dict[str, Any]:
        """``name``.json: per-text values of the model ``load`` returns (called only when the
        file is missing or its signature differs)."""
        path = self.out / f"{name}.json"
        signature = _digest(self.measure_signature, extra)
        step = Step(path, signature)
        saved = step.saved()
        if saved is not None:
            log.info("%s: kept from an earlier run", path)
            return dict(saved["values"])
        loaded = load()
        monitor = self.monitor if loaded is self.base else Monitor.load(
            self.monitor_dir, loaded=loaded
        )  # fmt: skip
        values = measure(monitor, self.pairs, self.probe, self.cfg.eval_windows, name)
        step.record(values=values)
        return values

    # --- training -------------------------------------------------------------------------
    def energy_of(self, acts: list[torch.Tensor]) -> torch.Tensor:
        """The monitor's energy score of each text (for ``--energy-weighting``)."""
        return torch.tensor([a.scores["energy"] for a in self.monitor.analyse_acts(acts)])

    def train(self, name: str, settings: LoraSettings) -> tuple[Path, list[dict[str, float]]]:
        """Train (or resume) one adapter; returns its directory and the per-step losses."""
        cfg = self.cfg
        directory = self.out / name
        adapter_dir = directory / "adapter"
        signature = _digest(
            asdict(settings), cfg.batch_size, cfg.train_ctx, cfg.shift, cfg.seed, self.monitor_sha,
            self.base_identity, self.corpus,
        )  # fmt: skip
        progress_path = directory / "progress.json"
        state_path = directory / "checkpoint.safetensors"
        finished = Step(progress_path, signature).saved() or {}
        if finished.get("step") == cfg.steps and (adapter_dir / PEFT_WEIGHTS).is_file():
            log.info("%s: %d steps already trained, kept", adapter_dir, cfg.steps)
            return adapter_dir, list(finished["losses"])
        progress: dict[str, Any] = {"signature": signature, "step": 0, "losses": []}

        torch.manual_seed(cfg.seed)  # the adapters' initialisation
        loaded = load_model(cfg.model, device=self.device)
        point = loaded.hook_point(self.monitor.hook)
        model = add_adapters(loaded.model, settings, point.layer)
        pad = self.monitor.rules.special_ids[0] if self.monitor.rules.special_ids else 0
        robustifier = LoraRobustifier(model, self.monitor.sae, point, self.monitor.rules,
                                      settings, pad, self.energy_of)  # fmt: skip
        saved = _checkpoint_progress(state_path)  # kept inside the checkpoint: they agree
        if saved is not None and saved.get("signature") != signature:
            log.info("%s: settings changed: training anew", directory)
        elif saved is not None and int(saved.get("step", 0)) > cfg.steps:
            log.info("%s: fewer steps asked than already trained: training anew", directory)
        elif saved is not None:
            try:
                robustifier.load_state_tensors(load_file(str(state_path)))
            except (SafetensorError, OSError) as exc:
                log.warning("checkpoint %s unreadable (%s): training anew", state_path, exc)
            else:
                progress = saved
                log.info("%s: resuming at step %d of %d", directory, progress["step"], cfg.steps)
        pool = id_split_texts(self.corpus, "train", cfg.steps * cfg.batch_size, cfg.seed + 1)
        start_id = self.monitor.reader.spec.start_id
        start = [start_id] if start_id is not None else []
        room = cfg.train_ctx - len(start)
        directory.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=cfg.steps, initial=progress["step"], desc=f"train {name}", unit="step")
        started = time.perf_counter()
        while progress["step"] < cfg.steps:
            step = int(progress["step"])
            first = step * cfg.batch_size
            texts = [pool[(first + i) % len(pool)] for i in range(cfg.batch_size)]
            shifted = perturb(texts, cfg.shift, hash_seed(cfg.seed, 1_000_003 + step))
            clean_ids = tokenize_documents(loaded.tokenizer, texts)
            shifted_ids = tokenize_documents(loaded.tokenizer, shifted)
            losses = robustifier.step(
                [start + ids[:room] for ids in clean_ids],
                [start + ids[:room] for ids in shifted_ids],
            )
            progress["losses"].append(asdict(losses))
            progress["step"] = step + 1
            bar.update(1)
            bar.set_postfix(consistency=f"{losses.consistency:.3f}", lm=f"{losses.lm:.3f}")
            if progress["step"] % cfg.checkpoint_every == 0 or progress["step"] == cfg.steps:
                # The step and losses travel inside the weights' file: one atomic write, so a
                # kill can never leave weights of one step beside the progress of another.
                with atomic_path(state_path) as tmp:
                    save_file(robustifier.state_tensors(), str(tmp),
                              metadata={"progress": json.dumps(progress)})  # fmt: skip
        bar.close()
        progress["seconds"] = progress.get("seconds", 0.0) + time.perf_counter() - started
        save_adapter(model, adapter_dir, {
            "base_model": cfg.model,
            "base_fingerprint": self.base_identity,
            "hook": self.monitor.hook,
            "sae": str(cfg.sae),
            "shift": cfg.shift,
            "steps": cfg.steps,
            "settings": asdict(settings),
            "saeguard_version": __version__,
        })  # fmt: skip
        atomic_write_json(progress_path, progress)
        return adapter_dir, list(progress["losses"])


def _adapted_model(model: str, adapter_dir: Path, device: torch.device) -> LoadedModel:
    """A fresh copy of the base model with the saved adapter merged in (what users load)."""
    return merge_adapter(load_model(model, device=device), adapter_dir)


def run_robustify(cfg: RobustifyConfig) -> dict[str, Any]:
    """Run (or resume) the whole job; returns the ``robustify.json`` document."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    job = _Run(cfg)
    timings["setup"] = time.perf_counter() - started
    t = time.perf_counter()
    before = job.measured("before", lambda: job.base)
    timings["before"] = time.perf_counter() - t
    arms: dict[str, Any] = {}
    afters: dict[str, dict[str, Any]] = {}
    names = [("robust", cfg.lora())]
    if cfg.control:
        names.append(("control", cfg.lora(consistency_weight=0.0)))
    for name, settings in names:
        t = time.perf_counter()
        adapter_dir, losses = job.train(name, settings)
        timings[f"train_{name}"] = time.perf_counter() - t
        t = time.perf_counter()
        after = job.measured(
            f"after_{name}",
            partial(_adapted_model, cfg.model, adapter_dir, job.device),
            sha256_file(adapter_dir / PEFT_WEIGHTS),
        )
        timings[f"after_{name}"] = time.perf_counter() - t
        afters[name] = after
        arms[name] = {
            "adapter": str(adapter_dir),
            "settings": asdict(settings),
            "losses": losses,
            "comparison": compare(before, after, cfg.resamples, cfg.seed),
        }
    result = arms["robust"]["comparison"]
    continuations = job.pairs.continuations
    versus = (  # after - after: what the consistency loss adds over plain fine-tuning
        compare(afters["control"], afters["robust"], cfg.resamples, cfg.seed)
        if "control" in afters
        else None
    )
    loss = result["nll_clean"]
    count = result["fallacious_count_perturbed"]
    document: dict[str, Any] = {
        "format": "saeguard-robustify",
        "format_version": 1,
        "saeguard_version": __version__,
        "config": asdict(cfg),
        "model": cfg.model,
        "hook": job.monitor.hook,
        "sae": str(cfg.sae),
        "monitor": str(job.monitor_dir),
        "corpus": job.corpus,
        "shift": cfg.shift,
        "held_out": {
            "texts": len(job.pairs.clean),
            "split": "test",
            "topics": sorted(set(job.pairs.labels)),
            "probe_texts": len(job.probe_docs),
            "probe_split": "validation",
            "windows_per_text": cfg.eval_windows,
            "capability_corpus": cfg.capability_corpus if job.pairs.other else "",
            "capability_texts": len(job.pairs.other),
            "continuation_texts": len(continuations.continuation) if continuations else 0,
            "prefix_words": PREFIX_WORDS,
            "continuation_words": CONTINUATION_WORDS,
        },
        "flag_score": job.monitor.cfg.flag_score,
        "threshold": job.monitor.thresholds[job.monitor.cfg.flag_score],
        "arms": arms,
        **({"robust_vs_control": versus} if versus is not None else {}),
        "checks": {
            "clean_loss_relative_change": loss.get("relative_change", 0.0),
            "clean_loss_within_tolerance": loss.get("relative_change", 0.0) <= cfg.loss_tolerance,
            "loss_tolerance": cfg.loss_tolerance,
            "fallacious_count_change": count["difference"],
            "fallacious_count_falls": count["difference_ci95"][1] < 0,
            **(
                {
                    "other_loss_relative_change": result["nll_other"]["relative_change"],
                    "other_loss_within_tolerance": result["nll_other"]["relative_change"]
                    <= cfg.loss_tolerance,
                }
                if "nll_other" in result
                else {}
            ),
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "device": describe_device(job.device),  # of this run; no step's signature has it
    }
    validate_document(document, SCHEMA)
    atomic_write_json(job.out / RESULT_FILE, document)
    from saeguard.report.robustify_report import write_robustify_report

    write_robustify_report(document, job.out / "robustify.html")
    return document
