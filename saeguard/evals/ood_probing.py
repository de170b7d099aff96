"""OOD probing (SPEC §4): do probes trained on clean wiki-en still work on shifted text?

Topic probes (one-vs-rest, balanced, mean-pooled activations) are fitted on clean wiki-en
documents, then scored by ROC AUC on: held-out clean wiki-en (the in-distribution reference),
the same held-out documents with 20% typos, and wiki-es / wiki-fr documents whose topic labels
match (topics missing in a language are left out of its tasks). The SAE probe uses the top-k
latents by class-mean difference; the raw probes use the top-k raw dimensions and all of them.
``ood_probing_auc`` is the mean SAE-probe AUC over shifts and tasks; ``ood_gap`` is the mean drop
from the in-distribution AUC (smaller is more robust).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from saeguard.activations.subject import EvalSubject
from saeguard.errors import ConfigError
from saeguard.evals.datasets import LabelledSet, held_out_documents, topic_set, with_typos
from saeguard.evals.probing import (
    balanced_one_vs_rest,
    fit_and_score,
    group_split,
    pooled_features,
    top_k_by_mean_difference,
)
from saeguard.evals.results import MetricResult, sampled_metric

VERSION = 1
SHIFTS = ("typos", "wiki-es", "wiki-fr")


@dataclass(kw_only=True)
class OODProbingConfig:
    """Settings of OOD probing."""

    k: int = 20
    """Latents (and raw dimensions) the sparse probes use."""
    per_class: int = 60
    """Documents per topic and language."""
    typo_rate: float = 0.2
    """Fraction of words given a typo in the typo shift."""
    shifts: list[str] = field(default_factory=lambda: list(SHIFTS))
    """Shifts to test on: typos, wiki-es, wiki-fr."""
    test_fraction: float = 0.3
    """Fraction of wiki-en documents held out for the in-distribution and typo tests."""
    seed: int = 0
    """Seed of sampling, the train/test cut and the typos."""

    def __post_init__(self) -> None:
        unknown = set(self.shifts) - set(SHIFTS)
        if unknown:
            raise ConfigError(
                f"unknown OOD probing shifts {sorted(unknown)}; use {', '.join(SHIFTS)}"
            )
        if not 0 < self.typo_rate <= 1:
            raise ConfigError(f"--typo-rate must lie in (0, 1], got {self.typo_rate}")


def ood_rows(
    train: tuple[dict[str, np.ndarray], np.ndarray],
    tests: dict[str, tuple[dict[str, np.ndarray], np.ndarray]],
    k: int,
    seed: int,
) -> list[dict[str, Any]]:
    """AUC of each topic probe (fitted on ``train``) on each test set, per feature kind."""
    feats, labels = train
    rows = []
    for topic in sorted(set(labels.tolist())):
        tr = balanced_one_vs_rest(labels, topic, seed)
        y_tr = labels[tr] == topic
        for shift, (test_feats, test_labels) in tests.items():
            if topic not in set(test_labels.tolist()) or len(set(test_labels.tolist())) < 2:
                continue
            te = balanced_one_vs_rest(test_labels, topic, seed + 1)
            y_te = test_labels[te] == topic
            for kind, kk in (("sae", k), ("raw", k), ("raw", None)):
                x_tr, x_te = feats[kind][tr], test_feats[kind][te]
                if kk is not None:
                    cols = top_k_by_mean_difference(x_tr, y_tr, kk)
                    x_tr, x_te = x_tr[:, cols], x_te[:, cols]
                _, auc, _ = fit_and_score(x_tr, y_tr, x_te, y_te)
                rows.append(
                    {
                        "topic": topic,
                        "shift": shift,
                        "features": kind,
                        "k": kk if kk else "all",
                        "auc": auc,
                    }
                )
    return rows


def summarise(rows: list[dict[str, Any]], k: int) -> list[MetricResult]:
    out = []
    shifts = sorted({r["shift"] for r in rows} - {"clean"})
    for kind, kk, name in (
        ("sae", k, "ood_probing_auc"),
        ("raw", k, "raw_ood_probing_auc"),
        ("raw", "all", "raw_full_ood_probing_auc"),
    ):
        sel = [r for r in rows if r["features"] == kind and r["k"] == kk]
        ood = [r["auc"] for r in sel if r["shift"] != "clean"]
        if ood:
            out.append(sampled_metric(name, VERSION, {"values": ood}, "mean", "task"))
        clean = {r["topic"]: r["auc"] for r in sel if r["shift"] == "clean"}
        gaps = [
            clean[r["topic"]] - r["auc"]
            for r in sel
            if r["shift"] != "clean" and r["topic"] in clean
        ]
        if gaps:
            out.append(
                sampled_metric(
                    name.replace("auc", "gap"), VERSION, {"values": gaps}, "mean", "task"
                )
            )
        for shift in shifts:
            vals = [r["auc"] for r in sel if r["shift"] == shift]
            if vals:
                out.append(
                    sampled_metric(f"{name}_{shift}", VERSION, {"values": vals}, "mean", "task")
                )
    return out


def run_ood_probing(
    subject: EvalSubject, cfg: OODProbingConfig
) -> tuple[list[MetricResult], dict[str, Any]]:
    langs = [s for s in cfg.shifts if s.startswith("wiki-")]
    common: set[str] | None = None
    for lang in langs:
        labels = {d.label for d in held_out_documents(lang, cfg.seed) if d.label}
        common = labels if common is None else common & labels
    en = topic_set("wiki-en", cfg.per_class, cfg.seed, labels=common)
    en_feats = pooled_features(subject, en)
    en_labels = np.asarray(en.labels)
    test = group_split(en.groups, cfg.test_fraction, cfg.seed)
    train = ({k: v[~test] for k, v in en_feats.items()}, en_labels[~test])
    tests: dict[str, tuple[dict[str, np.ndarray], np.ndarray]] = {
        "clean": ({k: v[test] for k, v in en_feats.items()}, en_labels[test])
    }
    if "typos" in cfg.shifts:
        held = LabelledSet(
            "wiki-en-held-out",
            [t for t, m in zip(en.texts, test, strict=True) if m],
            en_labels[test].tolist(),
        )
        typo = with_typos(held, cfg.typo_rate, cfg.seed)
        tests["typos"] = (pooled_features(subject, typo), np.asarray(typo.labels))
    for lang in langs:
        data = topic_set(lang, cfg.per_class, cfg.seed, labels=common)
        tests[lang] = (pooled_features(subject, data), np.asarray(data.labels))
    rows = ood_rows(train, tests, cfg.k, cfg.seed)
    return summarise(rows, cfg.k), {"tasks": rows, "topics": sorted(common or [])}
