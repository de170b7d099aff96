"""``saeguard study probing``: are SAE probes useful where probing is hard? (SPEC §7)

After Kantamneni et al. 2025: binary probing tasks (wiki-en and BBC topics, language ID, plain
vs jailbreak-wrapped harmful questions, and any labelled file the user passes) in four regimes
(data scarcity, class imbalance, label noise, covariate shift), baselines on mean-pooled raw
activations at the SAE's hook (four by default, gradient-boosted trees on request), the SAE
probe on its latents, and the quiver that picks per point by validation AUC, with and without the
SAE probe (:mod:`saeguard.evals.probing_regimes`).

The model runs once per text: every distinct text of every set and shifted test set is read
through the activation reader and its pooled raw activations and SAE latents are cached in
``OUT/features`` (chunks, each recorded with the signature of the SAE, the reading settings and
its texts). Each finished task x regime is recorded in ``OUT/results``; a re-run reuses both and
redoes only what changed. Writes ``probing_study.json`` (validated against
``probing_study.schema.json``), ``probing_study.md`` and ``probing_study.html``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from saeguard import __version__
from saeguard.configs import config_to_dict
from saeguard.devices import check_device_name, describe_device, resolve_device
from saeguard.errors import ConfigError
from saeguard.evals.probing_regimes import (
    LABELS,
    METHOD_CLASSES,
    METHODS,
    REGIME_LABELS,
    REGIMES,
    VERSION,
    ProbeTask,
    RegimeConfig,
    describe_finding,
    run_regime,
    summarise,
)
from saeguard.evals.probing_tasks import (
    SETS,
    FeatureTable,
    build_sources,
    feature_table,
    make_tasks,
    pooled_features,
    task_fingerprint,
)
from saeguard.fileio import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    claim_output_directory,
    sha256_file,
    validate_document,
)
from saeguard.steps import Step

if TYPE_CHECKING:
    import torch

    from saeguard.activations.subject import EvalSubject

log = logging.getLogger(__name__)

COMMAND = "study probing"
RESULT_FILE = "probing_study.json"
SCHEMA = Path(__file__).with_name("probing_study.schema.json")
FEATURES_VERSION = 1
"""Version of the cached features (raise it when how a text becomes its features changes)."""
CHUNK_TEXTS = 128
"""Texts per cached feature chunk (an interrupted run loses at most one chunk's work)."""


@dataclass(kw_only=True)
class ProbingStudyConfig:
    """The probing-regimes study: which SAE, which tasks, how much text, which regimes."""

    sae_dir: str
    """SAE directory (cfg.json + weights): its model, hook and exclusion rules are used."""
    out: str = "runs/study_probing"
    """Directory for probing_study.json/.md/.html and the cached features and results."""
    tasks: list[str] = field(default_factory=lambda: list(SETS))
    """Built-in labelled sets: wiki-en, bbc, language, jailbreak (pass --tasks '' with --data to
    probe only your files)."""
    data: list[str] = field(default_factory=list)
    """Your labelled .jsonl (objects with text and label) or .csv (text and label columns)
    files, each one more set."""
    model: str = ""
    """Model (default: the one the SAE's cfg.json names)."""
    classes_per_set: int = 2
    """Classes probed one-vs-rest per multi-class set (its largest; jailbreak has one task)."""
    per_class: int = 250
    """Texts per probed class, and as many of the other classes (negatives), per set."""
    test_fraction: float = 0.25
    """Fraction of each set (by group) held out for testing."""
    typo_rate: float = 0.2
    """Fraction of words given a typo in the typo shift of the test texts."""
    ctx_len: int = 64
    """Tokens read per text (its head; a wrapped jailbreak's tail), start token included."""
    batch_size: int = 16
    """Texts per forward pass."""
    seed: int = 0
    """Seed of every sample, split, typo, fold and fit."""
    quick: bool = False
    """Smoke-test scale (seconds on a tiny model): one class per set, a few texts, few points,
    every method."""
    threads: int = 0
    """Torch CPU threads for the forward pass (0: library default); the probes run on one."""
    device: str = "auto"
    """Torch device: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps; under
    torchrun each process takes the GPU of its local rank."""
    regimes: RegimeConfig = field(default_factory=RegimeConfig)
    """The regimes' points and the probes' settings."""

    def __post_init__(self) -> None:
        check_device_name(self.device)
        if self.quick:
            self.classes_per_set = 1
            self.per_class = min(self.per_class, 12)
            self.test_fraction = 0.34
            self.ctx_len = min(self.ctx_len, 32)
            self.regimes = replace(
                self.regimes,
                train_sizes=[4, 16],
                positive_fractions=[0.25],
                noise_fractions=[0.0, 0.3],
                fixed_train=min(self.regimes.fixed_train, 12),
                methods=list(METHODS),
                sae_ks=[1, 4],
                mlp_hidden=8,
                mlp_iterations=5,
                tree_iterations=2,
                validation_pairs=2,
                folds=2,
                resamples=100,
            )
        unknown = set(self.tasks) - set(SETS)
        if unknown:
            raise ConfigError(
                f"unknown --tasks {sorted(unknown)}; use {', '.join(SETS)} (and "
                "--data FILE for your own labelled files)"
            )
        if not self.tasks and not self.data:
            raise ConfigError("nothing to probe: give --tasks or --data FILE")
        if self.classes_per_set < 1 or self.per_class < 8:
            raise ConfigError("--classes-per-set must be at least 1 and --per-class at least 8")
        if not 0.1 <= self.test_fraction <= 0.5:
            raise ConfigError(f"--test-fraction must lie in [0.1, 0.5], got {self.test_fraction}")
        if not 0 < self.typo_rate <= 1:
            raise ConfigError(f"--typo-rate must lie in (0, 1], got {self.typo_rate}")
        if self.ctx_len < 4 or self.batch_size < 1:
            raise ConfigError("--ctx-len must be at least 4 and --batch-size at least 1")


# --- features ----------------------------------------------------------------------------------
def sae_fingerprint(sae: Any) -> str:
    """SHA-256 of an SAE's tensors (any format it was loaded from)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(sae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Features:
    """The cached pooled features of a feature table, computed chunk by chunk (resumable). The
    SAE's model is loaded only when some chunk has to be computed."""

    def __init__(
        self,
        cfg: ProbingStudyConfig,
        out: Path,
        table: FeatureTable,
        signature: dict[str, Any],
        device: torch.device,
    ) -> None:
        self.cfg, self.out, self.table, self.signature, self.device = (
            cfg,
            out,
            table,
            signature,
            device,
        )
        self.subject: EvalSubject | None = None
        self.computed_texts = 0

    def _subject(self) -> EvalSubject:
        if self.subject is None:
            self.subject = load_subject(self.cfg.sae_dir, model=self.cfg.model, device=self.device)
        return self.subject

    def load(self) -> dict[str, np.ndarray]:
        parts: list[dict[str, np.ndarray]] = []
        starts = range(0, len(self.table), CHUNK_TEXTS)
        bar = tqdm(total=len(self.table), desc="probing study: features", unit="text")
        for number, start in enumerate(starts):
            stop = min(start + CHUNK_TEXTS, len(self.table))
            parts.append(self._chunk(number, start, stop))
            bar.update(stop - start)
        bar.close()
        return {kind: np.concatenate([p[kind] for p in parts]) for kind in ("raw", "sae")}

    def _chunk(self, number: int, start: int, stop: int) -> dict[str, np.ndarray]:
        keys = self.table.keys[start:stop]
        texts_hash = hashlib.sha256("".join(keys).encode()).hexdigest()
        arrays = self.out / "features" / f"chunk_{number:05d}.npz"
        step = Step(arrays.with_suffix(".json"), {**self.signature, "texts": texts_hash})
        saved = step.saved()
        if saved and arrays.is_file() and sha256_file(arrays) == saved.get("sha256"):
            with np.load(arrays) as loaded:
                return {"raw": loaded["raw"], "sae": loaded["sae"]}
        subject = self._subject()
        features = pooled_features(
            subject,
            self.table.texts[start:stop],
            self.table.truncates[start:stop],
            self.cfg.ctx_len,
            self.cfg.batch_size,
        )

        def write(fh: Any) -> None:
            buffer = io.BytesIO()
            np.savez_compressed(buffer, raw=features["raw"], sae=features["sae"])
            fh.write(buffer.getvalue())

        atomic_write(arrays, write)
        step.record(texts=stop - start, sha256=sha256_file(arrays))
        self.computed_texts += stop - start
        return features


def load_subject(sae_dir: str, model: str, device: torch.device) -> EvalSubject:
    """The SAE with its model, hook and exclusion rules (the one place the model is loaded)."""
    from saeguard.activations.subject import load_subject as load

    return load(sae_dir, model=model, device=device)


# --- results -----------------------------------------------------------------------------------
def _slug(name: str) -> str:
    short = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[:60]}-{short}"


