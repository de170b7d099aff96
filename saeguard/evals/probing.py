"""Sparse probing (SPEC §4): can k SAE latents classify what the text is about?

For every labelled set (wiki-en topics, BBC topics, language ID, plain vs jailbreak-wrapped
harmful questions) and every class, a balanced one-vs-rest binary task is built. Inputs are
activations mean-pooled over a document's kept tokens. On the training side the top-k latents by
|mean(positives) − mean(negatives)| are chosen, an L2 logistic regression (scikit-learn) is fitted
on them and test accuracy and ROC AUC are measured. The same probe on the top-k raw dimensions,
and on all raw dimensions, is reported beside it: an SAE number means little without them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from saeguard.activations.subject import EvalSubject
from saeguard.evals.datasets import LabelledSet, jailbreak_set, language_set, topic_set
from saeguard.evals.results import MetricResult, sampled_metric

VERSION = 1
log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ProbingConfig:
    """Settings of sparse probing."""

    ks: list[int] = field(default_factory=lambda: [1, 2, 5, 20])
    """Numbers of latents (and of raw dimensions) the probes may use."""
    per_class: int = 60
    """Documents per class and set (the cost grows linearly with it)."""
    sets: list[str] = field(default_factory=lambda: ["wiki-en", "bbc", "language", "jailbreak"])
    """Labelled sets to probe: wiki-en, bbc, language, jailbreak."""
    test_fraction: float = 0.3
    """Fraction of documents (by group) held out to test each probe."""
    seed: int = 0
    """Seed of document sampling, train/test cut and negatives."""
    pooling: str = "mean"
    """How a document's token activations become one input: mean (over kept tokens) or last."""

    def __post_init__(self) -> None:
        from saeguard.errors import ConfigError

        if self.pooling not in ("mean", "last"):
            raise ConfigError(f"--pooling must be mean or last, got {self.pooling!r}")
        unknown = set(self.sets) - {"wiki-en", "bbc", "language", "jailbreak"}
        if unknown:
            raise ConfigError(
                f"unknown probing sets {sorted(unknown)}; use wiki-en, bbc, language, jailbreak"
            )
        if not self.ks or min(self.ks) < 1:
            raise ConfigError(f"probing k values must be positive, got {self.ks}")
        if self.per_class < 4:
            raise ConfigError("--per-class must be at least 4 so each side of a probe has examples")


def build_set(name: str, per_class: int, seed: int) -> LabelledSet:
    if name == "language":
        return language_set(per_class, seed)
    if name == "jailbreak":
        return jailbreak_set(per_class, seed)
    return topic_set(name, per_class, seed)


def pooled_features(
    subject: EvalSubject, data: LabelledSet, batch_size: int = 16, pooling: str = "mean"
) -> dict[str, np.ndarray]:
    """{"raw": [n, d], "sae": [n, d_sae]} mean-pooled features of every text of the set.

    The model's kept activations per text are memoised on the subject, so other SAEs of the
    same study only pay for their own encoding.
    """
    from saeguard.activations.reader import kept_document_activations

    def key(text: str) -> tuple[str, str, str]:
        return (
            "document",
            hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(),
            data.truncate,
        )

    missing = list(dict.fromkeys(t for t in data.texts if key(t) not in subject.memo))
    if missing:
        computed = kept_document_activations(
            subject.loaded, subject.hook, missing, subject.source.rules, subject.ctx_len,
            data.truncate, batch_size, progress=f"probing: {data.name}",
        )  # fmt: skip
        for text, acts in zip(missing, computed, strict=True):
            subject.memo[key(text)] = acts
    per_doc: list[torch.Tensor] = [subject.memo[key(t)] for t in data.texts]
    if pooling == "last":
        per_doc = [acts[-1:] for acts in per_doc]
    raw = torch.stack([acts.mean(0) for acts in per_doc])
    sae = torch.stack([subject.encode(acts).float().mean(0) for acts in per_doc])
    return {"raw": raw.numpy(), "sae": sae.cpu().numpy()}


