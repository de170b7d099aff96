"""``saeguard study masking``: does masked regularization do what arXiv 2604.06495 claims here?

The claim: training an SAE on activations of text whose tokens were randomly replaced by a mask
token lowers feature absorption, keeps sparse-probing quality and narrows the OOD probing gap.
The study trains SAEs of each architecture (an arm: TopK by default; the paper trained
Matryoshka BatchTopK) at each mask probability (baseline p = 0 included) and each k, with
several seeds, on the same number of training activations (counted after masked positions are
dropped, SPEC §3). All SAEs of one mask probability, every architecture included, are trained
from one activation stream in one pass; seeds differ in their initial weights. Every SAE is
then evaluated on the same held-out text (the model runs once for all of them) and the table
reports, per (architecture, p, k), the mean over seeds with a bootstrap 95% interval over
evaluation units and the difference from the baseline (p = 0, same architecture and k) with a
paired bootstrap interval.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from saeguard.activations.source import DType
from saeguard.activations.subject import EvalSubject, load_subject
from saeguard.configs import config_to_dict
from saeguard.defaults import DEFAULT_EXPANSION, MIDDLE_HOOKS
from saeguard.devices import describe_device, resolve_device
from saeguard.errors import ConfigError
from saeguard.evals.ce import CEConfig
from saeguard.evals.core import CoreConfig
from saeguard.evals.probing import ProbingConfig
from saeguard.evals.results import BOOTSTRAP_RESAMPLES, statistic_of
from saeguard.fileio import (
    atomic_write_json,
    atomic_write_text,
    claim_output_directory,
    read_json,
)
from saeguard.jobs.eval import EvalConfig, run_eval
from saeguard.jobs.target import TargetConfig
from saeguard.sae.io import load_sae

log = logging.getLogger(__name__)

STUDY_METRICS = (
    ("mean_full_absorption", "mean full absorption", "lower"),
    ("absorption_fraction", "absorption fraction", "lower"),
    ("sparse_probing_accuracy_k1", "sparse probing acc (k=1)", "higher"),
    ("sparse_probing_accuracy_k5", "sparse probing acc (k=5)", "higher"),
    ("ood_probing_auc", "OOD probing AUC", "higher"),
    ("ood_probing_gap", "OOD gap (ID − OOD AUC)", "lower"),
    ("explained_variance", "explained variance", "higher"),
    ("ce_loss_recovered", "CE loss recovered", "higher"),
)


STUDY_EVALS = ("core", "ce", "absorption", "probing", "ood_probing")
"""The evaluations behind STUDY_METRICS."""


@dataclass(kw_only=True)
class MaskingStudyConfig(TargetConfig):
    """The masking study: which SAEs to train, on how much data, and how to evaluate them."""

    out: str = "runs/study_masking"
    """Directory for the SAEs, their evaluations, study.md, study.html and study.json."""
    hook: str = ""
    """Hook point the SAEs read (empty: the model's middle residual stream, resid_post.15 for
    smollm2-135m, resid_post.9 for gemma3-270m; other models need --hook)."""
    archs: list[str] = field(default_factory=lambda: ["topk"])
    """SAE architectures, each an arm of the study (e.g. topk matryoshka: the paper trained
    Matryoshka BatchTopK); k is the mean active latents for the batch-wide ones."""
    mask_probs: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2])
    """Mask probabilities; 0 (the baseline) must be among them."""
    ks: list[int] = field(default_factory=lambda: [16, 64])
    """Sparsities (active latents per token)."""
    seeds: int = 2
    """SAEs per (architecture, p, k), differing in initial weights."""
    expansion: int = DEFAULT_EXPANSION
    """d_sae / d_in."""
    tokens: int = 600_000
    """Training activations per SAE (after masked positions are dropped)."""
    batch_tokens: int = 4096
    """Activations per optimiser step."""
    ctx_len: int = 128
    """Tokens per training context."""
    dtype: DType = "float32"
    """Model dtype of the training forward passes (bfloat16 about doubles CPU throughput where
    the CPU supports it; every arm gets the same; evaluation runs the model in float32)."""
    quick: bool = False
    """Smoke-test scale: 40k training activations, 4x expansion, quick evals."""
    threads: int = 0
    """Torch CPU threads (0: library default)."""
    evals: list[str] = field(default_factory=lambda: list(STUDY_EVALS))
    """Evaluations to run (a subset, e.g. core,absorption, cuts the time; the table shows — for
    the metrics of the others)."""
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(
        evals=list(STUDY_EVALS),
        core=CoreConfig(contexts=128), ce=CEConfig(contexts=32), probing=ProbingConfig(ks=[1, 5]),
    ))  # fmt: skip
    """How every SAE is evaluated (the study's text budget: fewer contexts than `saeguard eval`
    by default, probes with 1 and 5 latents)."""

    EVAL_OWN = ("eval.evals", "eval.quick", "eval.model", "eval.adapter", "eval.corpus",
                "eval.out", "eval.threads", "eval.device")  # fmt: skip
    """Evaluation settings the study decides itself (not options of `saeguard study masking`)."""

    def __post_init__(self) -> None:
        from saeguard.sae.registry import ARCHITECTURES

        super().__post_init__()
        if not self.hook:  # another model without --hook fails in run_study, after the device
            self.hook = MIDDLE_HOOKS.get(self.model, "")
        unknown = [a for a in self.archs if a not in ARCHITECTURES]
        if unknown or not self.archs or len(set(self.archs)) != len(self.archs):
            raise ConfigError(
                f"--archs must name distinct SAE architectures from {', '.join(ARCHITECTURES)}; "
                f"got {self.archs}"
            )
        if 0.0 not in self.mask_probs:
            raise ConfigError(
                "--mask-probs must include 0 (the baseline the others are compared to)"
            )
        if any(not 0 <= p < 1 for p in self.mask_probs):
            raise ConfigError(f"mask probabilities must lie in [0, 1), got {self.mask_probs}")
        if self.seeds < 1 or not self.ks or min(self.ks) < 1:
            raise ConfigError("--seeds and every --ks value must be at least 1")
        if self.quick:
            self.tokens = min(self.tokens, 40_960)
            self.expansion = min(self.expansion, 4)
            self.batch_tokens = min(self.batch_tokens, 1024)
        unknown = [e for e in self.evals if e not in STUDY_EVALS]
        if not self.evals or unknown:
            raise ConfigError(
                f"--evals must be a subset of {', '.join(STUDY_EVALS)}; got {self.evals}"
            )
        self.eval = replace(self.eval, evals=list(self.evals), quick=self.quick,
                            threads=self.threads, device=self.device)  # fmt: skip
        if self.tokens < self.batch_tokens:
            raise ConfigError("--tokens must be at least one batch (--batch-tokens)")


def _training_job(cfg: MaskingStudyConfig, p: float, device: str = "cpu") -> Any:
    """The training run of one mask probability: every (architecture, k, seed) SAE from one
    stream."""
    from saeguard.jobs.train import TrainJobConfig

    return TrainJobConfig(
        model=cfg.model, hooks=[cfg.hook], corpus=cfg.corpus, split="train", device=device,
        ctx_len=cfg.ctx_len, dtype=cfg.dtype, mask_prob=p, architectures=list(cfg.archs),
        k=list(cfg.ks), expansion=[cfg.expansion], replicas=cfg.seeds, tokens=cfg.tokens,
        batch_tokens=cfg.batch_tokens, buffer_tokens=max(8 * cfg.batch_tokens, 32_768),
        eval_tokens=0, out=str(Path(cfg.out) / f"p{p:g}"), threads=cfg.threads,
    )  # fmt: skip


@dataclass(frozen=True)
class StudySAE:
    """One SAE of the study: its arm, cell, seed and directory."""

    arch: str
    p: float
    k: int
    seed: int
    directory: Path

    @property
    def cell(self) -> str:
        """The table row it belongs to."""
        return f"{self.arch}, p={self.p:g}, k={self.k}"


def _sae_dirs(cfg: MaskingStudyConfig) -> list[StudySAE]:
    """Every SAE of the study, with the trainer's own names and layout."""
    from saeguard.train.trainer import sae_directory

    out = []
    for p in cfg.mask_probs:
        job = _training_job(cfg, p)
        names = job.sae_names()
        for arch, k, seed in itertools.product(cfg.archs, cfg.ks, range(cfg.seeds)):
            name = f"{arch}_k{k}_x{cfg.expansion}" + (f"_s{seed}" if cfg.seeds > 1 else "")
            if name not in names:  # the trainer's naming changed: fail loudly, never mix SAEs
                raise RuntimeError(f"study SAE {name} is not among the training job's {names}")
            out.append(StudySAE(arch, p, k, seed, sae_directory(job.out, name, len(names))))
    return out


