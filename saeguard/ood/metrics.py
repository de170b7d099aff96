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
