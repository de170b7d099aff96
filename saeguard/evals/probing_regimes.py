"""Probing regimes (SPEC §7; Kantamneni et al. 2025, "Are Sparse Autoencoders Useful?").

Binary probing tasks are run in four regimes, each a list of points:

- **scarcity**: balanced training sets of ``train_sizes`` texts (those larger than the task's
  training pool allows are left out);
- **imbalance**: ``fixed_train`` texts of which a fraction ``positive_fractions`` is positive;
- **noise**: ``fixed_train`` balanced texts with a fraction ``noise_fractions`` of their labels
  flipped (training labels only: validation folds are cut from the noisy training set, as a
  practitioner's would be; the test labels stay clean);
- **shift**: ``fixed_train`` balanced clean texts (the very set of the 0% noise point), tested on
  shifted test texts (typos, another language or unseen jailbreak templates: see
  :mod:`saeguard.evals.probing_tasks`).

Every method sees the same training rows. Hyper-parameters are chosen on validation folds cut
from the training set alone, as in Kantamneni et al.: leave-one-pair-out (one positive and one
negative held out) up to 12 texts, stratified 6-fold below 128, one stratified 20% hold-out
(at most 100 texts) from 128 on; with fewer than two texts of a class there is nothing to
validate on, so every method takes its default settings. The chosen settings are refitted on
the whole training set and scored by test ROC AUC, with a stratified bootstrap 95% interval over
the test texts. The test set is never used to choose anything.

Methods: baselines on mean-pooled raw activations (L2 logistic with C on validation, the
ridge-tuned RAPTOR probe; PCA + logistic; k-NN; an MLP; gradient-boosted trees, off by default
for their cost) and the SAE probe (each latent divided by its mean non-zero magnitude on the
training set, the top-k latents by |mean difference| between the classes, L1 logistic; k and C
on validation). The *quiver* of arrows picks, per point, the method with the highest validation
AUC: once among the baselines, once among the baselines and the SAE probe (ties go to the
earlier method in ``METHODS``; where nothing was validated it takes the L2 logistic probe).

Each point also says whether the SAE probe beat the *best baseline* (the baseline with the
highest test AUC at that point, a deliberately strong bar): a win or loss when the paired
bootstrap 95% interval of the AUC difference excludes 0, a tie otherwise.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from saeguard.errors import ConfigError

VERSION = 1
log = logging.getLogger(__name__)

REGIMES = ("scarcity", "imbalance", "noise", "shift")
BASELINES = ("logreg", "pca", "knn", "mlp", "hgb")
SAE_PROBE = "sae"
METHODS = (*BASELINES, SAE_PROBE)
QUIVERS = ("quiver", "quiver_sae")
DEFAULT_METHOD = "logreg"
"""What the quiver takes when no method could be validated (a class with fewer than 2 texts)."""
LABELS = {
    "logreg": "L2 logistic",
    "pca": "PCA + logistic",
    "knn": "k-NN",
    "mlp": "MLP",
    "hgb": "boosted trees",
    "sae": "SAE probe",
    "quiver": "quiver (baselines)",
    "quiver_sae": "quiver (+ SAE probe)",
}
REGIME_LABELS = {
    "scarcity": "data scarcity (training texts)",
    "imbalance": "class imbalance (positive fraction)",
    "noise": "label noise (flipped fraction)",
    "shift": "covariate shift (test set)",
}


@dataclass(kw_only=True)
class RegimeConfig:
    """The regimes' points and the methods' settings."""

    train_sizes: list[int] = field(
        default_factory=lambda: [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    )
    """Balanced training-set sizes of the data-scarcity regime (capped by each task's pool)."""
    positive_fractions: list[float] = field(
        default_factory=lambda: [0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95]
    )
    """Positive fractions of the training set in the class-imbalance regime."""
    noise_fractions: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    """Fractions of training labels flipped in the label-noise regime (the test stays clean)."""
    fixed_train: int = 256
    """Training texts of the imbalance, noise and shift regimes (less where a task has fewer)."""
    methods: list[str] = field(default_factory=lambda: [m for m in METHODS if m != "hgb"])
    """Probes to compare: logreg, pca, knn, mlp, hgb (baselines) and sae (the SAE probe); hgb,
    gradient-boosted trees, is off by default (0.5-1 s a fit on a 2-core CPU, up to 13 fits a
    point)."""
    sae_ks: list[int] = field(default_factory=lambda: [1, 4, 16, 64, 256])
    """Numbers of latents the SAE probe may keep (chosen on validation)."""
    mlp_hidden: int = 64
    """Hidden units of the MLP baseline (one layer)."""
    mlp_iterations: int = 100
    """Training epochs of the MLP baseline."""
    tree_iterations: int = 100
    """Boosting rounds of the gradient-boosted trees."""
    validation_pairs: int = 16
    """Leave-one-pair-out splits at most, for training sets of up to 12 texts."""
    folds: int = 6
    """Stratified validation folds for training sets of 13 to 127 texts."""
    resamples: int = 1000
    """Bootstrap resamples of every interval."""

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ConfigError(
                f"unknown probing methods {sorted(unknown)}; use {', '.join(METHODS)}"
            )
        if SAE_PROBE not in self.methods or not set(self.methods) & set(BASELINES):
            raise ConfigError("--methods needs sae and at least one baseline to compare it with")
        if not self.train_sizes or min(self.train_sizes) < 2:
            raise ConfigError(f"--train-sizes must be at least 2, got {self.train_sizes}")
        if any(not 0 < f < 1 for f in self.positive_fractions):
            raise ConfigError(
                f"--positive-fractions must lie in (0, 1), got {self.positive_fractions}"
            )
        if any(not 0 <= f <= 0.5 for f in self.noise_fractions):
            raise ConfigError(f"--noise-fractions must lie in [0, 0.5], got {self.noise_fractions}")
        if self.fixed_train < 8:
            raise ConfigError(f"--fixed-train must be at least 8, got {self.fixed_train}")
        if not self.sae_ks or min(self.sae_ks) < 1:
            raise ConfigError(f"--sae-ks must be positive, got {self.sae_ks}")
        if min(self.mlp_hidden, self.mlp_iterations, self.tree_iterations) < 1:
            raise ConfigError("--mlp-hidden, --mlp-iterations and --tree-iterations must be >= 1")
        if self.validation_pairs < 1 or self.folds < 2:
            raise ConfigError("--validation-pairs must be at least 1 and --folds at least 2")
        if self.resamples < 10:
            raise ConfigError(f"--resamples must be at least 10, got {self.resamples}")
        self.methods = [m for m in METHODS if m in self.methods]  # a fixed order: ties, tables


# --- tasks and points ---------------------------------------------------------------------------
@dataclass
class ProbeTask:
    """A binary task on rows of a feature table: a training pool, a test set, shifted tests."""

    name: str
    """``set:positive class``, e.g. ``wiki-en:People``."""
    set: str
    positive: str
    pool_rows: np.ndarray
    """Feature-table rows the training sets are drawn from."""
    pool_labels: np.ndarray
    """[len(pool_rows)] bool: positive or not."""
    test_rows: np.ndarray
    test_labels: np.ndarray
    shifts: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    """Shifted test sets: name -> (rows, labels)."""
    shift_notes: dict[str, str] = field(default_factory=dict)
    """What each shift is, in words."""

    @property
    def n_positive(self) -> int:
        return int(self.pool_labels.sum())

    @property
    def n_negative(self) -> int:
        return int((~self.pool_labels).sum())

    def fixed_size(self, cfg: RegimeConfig) -> int:
        """The training size of the imbalance, noise and shift regimes: ``fixed_train``, less
        where even the most lopsided fraction would need more texts of a class than the pool has
        (every point of a regime then has the same size)."""
        fractions = [*cfg.positive_fractions, 0.5]
        need = max(max(fractions), 1 - min(fractions))
        return int(min(cfg.fixed_train, math.floor(min(self.n_positive, self.n_negative) / need)))

    def scarcity_sizes(self, cfg: RegimeConfig) -> list[int]:
        cap = 2 * min(self.n_positive, self.n_negative)
        return [n for n in cfg.train_sizes if n <= cap]

    def describe(self, cfg: RegimeConfig) -> dict[str, Any]:
        return {
            "name": self.name,
            "set": self.set,
            "positive": self.positive,
            "pool_positive": self.n_positive,
            "pool_negative": self.n_negative,
            "test_positive": int(self.test_labels.sum()),
            "test_negative": int((~self.test_labels).sum()),
            "fixed_train": self.fixed_size(cfg),
            "train_sizes": self.scarcity_sizes(cfg),
            "shifts": {name: self.shift_notes.get(name, "") for name in self.shifts},
        }


@dataclass
class RegimePoint:
    """A training set (labelled as the probes see it) and the test set it is scored on."""

    regime: str
    value: float | str
    """Training size, positive fraction, flipped fraction, or the shift's name."""
    train_rows: np.ndarray
    train_labels: np.ndarray
    """The labels the probes train on (noisy in the noise regime)."""
    test: str
    """``clean`` or the shift's name."""
    test_rows: np.ndarray
    test_labels: np.ndarray
    flipped: int = 0


def stable_seed(*parts: Any) -> int:
    """A 32-bit seed fixed by its parts (never Python's salted ``hash``)."""
    digest = hashlib.sha256("\x00".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "big")


def scarcity_sample(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Positions (into ``labels``) of a balanced sample of ``n``: ``n // 2`` positives and the
    rest negatives, drawn without replacement, in random order."""
    return imbalance_sample(labels, n, 0.5, rng)


def imbalance_sample(
    labels: np.ndarray, n: int, fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Positions of a sample of ``n`` with ``round(fraction * n)`` positives (at least one of
    each class), drawn without replacement, in random order."""
    n_pos = min(max(1, round(fraction * n)), n - 1) if fraction != 0.5 else n // 2
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    if n_pos > len(pos) or n - n_pos > len(neg):
        raise ValueError(f"a sample of {n} at {fraction:g} positive needs more texts than the pool")
    chosen = np.concatenate(
        [rng.choice(pos, n_pos, replace=False), rng.choice(neg, n - n_pos, replace=False)]
    )
    return rng.permutation(chosen)


def flip_labels(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(labels with exactly ``round(fraction * n)`` of them flipped, the flipped positions)."""
    flipped = np.sort(rng.choice(len(labels), round(fraction * len(labels)), replace=False))
    noisy = labels.copy()
    noisy[flipped] = ~noisy[flipped]
    return noisy, flipped


def regime_points(task: ProbeTask, regime: str, cfg: RegimeConfig, seed: int) -> list[RegimePoint]:
    """Every point of one regime for one task (seeded by the task, regime and value)."""
    pool, labels = task.pool_rows, task.pool_labels
    clean = ("clean", task.test_rows, task.test_labels)
    points = []
    fixed = task.fixed_size(cfg)

    def fixed_balanced() -> np.ndarray:  # the noise-0 and shift regimes' common training set
        return scarcity_sample(
            labels, fixed, np.random.default_rng(stable_seed(seed, task.name, "fixed"))
        )

    if regime == "scarcity":
        for n in task.scarcity_sizes(cfg):
            rng = np.random.default_rng(stable_seed(seed, task.name, regime, n))
            idx = scarcity_sample(labels, n, rng)
            points.append(RegimePoint(regime, n, pool[idx], labels[idx], *clean))
    elif regime == "imbalance" and fixed >= 8:
        for f in cfg.positive_fractions:
            rng = np.random.default_rng(stable_seed(seed, task.name, regime, f))
            idx = imbalance_sample(labels, fixed, f, rng)
            points.append(RegimePoint(regime, f, pool[idx], labels[idx], *clean))
    elif regime == "noise" and fixed >= 8:
        idx = fixed_balanced()
        for f in cfg.noise_fractions:
            rng = np.random.default_rng(stable_seed(seed, task.name, regime, f))
            noisy, flipped = flip_labels(labels[idx], f, rng)
            points.append(RegimePoint(regime, f, pool[idx], noisy, *clean, flipped=len(flipped)))
    elif regime == "shift" and fixed >= 8:
        idx = fixed_balanced()
        for name, (rows, test_labels) in task.shifts.items():
            points.append(
                RegimePoint(regime, name, pool[idx], labels[idx], name, rows, test_labels)
            )
    elif regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}")
    return points


# --- validation and AUC ------------------------------------------------------------------------
def validation_splits(
    labels: np.ndarray, seed: int, max_pairs: int = 16, folds: int = 6
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit, validate) position pairs cut from a training set, every validation part holding
    both classes: leave-one-pair-out up to 12 texts (at most ``max_pairs`` pairs), stratified
    ``folds``-fold below 128, one stratified 20% hold-out (at most 100) from 128 on; none when a
    class has fewer than 2 texts."""
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    n = len(labels)
    if min(len(pos), len(neg)) < 2:
        return []
    rng = np.random.default_rng(seed)
    everything = np.arange(n)
    if n <= 12:
        pairs = [(p, q) for p in pos for q in neg]
        if len(pairs) > max_pairs:
            pairs = [pairs[i] for i in np.sort(rng.choice(len(pairs), max_pairs, replace=False))]
        return [(np.setdiff1d(everything, [p, q]), np.array([p, q])) for p, q in pairs]
    if n < 128:
        k = min(folds, len(pos), len(neg))
        fold = np.empty(n, dtype=int)
        fold[rng.permutation(pos)] = np.arange(len(pos)) % k
        fold[rng.permutation(neg)] = np.arange(len(neg)) % k
        return [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(k)]
    size = min(round(0.2 * n), 100)
    n_pos = min(max(1, round(size * len(pos) / n)), len(pos) - 1)
    n_neg = min(max(1, size - n_pos), len(neg) - 1)  # each side keeps a text of each class
    held = np.concatenate(
        [rng.choice(pos, n_pos, replace=False), rng.choice(neg, n_neg, replace=False)]
    )
    return [(np.setdiff1d(everything, held), np.sort(held))]


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (the Mann-Whitney statistic, ties counted half); NaN without both classes."""
    from scipy.stats import rankdata

    n1 = int(labels.sum())
    n0 = len(labels) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def bootstrap_aucs(labels: np.ndarray, scores: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """[methods, resamples] AUCs of each row of ``scores`` on the same stratified resamples of
    the test texts (positives and negatives resampled separately, so every resample has both)."""
    from scipy.stats import rankdata

    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    idx = np.concatenate(
        [rng.choice(pos, (resamples, len(pos))), rng.choice(neg, (resamples, len(neg)))], axis=1
    )
    n1, n0 = len(pos), len(neg)
    out = np.empty((len(scores), resamples))
    for m, row in enumerate(scores):
        ranks = rankdata(row[idx], axis=1)
        out[m] = (ranks[:, :n1].sum(1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    return out


def interval(values: np.ndarray) -> list[float]:
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


# --- methods -----------------------------------------------------------------------------------
def _one_class(labels: np.ndarray) -> bool:
    return bool(labels.all() or (~labels).all())


class Method:
    """A probe with a grid of settings: ``scores`` fits every candidate on one training part and
    scores the evaluation part (shared preprocessing is done once per call)."""

    name = ""
    features = "raw"

    def __init__(self, cfg: RegimeConfig, seed: int) -> None:
        self.cfg, self.seed = cfg, seed

    def candidates(self, n: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def default(self, n: int) -> dict[str, Any]:
        raise NotImplementedError

    def fit_scores(
        self, x: np.ndarray, y: np.ndarray, x_eval: np.ndarray, candidates: list[dict[str, Any]]
    ) -> list[np.ndarray]:
        raise NotImplementedError

    def scores(
        self, x: np.ndarray, y: np.ndarray, x_eval: np.ndarray, candidates: list[dict[str, Any]]
    ) -> list[np.ndarray]:
        """Scores of ``x_eval`` for each candidate; constant when the labels hold one class."""
        if _one_class(y):
            return [np.zeros(len(x_eval)) for _ in candidates]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter of small or noisy fits
            return self.fit_scores(x, y, x_eval, candidates)


def _standardise(x: np.ndarray, x_eval: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    return scaler.transform(x), scaler.transform(x_eval)


class LogisticL2(Method):
    """Standardised raw activations, L2 logistic regression, C on validation (RAPTOR-style)."""

    name = "logreg"
    GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)

    def candidates(self, n: int) -> list[dict[str, Any]]:
        return [{"C": c} for c in self.GRID]

    def default(self, n: int) -> dict[str, Any]:
        return {"C": 1.0}

    def fit_scores(
        self, x: np.ndarray, y: np.ndarray, x_eval: np.ndarray, candidates: list[dict[str, Any]]
    ) -> list[np.ndarray]:
        from sklearn.linear_model import LogisticRegression

        a, b = _standardise(x, x_eval)
        out = []
        for c in candidates:  # the dual problem is the smaller one with fewer texts than dims
            model = LogisticRegression(
                C=c["C"],
                solver="liblinear",
                dual=len(x) < x.shape[1],
                max_iter=1000,
                random_state=self.seed,
            )
            out.append(model.fit(a, y).decision_function(b))
        return out


class PcaLogistic(Method):
    """Standardised raw activations projected on their top principal components (their number
    on validation), then logistic regression (C = 1)."""

    name = "pca"
    GRID = (1, 2, 4, 8, 16, 32, 64, 128)

    def candidates(self, n: int) -> list[dict[str, Any]]:
        usable = [c for c in self.GRID if c < max(n, 2)]
        return [{"components": c} for c in usable or [1]]

    def default(self, n: int) -> dict[str, Any]:
        return {"components": max(1, min(8, n - 1))}

    def fit_scores(
        self, x: np.ndarray, y: np.ndarray, x_eval: np.ndarray, candidates: list[dict[str, Any]]
    ) -> list[np.ndarray]:
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression

        a, b = _standardise(x, x_eval)
        top = max(1, min(max(c["components"] for c in candidates), len(x) - 1, x.shape[1]))
        pca = PCA(n_components=top, random_state=self.seed).fit(a)
        za, zb = pca.transform(a), pca.transform(b)
        out = []
        for c in candidates:
            m = min(c["components"], top)
            model = LogisticRegression(solver="liblinear", max_iter=1000, random_state=self.seed)
            out.append(model.fit(za[:, :m], y).decision_function(zb[:, :m]))
        return out


class Neighbours(Method):
    """Standardised raw activations, k-nearest neighbours (k on validation): the score is the
    fraction of positive neighbours."""

    name = "knn"
    GRID = (1, 2, 4, 8, 16, 32, 64)

    def candidates(self, n: int) -> list[dict[str, Any]]:
        return [{"k": k} for k in self.GRID if k <= max(1, n - 1)]

    def default(self, n: int) -> dict[str, Any]:
        return {"k": 1}

    def fit_scores(
        self, x: np.ndarray, y: np.ndarray, x_eval: np.ndarray, candidates: list[dict[str, Any]]
    ) -> list[np.ndarray]:
        from sklearn.neighbors import KNeighborsClassifier

        a, b = _standardise(x, x_eval)
        out = []
        for c in candidates:
            model = KNeighborsClassifier(n_neighbors=min(c["k"], len(x))).fit(a, y)
            out.append(model.predict_proba(b)[:, list(model.classes_).index(True)])
        return out


class Mlp(Method):
    """Standardised raw activations, a one-hidden-layer MLP (ReLU, Adam), L2 penalty on
    validation."""

    name = "mlp"
    GRID = (1e-3, 1e-1, 10.0)

    def candidates(self, n: int) -> list[dict[str, Any]]:
        return [{"alpha": a} for a in self.GRID]

    def default(self, n: int) -> dict[str, Any]:
        return {"alpha": 1e-1}

    def fit_scores(
        self, x: np.ndarray, y: np.ndarray, x_eval: np.ndarray, candidates: list[dict[str, Any]]
    ) -> list[np.ndarray]:
        from sklearn.neural_network import MLPClassifier

        a, b = _standardise(x, x_eval)
        out = []
        for c in candidates:
            model = MLPClassifier(
                hidden_layer_sizes=(self.cfg.mlp_hidden,),
                alpha=c["alpha"],
                max_iter=self.cfg.mlp_iterations,
                random_state=self.seed,
            ).fit(a, y)
            out.append(model.predict_proba(b)[:, list(model.classes_).index(True)])
        return out


class BoostedTrees(Method):
    """Raw activations, histogram gradient-boosted trees (scikit-learn), depth on validation."""

    name = "hgb"
    GRID = (2, 4)

    def candidates(self, n: int) -> list[dict[str, Any]]:
        return [{"max_depth": d} for d in self.GRID]

    def default(self, n: int) -> dict[str, Any]:
        return {"max_depth": 2}

    def fit_scores(
        self, x: np.ndarray, y: np.ndarray, x_eval: np.ndarray, candidates: list[dict[str, Any]]
    ) -> list[np.ndarray]:
        from sklearn.ensemble import HistGradientBoostingClassifier

        out = []
        for c in candidates:
            model = HistGradientBoostingClassifier(
                max_iter=self.cfg.tree_iterations,
                max_depth=c["max_depth"],
                max_bins=64,
                min_samples_leaf=max(1, min(20, len(x) // 10)),
                early_stopping=False,
                random_state=self.seed,
            ).fit(x, y)
            out.append(model.decision_function(x_eval))
        return out


def latent_scale(x: np.ndarray) -> np.ndarray:
    """Each latent's mean non-zero magnitude over the rows of ``x`` (1 where it never fires):
    "active" is ``f != 0``, so signed latents (AbsTopK) count too."""
    active = x != 0
    counts = active.sum(0)
    sums = np.abs(x).sum(0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)


def mean_difference_order(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Column indices by decreasing |mean(positives) - mean(negatives)| (ties by index)."""
    return np.argsort(-np.abs(z[y].mean(0) - z[~y].mean(0)), kind="stable")


def select_latents(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """The SAE probe's k latents: by |mean difference| of the latents divided by their mean
    non-zero magnitude on ``x`` itself."""
    return mean_difference_order(x / latent_scale(x), y)[:k]


class SaeProbe(Method):
    """SAE latents divided by their mean non-zero magnitude (on the training part), the top-k by
    |mean difference| between the classes, L1 logistic regression; k and C on validation."""

    name = SAE_PROBE
    features = "sae"
    C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)

    def candidates(self, n: int) -> list[dict[str, Any]]:
        return [{"k": k, "C": c} for k in self.cfg.sae_ks for c in self.C_GRID]

    def default(self, n: int) -> dict[str, Any]:
        return {"k": min(self.cfg.sae_ks, key=lambda k: abs(k - 16)), "C": 1.0}

    def fit_scores(
        self, x: np.ndarray, y: np.ndarray, x_eval: np.ndarray, candidates: list[dict[str, Any]]
    ) -> list[np.ndarray]:
        from sklearn.linear_model import LogisticRegression

        scale = latent_scale(x)
        za, zb = x / scale, x_eval / scale
        order = mean_difference_order(za, y)
        out = []
        for c in candidates:
            cols = order[: c["k"]]
            model = LogisticRegression(
                penalty="l1", C=c["C"], solver="liblinear", random_state=self.seed, max_iter=1000
            )
            out.append(model.fit(za[:, cols], y).decision_function(zb[:, cols]))
        return out


METHOD_CLASSES: dict[str, type[Method]] = {
    cls.name: cls for cls in (LogisticL2, PcaLogistic, Neighbours, Mlp, BoostedTrees, SaeProbe)
}


@dataclass
class MethodFit:
    """One method at one point: its validation AUC, chosen settings and test scores."""

    name: str
    val_auc: float
    params: dict[str, Any]
    test_scores: np.ndarray


def fit_method(
    method: Method,
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray,
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
) -> MethodFit:
    """Choose the method's settings by mean validation AUC over ``splits`` (the first best on a
    tie), refit them on all of ``x`` and score ``x_test``."""
    candidates = method.candidates(len(y))
    if splits:
        totals = np.zeros(len(candidates))
        for fit_part, val_part in splits:
            scores = method.scores(x[fit_part], y[fit_part], x[val_part], candidates)
            totals += [auc(y[val_part], s) for s in scores]
        mean = totals / len(splits)
        best = int(np.nanargmax(mean)) if not np.isnan(mean).all() else 0
        params, val_auc = candidates[best], float(mean[best])
    else:
        params, val_auc = method.default(len(y)), float("nan")
    return MethodFit(method.name, val_auc, params, method.scores(x, y, x_test, [params])[0])


def quiver_pick(val_aucs: dict[str, float], members: Sequence[str]) -> str:
    """The member with the highest validation AUC (the earlier on a tie; the L2 logistic probe,
    or the first member, when none has one)."""
    scored = [
        (val_aucs[m], -i, m)
        for i, m in enumerate(members)
        if m in val_aucs and not math.isnan(val_aucs[m])
    ]
    if not scored:
        return DEFAULT_METHOD if DEFAULT_METHOD in members else members[0]
    return max(scored)[2]


def run_point(
    point: RegimePoint,
    features: dict[str, np.ndarray],
    cfg: RegimeConfig,
    seed: int,
) -> dict[str, Any]:
    """Every method at one point, the two quivers and the SAE probe against the best baseline."""
    splits = validation_splits(point.train_labels, seed, cfg.validation_pairs, cfg.folds)
    fits: dict[str, MethodFit] = {}
    for name in cfg.methods:
        method = METHOD_CLASSES[name](cfg, seed)
        data = features[method.features]
        fits[name] = fit_method(
            method, data[point.train_rows], point.train_labels, data[point.test_rows], splits
        )
    names = list(fits)
    boots = bootstrap_aucs(
        point.test_labels, np.stack([fits[m].test_scores for m in names]), cfg.resamples, seed
    )
    methods: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        methods[name] = {
            "val_auc": _finite(fits[name].val_auc),
            "test_auc": auc(point.test_labels, fits[name].test_scores),
            "test_ci95": interval(boots[i]),
            "params": fits[name].params,
        }
    val = {m: fits[m].val_auc for m in names}
    baselines = [m for m in names if m in BASELINES]
    quivers = {}
    for quiver, members in (("quiver", baselines), ("quiver_sae", [*baselines, SAE_PROBE])):
        picked = quiver_pick(val, members)
        quivers[quiver] = {
            "picked": picked,
            "test_auc": methods[picked]["test_auc"],
            "test_ci95": methods[picked]["test_ci95"],
        }
    best = max(baselines, key=lambda m: (methods[m]["test_auc"], -baselines.index(m)))
    diff = boots[names.index(SAE_PROBE)] - boots[names.index(best)]
    low, high = interval(diff)
    return {
        "regime": point.regime,
        "value": point.value,
        "test": point.test,
        "n_train": len(point.train_rows),
        "n_train_positive": int(point.train_labels.sum()),
        "flipped": point.flipped,
        "n_test": len(point.test_rows),
        "validation": _describe_splits(splits),
        "methods": methods,
        **quivers,
        "best_baseline": best,
        "sae_vs_best": {
            "difference": methods[SAE_PROBE]["test_auc"] - methods[best]["test_auc"],
            "ci95": [low, high],
            "verdict": "win" if low > 0 else "loss" if high < 0 else "tie",
        },
    }


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def _describe_splits(splits: Sequence[tuple[np.ndarray, np.ndarray]]) -> str:
    if not splits:
        return "none (defaults)"
    if len(splits) == 1:
        return f"hold-out of {len(splits[0][1])}"
    if all(len(v) == 2 for _, v in splits):
        return f"{len(splits)} held-out pairs"
    return f"{len(splits)}-fold"


def run_regime(
    task: ProbeTask,
    regime: str,
    features: dict[str, np.ndarray],
    cfg: RegimeConfig,
    seed: int,
) -> list[dict[str, Any]]:
    """Every point of one regime for one task (scikit-learn on one thread: its fits are small,
    and BLAS/OpenMP threads only fight each other on a small or shared CPU)."""
    from threadpoolctl import threadpool_limits

    rows = []
    with threadpool_limits(limits=1):
        for point in regime_points(task, regime, cfg, seed):
            point_seed = stable_seed(seed, task.name, regime, point.value)
            rows.append(run_point(point, features, cfg, point_seed))
    return rows


# --- summaries ---------------------------------------------------------------------------------
def summarise(
    results: dict[str, dict[str, list[dict[str, Any]]]],
    methods: Sequence[str],
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """Per regime: each method's (and quiver's) mean test AUC over tasks (a task's value is its
    mean over the regime's points) with a bootstrap 95% interval over tasks; the SAE probe's
    wins, ties and losses against the best baseline; the quivers' difference (paired over tasks)
    and how often the SAE probe was picked. Per regime value: the same means (the curves).

    ``results``: task -> regime -> point rows (from :func:`run_regime`)."""
    columns = [*methods, *QUIVERS]
    regimes: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    everything: list[dict[str, Any]] = []
    for regime in REGIMES:
        per_task = {t: rows[regime] for t, rows in results.items() if rows.get(regime)}
        points = [p for rows in per_task.values() for p in rows]
        everything += points
        if not points:
            continue
        table = {}
        for column in columns:
            values = [
                float(np.mean([_auc_of(p, column) for p in rows])) for rows in per_task.values()
            ]
            table[column] = _mean_with_interval(values, resamples, seed)
        diffs = [
            float(np.mean([_auc_of(p, "quiver_sae") - _auc_of(p, "quiver") for p in rows]))
            for rows in per_task.values()
        ]
        regimes[regime] = {
            "tasks": len(per_task),
            "points": len(points),
            "methods": table,
            "sae_vs_best": _verdicts(points),
            "quiver_difference": _mean_with_interval(diffs, resamples, seed),
            "sae_picked": sum(p["quiver_sae"]["picked"] == SAE_PROBE for p in points),
        }
        curves[regime] = _curve(points, columns, resamples, seed)
    task_diffs = []
    for rows in results.values():
        pts = [p for regime_rows in rows.values() for p in regime_rows]
        if pts:
            task_diffs.append(
                float(np.mean([_auc_of(p, "quiver_sae") - _auc_of(p, "quiver") for p in pts]))
            )
    overall = {
        "tasks": len(task_diffs),
        "points": len(everything),
        "sae_vs_best": _verdicts(everything),
        "quiver": float(np.mean([_auc_of(p, "quiver") for p in everything]))
        if everything
        else None,
        "quiver_sae": float(np.mean([_auc_of(p, "quiver_sae") for p in everything]))
        if everything
        else None,
        "quiver_difference": _mean_with_interval(task_diffs, resamples, seed)
        if task_diffs
        else None,
        "sae_picked": sum(p["quiver_sae"]["picked"] == SAE_PROBE for p in everything),
    }
    return {"regimes": regimes, "curves": curves, "overall": overall}


def _auc_of(point: dict[str, Any], column: str) -> float:
    entry = point[column] if column in QUIVERS else point["methods"][column]
    return float(entry["test_auc"])


def _mean_with_interval(values: list[float], resamples: int, seed: int) -> dict[str, Any]:
    from saeguard.evals.results import bootstrap_ci, statistic_of

    arrays = {"values": np.asarray(values, dtype=np.float64)}
    low, high = bootstrap_ci(arrays, statistic_of("mean"), resamples, seed)
    return {"mean": float(np.mean(values)), "ci95": [low, high], "n_tasks": len(values)}


def _verdicts(points: list[dict[str, Any]]) -> dict[str, int]:
    counts = {"win": 0, "tie": 0, "loss": 0}
    for p in points:
        counts[p["sae_vs_best"]["verdict"]] += 1
    return counts


def _curve(
    points: list[dict[str, Any]], columns: Sequence[str], resamples: int, seed: int
) -> list[dict[str, Any]]:
    values: list[Any] = []
    for p in points:
        if p["value"] not in values:
            values.append(p["value"])
    if all(isinstance(v, int | float) for v in values):
        values.sort()
    curve = []
    for value in values:
        at = [p for p in points if p["value"] == value]
        curve.append(
            {
                "value": value,
                "methods": {
                    c: _mean_with_interval([_auc_of(p, c) for p in at], resamples, seed)
                    for c in columns
                },
            }
        )
    return curve


def describe_finding(summary: dict[str, Any]) -> str:
    """One sentence from the numbers: the SAE probe against the best baseline over every
    task x regime point, and the quiver with the SAE probe against the quiver without it."""
    overall = summary["overall"]
    if not overall["points"]:
        return "no task x regime point could be run."
    v = overall["sae_vs_best"]
    text = (
        f"the SAE probe beat the best baseline on {v['win']} of {overall['points']} task x "
        f"regime points ({overall['tasks']} tasks), tied on {v['tie']} and lost on {v['loss']} "
        "(paired bootstrap 95% intervals over test texts)"
    )
    q = overall["quiver_difference"]
    if q is not None:
        low, high = q["ci95"]
        verdict = "higher" if low > 0 else "lower" if high < 0 else "not clearly different"
        text += (
            f"; the quiver with the SAE probe averaged test AUC {overall['quiver_sae']:.3f} vs "
            f"{overall['quiver']:.3f} without it (difference {q['mean']:+.4f} "
            f"[{low:+.4f}, {high:+.4f}] over tasks: {verdict}), picking the SAE probe at "
            f"{overall['sae_picked']} of {overall['points']} points"
        )
    return text[0].upper() + text[1:] + "."