def train_all(cfg: MaskingStudyConfig, device: str = "cpu") -> None:
    """One training pass per mask probability (resumes; finished runs return at once), on
    ``device`` (a device resolved by :func:`~saeguard.devices.resolve_device`, as a string)."""
    from saeguard.jobs.train import run_training

    for p in cfg.mask_probs:
        job = _training_job(cfg, p, device)
        count = len(cfg.archs) * len(cfg.ks) * cfg.seeds
        log.info("masking study: training p=%g (%d SAEs: %s)", p, count, ", ".join(cfg.archs))
        run_training(job)


def evaluate_all(cfg: MaskingStudyConfig, device: str = "cpu") -> dict[Path, dict[str, Any]]:
    """Evaluate every SAE on the same text, on ``device``; the model runs once for all."""
    eval_cfg = cfg.eval
    shared: EvalSubject | None = None
    results = {}
    for entry in _sae_dirs(cfg):
        directory = entry.directory
        if shared is None:
            shared = load_subject(directory, device=device)
            subject = shared
        else:
            sae, meta = load_sae(directory)
            subject = shared.with_sae(sae.eval(), meta)
        results[directory] = run_eval(directory, eval_cfg, subject)
    return results


def _samples(directory: Path, metric: str) -> tuple[str, dict[str, np.ndarray]] | None:
    path = directory / "eval_samples.json"
    if not path.exists():
        return None
    entry = read_json(path, "eval_samples.json", "Re-run the study.", kind=dict).get(metric)
    if not entry:
        return None
    return entry["statistic"], {k: np.asarray(v) for k, v in entry["samples"].items()}


