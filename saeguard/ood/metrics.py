"""Detection metrics with bootstrap intervals: AUROC and FPR at 95% TPR ("higher = OOD").

Point estimates come from scikit-learn (``roc_auc_score``, ``roc_curve``). The bootstrap
resamples positives and negatives separately (a stratified bootstrap, so every resample has
both classes) and uses the rank form of AUROC, which equals scikit-learn's to rounding, so a
thousand resamples of every score and shift cost seconds, not minutes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 1000


def score_values(results: list[dict[str, Any]], score: str) -> np.ndarray:
    """One score of every scored text in a list of ``TextScore`` JSON objects (errors skipped)."""
    return np.array(
        [r["scores"][score] for r in results if r["error"] is None and score in r["scores"]]
    )


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties half."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.zeros(len(negatives)), np.ones(len(positives))]
    return float(roc_auc_score(labels, np.r_[negatives, positives]))


def fpr_at_tpr(negatives: np.ndarray, positives: np.ndarray, tpr: float = 0.95) -> float:
    """False-positive rate at the highest threshold that flags at least ``tpr`` of positives."""
    from sklearn.metrics import roc_curve

    labels = np.r_[np.zeros(len(negatives)), np.ones(len(positives))]
    fprs, tprs, _ = roc_curve(labels, np.r_[negatives, positives])
    return float(fprs[np.searchsorted(tprs, tpr - 1e-12, side="left")])


def rank_auroc(neg: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """AUROC of each row pair (Mann-Whitney U from average ranks); [B, n_neg], [B, n_pos]."""
    from scipy.stats import rankdata

    both = np.concatenate([neg, pos], axis=1)
    ranks = rankdata(both, axis=1)
    n_neg, n_pos = neg.shape[1], pos.shape[1]
    u = ranks[:, n_neg:].sum(axis=1) - n_pos * (n_pos + 1) / 2
    return np.asarray(u / (n_neg * n_pos))


def rank_fpr(neg: np.ndarray, pos: np.ndarray, tpr: float) -> np.ndarray:
    """FPR at ``tpr`` per row: the threshold is the ceil(tpr * n_pos)-th largest positive."""
    n_pos = pos.shape[1]
    need = int(np.ceil(tpr * n_pos - 1e-9))
    thresholds = -np.sort(-pos, axis=1)[:, need - 1]
    return np.asarray((neg >= thresholds[:, None]).mean(axis=1))


def bootstrap_detection(
    negatives: np.ndarray,
    positives: np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    tpr: float = 0.95,
) -> dict[str, object]:
    """AUROC and FPR@TPR with percentile 95% intervals from a stratified bootstrap."""
    negatives = np.asarray(negatives, dtype=np.float64)
    positives = np.asarray(positives, dtype=np.float64)
    if len(negatives) < 2 or len(positives) < 2:
        raise ValueError("detection metrics need at least two negatives and two positives")
    rng = np.random.default_rng(seed)
    neg = negatives[rng.integers(0, len(negatives), (resamples, len(negatives)))]
    pos = positives[rng.integers(0, len(positives), (resamples, len(positives)))]
    aurocs = rank_auroc(neg, pos)
    fprs = rank_fpr(neg, pos, tpr)
    return {
        "auroc": auroc(negatives, positives),
        "auroc_ci95": [float(v) for v in np.percentile(aurocs, [2.5, 97.5])],
        "fpr95": fpr_at_tpr(negatives, positives, tpr),
        "fpr95_ci95": [float(v) for v in np.percentile(fprs, [2.5, 97.5])],
        "n_id": len(negatives),
        "n_ood": len(positives),
    }


def proportion_ci(
    flags: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> list[float]:
    """Percentile bootstrap 95% interval of a proportion."""
    flags = np.asarray(flags, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = flags[rng.integers(0, len(flags), (resamples, len(flags)))].mean(axis=1)
    return [float(v) for v in np.percentile(means, [2.5, 97.5])]


def compare_intervals(a: list[float], b: list[float]) -> str:
    """ "win" when interval ``a`` lies wholly above ``b``, "loss" when wholly below, else "tie"
    (overlapping 95% intervals)."""
    if a[0] > b[1]:
        return "win"
    if a[1] < b[0]:
        return "loss"
    return "tie"


def detection_summary(
    shifts: dict[str, dict[str, Any]],
    fused: str,
    singles: list[str],
    baselines: list[str],
    margin: float = 0.01,
) -> dict[str, Any]:
    """Per shift, the fused score against the best single score and the best baseline (by
    AUROC), with a win/tie/loss verdict from the 95% intervals; and each score's mean AUROC
    over the shifts. ``shifts`` is the benchmark's table ({shift: {"scores": {score: cell}}})."""
    per_shift: dict[str, Any] = {}
    tally = {"win": 0, "tie": 0, "loss": 0}
    for shift, row in shifts.items():
        cells = row["scores"]
        present = [s for s in singles if s in cells]
        base = [s for s in baselines if s in cells]
        if fused not in cells or not present:
            continue
        best = max(present, key=lambda s: cells[s]["auroc"])
        entry: dict[str, Any] = {
            "fused_auroc": cells[fused]["auroc"],
            "fused_auroc_ci95": cells[fused]["auroc_ci95"],
            "best_single": best,
            "best_single_auroc": cells[best]["auroc"],
            "best_single_auroc_ci95": cells[best]["auroc_ci95"],
            "within_margin_of_best_single": cells[fused]["auroc"] >= cells[best]["auroc"] - margin,
        }
        if base:
            best_base = max(base, key=lambda s: cells[s]["auroc"])
            verdict = compare_intervals(cells[fused]["auroc_ci95"], cells[best_base]["auroc_ci95"])
            tally[verdict] += 1
            entry |= {
                "best_baseline": best_base,
                "best_baseline_auroc": cells[best_base]["auroc"],
                "best_baseline_auroc_ci95": cells[best_base]["auroc_ci95"],
                "vs_best_baseline": verdict,
            }
        per_shift[shift] = entry
    names = [fused, *singles]
    mean_auroc = {
        name: float(np.mean([row["scores"][name]["auroc"] for row in shifts.values()]))
        for name in names
        if all(name in row["scores"] for row in shifts.values())
    }
    others = [v for k, v in mean_auroc.items() if k != fused]
    return {
        "fused_score": fused,
        "margin": margin,
        "per_shift": per_shift,
        "vs_best_baseline": tally,
        "mean_auroc": mean_auroc,
        "fused_has_best_mean": fused in mean_auroc and all(mean_auroc[fused] > v for v in others),
        "fused_within_margin_everywhere": bool(per_shift)
        and all(e["within_margin_of_best_single"] for e in per_shift.values()),
    }