def run_tasks(
    cfg: ProbingStudyConfig,
    out: Path,
    tasks: list[ProbeTask],
    table: FeatureTable,
    features: dict[str, np.ndarray],
    feature_signature: dict[str, Any],
) -> tuple[dict[str, dict[str, list[dict[str, Any]]]], int]:
    """task -> regime -> point rows, each task x regime from its record when an earlier run
    finished it with the same inputs; also how many task x regimes were computed now."""
    results: dict[str, dict[str, list[dict[str, Any]]]] = {t.name: {} for t in tasks}
    computed = 0
    settings = asdict(cfg.regimes)
    bar = tqdm(total=len(tasks) * len(REGIMES), desc="probing study: regimes", unit="regime")
    for task in tasks:
        fingerprint = task_fingerprint(task, table)
        for regime in REGIMES:
            signature = {
                "version": VERSION,
                "features": feature_signature,
                "task": fingerprint,
                "regime": regime,
                "settings": settings,
                "seed": cfg.seed,
            }
            step = Step(out / "results" / f"{_slug(task.name)}.{regime}.json", signature)
            saved = step.saved()
            points = saved.get("points") if saved else None
            if not isinstance(points, list):
                bar.set_postfix_str(f"{task.name} {regime}")
                points = run_regime(task, regime, features, cfg.regimes, cfg.seed)
                step.record(task=task.name, regime=regime, points=points)
                computed += 1
            results[task.name][regime] = points
            bar.update(1)
    bar.close()
    return results, computed