def group_split(groups: Sequence[int], test_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of test rows; every row of a group falls on the same side."""

    def unit(g: int) -> float:
        digest = hashlib.sha256(f"{seed}:{g}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64

    return np.array([unit(g) < test_fraction for g in groups])


def balanced_one_vs_rest(labels: np.ndarray, positive: str, seed: int) -> np.ndarray:
    """Row indices: every row of ``positive`` plus as many seeded rows of other classes."""
    pos = np.flatnonzero(labels == positive)
    neg = np.flatnonzero(labels != positive)
    rng = np.random.default_rng(abs(hash_label(positive, seed)))
    neg = rng.choice(neg, size=min(len(pos), len(neg)), replace=False) if len(neg) else neg
    return np.sort(np.concatenate([pos, neg]))


def hash_label(label: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{label}".encode()).digest()[:4], "big")


def top_k_by_mean_difference(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k columns whose class means differ most (ties broken by index)."""
    diff = np.abs(x[y].mean(0) - x[~y].mean(0))
    return np.argsort(-diff, kind="stable")[: min(k, x.shape[1])]


def fit_and_score(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> tuple[float, float, Any]:
    """(test accuracy, test ROC AUC, fitted pipeline) of an L2 logistic probe."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    probe.fit(x_train, y_train)
    scores = probe.decision_function(x_test)
    acc = float(accuracy_score(y_test, scores > 0))
    auc = float(roc_auc_score(y_test, scores)) if len(set(y_test.tolist())) == 2 else float("nan")
    return acc, auc, probe


def probe_set(
    feats: dict[str, np.ndarray], data: LabelledSet, cfg: ProbingConfig
) -> list[dict[str, Any]]:
    """One row per (class task, feature kind, k): accuracy and AUC on the held-out side."""
    labels = np.asarray(data.labels)
    test = group_split(data.groups, cfg.test_fraction, cfg.seed)
    rows = []
    for positive in sorted(set(data.labels)):
        tr = balanced_one_vs_rest(labels[~test], positive, cfg.seed)
        te = balanced_one_vs_rest(labels[test], positive, cfg.seed + 1)
        train_idx, test_idx = np.flatnonzero(~test)[tr], np.flatnonzero(test)[te]
        y_tr, y_te = labels[train_idx] == positive, labels[test_idx] == positive
        if y_tr.all() or (~y_tr).all() or y_te.all() or (~y_te).all():
            log.warning("probing %s/%s: one side lacks a class; skipped", data.name, positive)
            continue
        for kind in ("sae", "raw"):
            x = feats[kind]
            for k in cfg.ks:
                cols = top_k_by_mean_difference(x[train_idx], y_tr, k)
                acc, auc, _ = fit_and_score(x[train_idx][:, cols], y_tr, x[test_idx][:, cols], y_te)
                rows.append(
                    {
                        "set": data.name,
                        "task": positive,
                        "features": kind,
                        "k": k,
                        "accuracy": acc,
                        "auc": auc,
                    }
                )
        acc, auc, _ = fit_and_score(feats["raw"][train_idx], y_tr, feats["raw"][test_idx], y_te)
        rows.append(
            {
                "set": data.name,
                "task": positive,
                "features": "raw",
                "k": "all",
                "accuracy": acc,
                "auc": auc,
            }
        )
    return rows


def summarise(rows: list[dict[str, Any]], ks: Sequence[int]) -> list[MetricResult]:
    """Mean accuracy/AUC over every task, per feature kind and k (intervals over tasks)."""
    out = []
    for kind, prefix in (("sae", "sparse_probing"), ("raw", "raw_probing")):
        for k in [*ks, "all"]:
            sel = [r for r in rows if r["features"] == kind and r["k"] == k]
            if not sel:
                continue
            suffix = f"k{k}" if k != "all" else "all"
            for measure in ("accuracy", "auc"):
                out.append(
                    sampled_metric(
                        f"{prefix}_{measure}_{suffix}",
                        VERSION,
                        {"values": [r[measure] for r in sel]},
                        "mean",
                        "task",
                    )
                )
    return out


def run_probing(
    subject: EvalSubject, cfg: ProbingConfig
) -> tuple[list[MetricResult], dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in cfg.sets:
        data = build_set(name, cfg.per_class, cfg.seed)
        rows += probe_set(pooled_features(subject, data, pooling=cfg.pooling), data, cfg)
    return summarise(rows, cfg.ks), {"tasks": rows}