def seed_mean(
    dirs: list[Path], metric: str, baseline: list[Path] | None = None, seed: int = 0
) -> dict[str, Any] | None:
    """Mean over seeds with a bootstrap 95% interval (units resampled jointly across seeds,
    which were scored on the same units), and the paired difference from ``baseline``."""
    loaded = [_samples(d, metric) for d in dirs]
    if any(entry is None for entry in loaded):
        return None
    groups = [e for e in loaded if e is not None]
    base = [_samples(d, metric) for d in baseline] if baseline else []
    fn = statistic_of(groups[0][0])
    n = len(next(iter(groups[0][1].values())))
    same_units = all(len(next(iter(s.values()))) == n for _, s in groups) and all(
        b is not None and len(next(iter(b[1].values()))) == n for b in base
    )

    def value(idx: np.ndarray | None, sets: list[tuple[str, dict[str, np.ndarray]]]) -> float:
        return float(
            np.mean([fn({k: v if idx is None else v[idx] for k, v in s.items()}) for _, s in sets])
        )

    point = value(None, groups)
    per_seed = [value(None, [g]) for g in groups]
    result: dict[str, Any] = {"mean": point, "seeds": per_seed}
    if not same_units:
        return result
    rng = np.random.default_rng(seed)
    boots, diffs = np.empty(BOOTSTRAP_RESAMPLES), np.empty(BOOTSTRAP_RESAMPLES)
    base_sets = [b for b in base if b is not None]
    for i in range(BOOTSTRAP_RESAMPLES):
        idx = rng.integers(0, n, n)
        boots[i] = value(idx, groups)
        if base_sets:
            diffs[i] = boots[i] - value(idx, base_sets)
    result["ci95"] = [float(x) for x in np.percentile(boots, [2.5, 97.5])]
    if base_sets:
        result["delta"] = point - value(None, base_sets)
        result["delta_ci95"] = [float(x) for x in np.percentile(diffs, [2.5, 97.5])]
    return result


