"""The fused OOD score (SPEC section 5): every per-text score as a p-value against held-out ID
texts, combined into one number.

Fitting sees ID text only: the reference distributions are the scores of the fit texts held
back from the ID statistics (``MonitorConfig.reference_fraction``); nothing here ever sees an
OOD example. The threshold on the fused score is then calibrated like any other score, on the
validation split.

- **p-value** of a score ``s`` against its ``n`` reference values:
  ``p = (1 + #{ref >= s}) / (1 + n)`` (the conformal p-value: uniform on ID texts up to ties;
  the default, ``tail="none"``, gives every score beyond the reference ``1 / (1 + n)``).
  With ``tail="exponential"``, a score above every reference value gets
  ``p = exp(-(s - max) / beta) / (1 + n)``, where ``beta`` is the mean excess of the top tenth
  of the reference over its smallest member (a peaks-over-threshold exponential tail), so that
  texts beyond everything seen in ID keep their order instead of tying at ``1 / (1 + n)``.
- **combination** of the components' p-values ``p_1..p_m``:
  ``fisher``: ``-2 sum log p_j`` read against chi-square with ``2m`` degrees of freedom;
  ``min_p``: the smallest p with the Sidak correction ``1 - (1 - min p)^m``.
  Either nominal p-value assumes independent components, which correlated scores are not; the
  fused score is ``-log10`` of it, used only to *rank* texts: the calibrated threshold, not the
  nominal p, sets the false-positive rate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

FusionRule = Literal["fisher", "min_p"]
Tail = Literal["none", "exponential"]

FUSION_RULES: tuple[str, ...] = ("fisher", "min_p")
TAILS: tuple[str, ...] = ("none", "exponential")


@dataclass(frozen=True)
class ReferenceDistribution:
    """One score's values on held-out ID texts, sorted, with its fitted upper tail."""

    values: np.ndarray
    """Sorted reference values (ascending)."""
    tail_scale: float
    """Mean excess of the top tenth over its smallest member (0: no tail to extrapolate)."""

    @classmethod
    def fit(cls, values: Sequence[float]) -> ReferenceDistribution:
        ordered = np.sort(np.asarray(values, dtype=np.float64))
        if not len(ordered):
            raise ValueError("a reference distribution needs at least one value")
        top = max(5, len(ordered) // 10)
        top_values = ordered[-top:]
        scale = float(np.mean(top_values) - top_values[0]) if len(top_values) > 1 else 0.0
        return cls(ordered, scale if math.isfinite(scale) and scale > 1e-12 else 0.0)

    def pvalues(self, scores: np.ndarray, tail: Tail = "none") -> np.ndarray:
        """Right-tail p-values of ``scores`` (higher score = smaller p)."""
        scores = np.asarray(scores, dtype=np.float64)
        n = len(self.values)
        at_or_above = n - np.searchsorted(self.values, scores, side="left")
        p = (1.0 + at_or_above) / (1.0 + n)
        if tail == "exponential" and self.tail_scale > 0:
            beyond = scores > self.values[-1]
            excess = (scores[beyond] - self.values[-1]) / self.tail_scale
            p[beyond] = np.exp(-np.minimum(excess, 700.0)) / (1.0 + n)
        return p

    def to_json(self) -> list[float]:
        return [float(v) for v in self.values]


def combine(pvalues: np.ndarray, rule: FusionRule) -> np.ndarray:
    """``-log10`` of the combined p-value of each row of ``pvalues`` [texts, components]."""
    pvalues = np.clip(np.asarray(pvalues, dtype=np.float64), 1e-300, 1.0)
    m = pvalues.shape[1]
    if rule == "fisher":
        statistic = -2.0 * np.log(pvalues).sum(axis=1)
        log_p = _chi2_even_logsf(statistic, m)
    elif rule == "min_p":
        smallest = pvalues.min(axis=1)
        # log(1 - (1 - p)^m), stable for tiny p: log(-expm1(m * log1p(-p)))
        log_p = np.log(-np.expm1(m * np.log1p(-smallest)))
    else:
        raise ValueError(f"unknown fusion rule {rule!r}; choose from {', '.join(FUSION_RULES)}")
    return np.asarray(-log_p / math.log(10.0))


def _chi2_even_logsf(x: np.ndarray, m: int) -> np.ndarray:
    """log P(chi-square with 2m degrees of freedom > x), exact and finite for any x >= 0:
    ``sf = exp(-x/2) sum_{k<m} (x/2)^k / k!`` summed in log space."""
    from scipy.special import gammaln, logsumexp

    half = np.maximum(np.asarray(x, dtype=np.float64), 0.0)[:, None] / 2.0
    k = np.arange(m)[None, :]
    with np.errstate(divide="ignore"):  # log 0 = -inf for the k = 0 term at x = 0 is fine
        terms = k * np.log(half) - gammaln(k + 1)
    terms[:, 0] = 0.0  # (x/2)^0 / 0! = 1, also at x = 0
    return np.asarray(-half[:, 0] + logsumexp(terms, axis=1))


@dataclass(frozen=True)
class Fusion:
    """The fitted fused score: which components, their ID reference, and the rule."""

    references: Mapping[str, ReferenceDistribution]
    """Component score -> its held-out ID distribution."""
    rule: FusionRule
    tail: Tail

    @classmethod
    def fit(
        cls,
        reference_scores: Mapping[str, Sequence[float]],
        components: Sequence[str],
        rule: FusionRule,
        tail: Tail,
    ) -> Fusion:
        """From each component's values on held-out ID texts (components missing there are
        left out)."""
        refs = {
            name: ReferenceDistribution.fit(reference_scores[name])
            for name in components
            if name in reference_scores and len(reference_scores[name])
        }
        return cls(refs, rule, tail)

    @property
    def components(self) -> list[str]:
        return list(self.references)

    def assess(
        self, rows: Sequence[Mapping[str, float]]
    ) -> list[tuple[float, dict[str, float]] | None]:
        """Each text's fused score and its components' p-values; None for a text missing a
        component (e.g. the LM baselines when the full model did not run)."""
        out: list[tuple[float, dict[str, float]] | None] = [None] * len(rows)
        complete = [i for i, r in enumerate(rows) if all(n in r for n in self.references)]
        if not complete or not self.references:
            return out
        columns = np.stack(
            [
                ref.pvalues(np.array([rows[i][name] for i in complete]), self.tail)
                for name, ref in self.references.items()
            ],
            axis=1,
        )
        fused = combine(columns, self.rule)
        for row, i in enumerate(complete):
            out[i] = (
                float(fused[row]),
                dict(zip(self.references, columns[row].tolist(), strict=True)),
            )
        return out

    def score_many(self, rows: Sequence[Mapping[str, float]]) -> list[float | None]:
        """The fused score of each text's scores (None: see :meth:`assess`)."""
        return [None if a is None else a[0] for a in self.assess(rows)]