def _method_notes(cfg: ProbingStudyConfig) -> dict[str, str]:
    notes = {}
    for name in cfg.regimes.methods:
        doc = METHOD_CLASSES[name].__doc__ or ""
        notes[name] = " ".join(doc.split())
    notes["quiver"] = "per point, the baseline with the highest validation AUC"
    notes["quiver_sae"] = "per point, the baseline or SAE probe with the highest validation AUC"
    return notes


def run_probing_study(cfg: ProbingStudyConfig) -> dict[str, Any]:
    """Run (or resume) the study and write probing_study.json, .md and .html; returns the
    document."""
    import torch

    from saeguard.report.probing_report import render_markdown, write_probing_report
    from saeguard.sae.io import load_sae

    started = time.perf_counter()
    device = resolve_device(cfg.device)  # a missing GPU fails before anything is read or written
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    sae, meta = load_sae(cfg.sae_dir)  # a bad SAE directory: one line, and no --out
    hook = str(meta.get("hook") or "")
    model = cfg.model or str(meta.get("model") or "")
    if not hook or not model:
        raise ConfigError(
            f"{cfg.sae_dir}/cfg.json does not name its hook and model; pass "
            "--model, or an SAE trained or saved by saeguard"
        )
    sources = build_sources(
        cfg.tasks,
        cfg.data,
        cfg.per_class,
        cfg.classes_per_set,
        cfg.test_fraction,
        cfg.typo_rate,
        cfg.seed,
    )
    table = feature_table(sources)
    skipped: list[str] = []
    tasks = make_tasks(sources, table, cfg.seed, on_skip=skipped.append)
    for why in skipped:
        log.warning("%s", why)
    if not tasks:
        raise ConfigError(
            "no task has enough texts for a training pool and a test side; raise --per-class"
        )
    out = Path(cfg.out)
    claim_output_directory(out, COMMAND, index=(RESULT_FILE, "features", "results"))
    signature = {
        "version": FEATURES_VERSION,
        "sae": sae_fingerprint(sae),
        "model": model,
        "hook": hook,
        "ctx_len": cfg.ctx_len,
        "pooling": "mean",
        "exclusions": meta.get("exclusions"),
    }
    architecture, d_sae = sae.cfg.architecture, sae.cfg.d_sae
    del sae
    log.info("probing study: %d texts, %d tasks", len(table), len(tasks))
    clock = time.perf_counter()
    cache = Features(cfg, out, table, signature, device)
    features = cache.load()
    features_s = time.perf_counter() - clock
    clock = time.perf_counter()
    results, computed = run_tasks(cfg, out, tasks, table, features, signature)
    probes_s = time.perf_counter() - clock
    summary = summarise(results, cfg.regimes.methods, cfg.regimes.resamples, cfg.seed)
    finding = describe_finding(summary)
    document = {
        "format": "saeguard-probing-study",
        "format_version": 1,
        "saeguard_version": __version__,
        "version": VERSION,
        "config": config_to_dict(cfg),
        "sae": {
            "path": str(cfg.sae_dir),
            "model": model,
            "hook": hook,
            "architecture": architecture,
            "fingerprint": signature["sae"],
            "d_sae": d_sae,
        },
        "features": {
            "texts": len(table),
            "ctx_len": cfg.ctx_len,
            "pooling": "mean",
            "raw_dim": int(features["raw"].shape[1]),
            "sae_dim": int(features["sae"].shape[1]),
            "computed_texts": cache.computed_texts,
        },
        "sets": [
            {
                "name": s.name,
                "texts": len(s.data.texts),
                "test_texts": int(s.test.sum()),
                "classes": s.classes,
                "note": s.note,
                "shifts": {sh.name: sh.note for sh in s.shifts},
            }
            for s in sources
        ],
        "skipped_tasks": skipped,
        "tasks": [t.describe(cfg.regimes) for t in tasks],
        "methods": cfg.regimes.methods,
        "labels": LABELS,
        "method_notes": _method_notes(cfg),
        "regime_labels": REGIME_LABELS,
        "results": results,
        "summary": summary,
        "finding": finding,
        "device": describe_device(device),
        "computed_regimes": computed,
        "timings_s": {
            "features": round(features_s, 1),
            "probes": round(probes_s, 1),
            "total": round(time.perf_counter() - started, 1),
        },
    }
    validate_document(document, SCHEMA)
    atomic_write_json(out / RESULT_FILE, document)
    atomic_write_text(out / "probing_study.md", render_markdown(document))
    write_probing_report(document, out / "probing_study.html")
    return document