def summarise(cfg: MaskingStudyConfig) -> dict[str, Any]:
    """One row per (architecture, p, k), keyed ``"arch, p=P, k=K"``; masked rows carry their
    difference from p = 0 of the same architecture and k."""
    saes = _sae_dirs(cfg)
    table: dict[str, Any] = {}
    for arch, k in itertools.product(cfg.archs, cfg.ks):
        baseline = [s.directory for s in saes if s.arch == arch and s.p == 0 and s.k == k]
        for p in cfg.mask_probs:
            group = [s for s in saes if s.arch == arch and s.p == p and s.k == k]
            dirs = [s.directory for s in group]
            row: dict[str, Any] = {"arch": arch, "mask_prob": p, "k": k}
            for metric, _, _ in STUDY_METRICS:
                row[metric] = seed_mean(dirs, metric, baseline if p > 0 else None)
            masked = []
            for d in dirs:
                _, meta = load_sae(d)
                masked.append((meta.get("masking") or {}).get("masked_fraction"))
            row["masked_fraction"] = masked
            table[group[0].cell] = row
    return table


def describe_finding(table: dict[str, Any], cfg: MaskingStudyConfig) -> str:
    """One plain sentence per claim, from the Δ intervals (no claim without an interval); one
    group of sentences per architecture when the study has several."""
    groups = []
    for arch in cfg.archs:
        rows = {n: r for n, r in table.items() if r.get("arch", arch) == arch}
        text = _verdicts(rows)
        groups.append(f"{arch}: {text}" if len(cfg.archs) > 1 else text)
    return " ".join(groups)


def _verdicts(table: dict[str, Any]) -> str:
    verdicts = []
    for metric, label, better in STUDY_METRICS[:6]:
        signs = []
        for name, row in table.items():
            entry = row.get(metric)
            if entry is None or "delta_ci95" not in entry:
                continue
            low, high = entry["delta_ci95"]
            if low > 0:
                signs.append((name, "higher"))
            elif high < 0:
                signs.append((name, "lower"))
            else:
                signs.append((name, "no clear change"))
        if not signs:
            continue
        counts = {
            s: sum(1 for _, v in signs if v == s) for s in ("higher", "lower", "no clear change")
        }
        verdicts.append(
            f"{label}: {counts['lower']} lower, {counts['higher']} higher, "
            f"{counts['no clear change']} without a clear change (of {len(signs)} masked cells; "
            f"{better} is better)"
        )
    return "; ".join(verdicts) + "." if verdicts else "no masked cell could be compared."


def run_study(cfg: MaskingStudyConfig) -> dict[str, Any]:
    """Train, evaluate, and write study.json, study.md and study.html."""
    import torch

    from saeguard.report.study_report import render_markdown, write_study_report

    device = resolve_device(cfg.device)  # a missing GPU fails before anything is written
    if not cfg.hook:
        raise ConfigError(
            f"no default hook for model {cfg.model!r}: pass --hook (e.g. resid_post.N at the "
            "middle of its layers)"
        )
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    claim_output_directory(out, "study masking", index=("study.json",))
    train_all(cfg, str(device))
    evaluate_all(cfg, str(device))
    table = summarise(cfg)
    finding = describe_finding(table, cfg)
    document = {"config": config_to_dict(cfg), "table": table, "finding": finding,
                "device": describe_device(device)}  # fmt: skip
    atomic_write_json(out / "study.json", document)
    markdown = render_markdown(cfg, table, finding, STUDY_METRICS)
    atomic_write_text(out / "study.md", markdown)

    write_study_report(cfg, table, finding, out / "study.html", STUDY_METRICS)
    return document
