"""``saeguard eval``: run the selected metrics on one SAE, write eval.json (+ schema) and eval.html.

Each eval's results are written as soon as it finishes; a re-run keeps every finished eval
whose own settings and metric version are unchanged and runs only the others (``complete`` is
false until all are done).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from saeguard import __version__
from saeguard.activations.subject import EvalSubject, load_subject
from saeguard.configs import config_to_dict, validate_literals
from saeguard.devices import check_device_name, describe_device, resolve_device
from saeguard.errors import ConfigError
from saeguard.evals.absorption import AbsorptionConfig
from saeguard.evals.ce import CEConfig
from saeguard.evals.core import CoreConfig
from saeguard.evals.ood_probing import OODProbingConfig
from saeguard.evals.probing import ProbingConfig
from saeguard.evals.registry import EVAL_SPECS, EVALS
from saeguard.fileio import (
    atomic_write_json,
    check_schema,
    claim_output_directory,
    read_json,
    validate_document,
)
from saeguard.sae.hub import is_hub_sae
from saeguard.steps import read_record, same_signature

log = logging.getLogger(__name__)
EVAL_SCHEMA = Path(__file__).with_name("eval.schema.json")


@dataclass(kw_only=True)
class EvalConfig:
    """What ``saeguard eval`` measures and how much text it reads."""

    evals: list[str] = field(default_factory=lambda: list(EVALS))
    """Metrics to run: core, ce, absorption, probing, ood_probing, effective."""
    quick: bool = False
    """Smoke-test scale: a few contexts, documents and words per eval (minutes, not a benchmark)."""
    model: str = ""
    """Model to evaluate with (empty: the one named in the SAE's cfg.json)."""
    adapter: str = ""
    """LoRA adapter directory (from `saeguard robustify`) merged into the model first."""
    corpus: str = ""
    """Corpus for core/ce/effective (empty: the SAE's training corpus; its test split is used)."""
    out: str = ""
    """Directory for eval.json and eval.html (empty: the SAE directory; ADAPTER/eval with one)."""
    seed: int = 0
    """Seed of every sampled choice (documents, words, bootstrap)."""
    threads: int = 0
    """Torch CPU threads (0: library default)."""
    device: str = "auto"
    """Torch device: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps; under
    torchrun each process takes the GPU of its local rank."""
    core: CoreConfig = field(default_factory=CoreConfig)
    """Core reconstruction metrics (and the effective features, which reuse their pass)."""
    ce: CEConfig = field(default_factory=CEConfig)
    """CE loss and KL recovered."""
    absorption: AbsorptionConfig = field(default_factory=AbsorptionConfig)
    """First-letter feature absorption."""
    probing: ProbingConfig = field(default_factory=ProbingConfig)
    """Sparse probing."""
    ood_probing: OODProbingConfig = field(default_factory=OODProbingConfig)
    """OOD probing (its documents per class follow the probing's)."""

    FOLLOWED = ("absorption.seed", "probing.seed", "ood_probing.seed", "ood_probing.per_class")
    """Sub-config settings that follow a setting of this config (--seed, --probing-per-class)
    rather than being options of their own."""
    CLI_ALIASES = {
        "core.contexts": ["--core-contexts"],
        "ce.contexts": ["--ce-contexts"],
        "probing.per_class": ["--probing-per-class"],
        "probing.ks": ["--probing-ks"],
        "probing.sets": ["--probing-sets"],
        "probing.pooling": ["--probing-pooling"],
        "ood_probing.shifts": ["--ood-shifts"],
        "ood_probing.k": ["--ood-k"],
        "absorption.words": ["--absorption-words"],
    }
    """The flags these settings had before configs were nested."""

    def __post_init__(self) -> None:
        validate_literals(self)
        check_device_name(self.device)
        unknown = [e for e in self.evals if e not in EVAL_SPECS]
        if not self.evals or unknown:
            raise ConfigError(f"unknown or empty --evals {unknown}; choose from {', '.join(EVALS)}")
        if self.quick:
            self.core = replace(self.core, contexts=min(self.core.contexts, 24))
            self.ce = replace(self.ce, contexts=min(self.ce.contexts, 6))
            self.probing = replace(self.probing, per_class=min(self.probing.per_class, 12))
            self.absorption = replace(self.absorption, words=min(self.absorption.words, 400))
        for flag, value in (("core-contexts", self.core.contexts),
                            ("ce-contexts", self.ce.contexts),
                            ("probing-per-class", self.probing.per_class)):  # fmt: skip
            if value < 1:
                raise ConfigError(f"--{flag} must be at least 1")
        self.absorption = replace(self.absorption, seed=self.seed)
        self.probing = replace(self.probing, seed=self.seed)
        self.ood_probing = replace(
            self.ood_probing, seed=self.seed, per_class=self.probing.per_class
        )
        needed = [n for e in self.evals for n in EVAL_SPECS[e].needs if n not in self.evals]
        self.evals = [*self.evals, *dict.fromkeys(needed)]  # effective reuses the core pass

    def settings_of(self, name: str) -> Any:
        """The config an eval's numbers depend on."""
        return getattr(self, EVAL_SPECS[name].settings)


def _settings(cfg: EvalConfig) -> dict[str, Any]:
    skip = {"evals", "out", "threads", "device"}  # the device is recorded on its own
    return {k: v for k, v in config_to_dict(cfg).items() if k not in skip}


def _signature(cfg: EvalConfig, name: str) -> dict[str, Any]:
    """What an eval's numbers depend on: a finished eval is kept only if this is unchanged."""
    return {
        "version": EVAL_SPECS[name].version,
        "config": config_to_dict(cfg.settings_of(name)),
        "model": cfg.model,
        "corpus": cfg.corpus,
        "seed": cfg.seed,
        **({"adapter": cfg.adapter} if cfg.adapter else {}),  # old signatures stay valid
    }


def _load_previous(path: Path, sae_path: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    previous = read_json(path, "eval.json", "Delete it and re-run.", kind=dict)
    fields = ("sae", "settings", "metrics", "details", "timings_s", "eval_settings")
    if not all(isinstance(previous.get(f), dict) for f in fields) or (
        previous["sae"].get("path") != sae_path
    ):
        log.info("%s belongs to another SAE or an older saeguard: starting over", path)
        return None
    return dict(previous)


def run_eval(
    sae_dir: str | Path, cfg: EvalConfig, subject: EvalSubject | None = None
) -> dict[str, Any]:
    """Run ``cfg.evals`` on the SAE in ``sae_dir``; returns the eval.json document. The model
    and SAE run on ``cfg.device`` (a given ``subject`` keeps its own)."""
    import torch

    device = subject.device if subject is not None else resolve_device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if is_hub_sae(sae_dir) and not (cfg.out or cfg.adapter):
        raise ConfigError(f"{sae_dir} lives in the Hugging Face cache: pass --out for its eval")
    sae_dir = Path(sae_dir)
    # An adapted model's eval never overwrites the base model's eval.json in the SAE directory.
    out = Path(cfg.out) if cfg.out else (Path(cfg.adapter) / "eval" if cfg.adapter else sae_dir)
    if cfg.out:  # a folder of the user's choosing must be empty or an earlier eval's
        claim_output_directory(out, "eval", index=("eval.json",))
    out.mkdir(parents=True, exist_ok=True)
    subject = subject or load_subject(
        sae_dir, cfg.model, cfg.corpus, adapter=cfg.adapter, device=device
    )
    settings = _settings(cfg)
    json_path, samples_path = out / "eval.json", out / "eval_samples.json"
    document = _load_previous(json_path, str(sae_dir)) or {
        "format": "saeguard-eval",
        "format_version": 1,
        "saeguard_version": __version__,
        "sae": _sae_summary(sae_dir, subject),
        "settings": settings,
        "metrics": {},
        "details": {},
        "timings_s": {},
        "eval_settings": {},
        "complete": False,
    }
    document["settings"] = settings
    document["device"] = describe_device(device)  # of this run (never part of a signature)
    samples: dict[str, Any] = {}
    if document["metrics"]:
        samples = read_record(samples_path) or {}  # a torn one is rebuilt with the evals
    order = [e for e in EVALS if e in cfg.evals]
    done = {
        e for e in order if same_signature(document["eval_settings"].get(e), _signature(cfg, e))
    }
    needed = {n for e in order if e not in done for n in EVAL_SPECS[e].needs}
    shared: dict[str, Any] = {"seed": cfg.seed}
    for name in order:
        if name in done and name not in needed:
            log.info("eval %s: already in %s, kept", name, json_path)
            continue
        started = time.perf_counter()
        for stale in [m for m, entry in document["metrics"].items() if entry["eval"] == name]:
            del document["metrics"][stale]  # results of other settings or an older definition
            samples.pop(stale, None)
        results, details = EVAL_SPECS[name].run(subject, cfg.settings_of(name), shared)
        for result in results:
            document["metrics"][result.name] = {**result.to_json(), "eval": name}
            if result.samples:
                samples[result.name] = {"statistic": result.statistic, "samples": result.samples}
        document["details"][name] = details
        document["timings_s"][name] = round(time.perf_counter() - started, 2)
        document["eval_settings"][name] = _signature(cfg, name)
        document["created"] = datetime.now(UTC).isoformat(timespec="seconds")
        atomic_write_json(samples_path, samples)
        atomic_write_json(json_path, document)  # finished evals survive an interruption
        log.info("eval %s: %.1f s", name, document["timings_s"][name])
    document["complete"] = all(
        same_signature(document["eval_settings"].get(e), _signature(cfg, e)) for e in order
    )
    rank = {name: i for i, name in enumerate(order)}  # one order, resumed or not (the file
    document["metrics"] = dict(  # is written with sorted keys, a fresh run appends)
        sorted(document["metrics"].items(), key=lambda kv: (rank.get(kv[1]["eval"], 99), kv[0]))
    )
    document["timings_s"] = dict(
        sorted(document["timings_s"].items(), key=lambda kv: (rank.get(kv[0], 99), kv[0]))
    )
    validate_document(document, EVAL_SCHEMA)
    atomic_write_json(json_path, document)
    from saeguard.report.eval_report import write_eval_report

    write_eval_report(document, out / "eval.html")
    return document


def _sae_summary(sae_dir: Path, subject: EvalSubject) -> dict[str, Any]:
    meta, cfg = subject.metadata, subject.sae.cfg
    tokens = meta.get("training_tokens")
    return {
        "path": str(sae_dir),
        "architecture": cfg.architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "k": cfg.k,
        "model": subject.loaded.name,
        "adapter": subject.loaded.adapter,
        "hook": subject.hook,
        "masking": meta.get("masking") or {"mask_prob": 0.0},
        "training_tokens": int(tokens) if isinstance(tokens, int | float) else None,
    }


def load_eval(directory: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(eval.json, eval_samples.json) of a directory, checked against the schema."""
    directory = Path(directory)
    path = directory / "eval.json" if directory.is_dir() else directory
    if not path.exists():
        raise ConfigError(f"{path} does not exist; run `saeguard eval {directory}` first")
    document = read_json(path, "eval.json", "Re-run `saeguard eval`.")
    check_schema(document, EVAL_SCHEMA, path, "Re-run `saeguard eval`.")
    samples_path = path.with_name("eval_samples.json")
    samples: Any = {}
    if samples_path.exists():
        samples = read_json(samples_path, "eval_samples.json", "Re-run `saeguard eval`.", kind=dict)
    return document, samples


__all__ = ["EVALS", "EvalConfig", "config_to_dict", "load_eval", "run_eval"]


@dataclass(kw_only=True)
class EvalJobConfig:
    """`saeguard eval`: which SAE, and what is measured."""

    sae_dir: str
    """Directory holding cfg.json + sae_weights.safetensors."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """What is measured and on how much text."""
