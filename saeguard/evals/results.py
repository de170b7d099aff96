"""The result record every metric returns, and the bootstrap used for its interval.

Each metric reports ``name``, ``version`` (bumped when its definition changes, so numbers from
different versions are never compared silently), ``value`` and, where the value is estimated
from samples, a bootstrap 95% interval. ``samples`` (per-unit values, e.g. one per context)
are kept so that ``saeguard compare`` can bootstrap differences between SAEs pairwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 1000


@dataclass
class MetricResult:
    """One number with its provenance and uncertainty."""

    name: str
    """Metric name, e.g. ``fvu`` or ``ce_loss_recovered``."""
    version: int
    """Definition version of the metric."""
    value: float
    """The point estimate."""
    ci: tuple[float, float] | None = None
    """Bootstrap 95% interval (None when the value is not estimated from samples)."""
    n: int | None = None
    """Number of sampled units (contexts, documents, words) behind the value."""
    unit: str = ""
    """What one sample is (``context``, ``document``, ``word``...)."""
    samples: dict[str, list[float]] = field(default_factory=dict, repr=False)
    """Per-unit columns from which ``statistic`` recomputes the value (for paired bootstraps)."""
    statistic: str = "mean"
    """How the value follows from ``samples``: ``mean`` of ``values``, or ``ratio``
    (1 - sum(num)/sum(den) or sum(num)/sum(den), see :func:`statistic_of`)."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "version": self.version, "value": self.value}
        if self.ci is not None:
            out["ci95"] = [self.ci[0], self.ci[1]]
        if self.n is not None:
            out["n"] = self.n
            out["unit"] = self.unit
        return out


def statistic_of(kind: str) -> Callable[[dict[str, np.ndarray]], float]:
    """The function that turns (resampled) sample columns into the metric value."""
    if kind == "mean":
        return lambda s: float(np.mean(s["values"]))
    if kind == "ratio":
        return lambda s: float(np.sum(s["num"]) / max(np.sum(s["den"]), 1e-30))
    if kind == "one_minus_ratio":
        return lambda s: float(1 - np.sum(s["num"]) / max(np.sum(s["den"]), 1e-30))
    if kind == "recovered":  # (zero - sae) / (zero - clean), summed over units
        return lambda s: float(
            (np.sum(s["zero"]) - np.sum(s["sae"]))
            / _nonzero(np.sum(s["zero"]) - np.sum(s["clean"]))
        )
    raise ValueError(f"unknown statistic {kind!r}")


def _nonzero(value: float) -> float:
    return value if abs(value) > 1e-12 else 1e-12


def bootstrap_ci(
    samples: dict[str, np.ndarray],
    statistic: Callable[[dict[str, np.ndarray]], float],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile 95% interval of ``statistic`` over units resampled with replacement."""
    n = len(next(iter(samples.values())))
    if n < 2:
        value = statistic(samples)
        return value, value
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for b in range(resamples):
        idx = rng.integers(0, n, n)
        stats[b] = statistic({k: v[idx] for k, v in samples.items()})
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(low), float(high)


def sampled_metric(
    name: str,
    version: int,
    samples: dict[str, Any],
    statistic: str = "mean",
    unit: str = "",
    seed: int = 0,
) -> MetricResult:
    """A :class:`MetricResult` whose value and interval come from per-unit samples."""
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in samples.items()}
    fn = statistic_of(statistic)
    return MetricResult(
        name=name,
        version=version,
        value=fn(arrays),
        ci=bootstrap_ci(arrays, fn, seed=seed),
        n=len(next(iter(arrays.values()))),
        unit=unit,
        samples={k: v.tolist() for k, v in arrays.items()},
        statistic=statistic,
    )


def paired_difference(
    a: MetricResult, b: MetricResult, seed: int = 0
) -> tuple[float, tuple[float, float]] | None:
    """``b - a`` with a bootstrap 95% interval. Units are resampled jointly when both metrics
    were computed on the same units (same count), independently otherwise. None without samples.
    """
    if not a.samples or not b.samples or a.statistic != b.statistic:
        return None
    fn = statistic_of(a.statistic)
    sa = {k: np.asarray(v) for k, v in a.samples.items()}
    sb = {k: np.asarray(v) for k, v in b.samples.items()}
    na, nb = len(next(iter(sa.values()))), len(next(iter(sb.values())))
    rng = np.random.default_rng(seed)
    diffs = np.empty(BOOTSTRAP_RESAMPLES)
    for i in range(BOOTSTRAP_RESAMPLES):
        ia = rng.integers(0, na, na)
        ib = ia if na == nb else rng.integers(0, nb, nb)
        diffs[i] = fn({k: v[ib] for k, v in sb.items()}) - fn({k: v[ia] for k, v in sa.items()})
    low, high = np.percentile(diffs, [2.5, 97.5])
    return fn(sb) - fn(sa), (float(low), float(high))
