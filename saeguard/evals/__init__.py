"""Benchmark-grade SAE metrics (SPEC §4), one module per metric, and their registry
(the ``saeguard eval`` job is :mod:`saeguard.jobs.eval`).

- :mod:`~saeguard.evals.core`: FVU, explained variance, MSE, cosine, L2 ratio, L0, dead/dense
- :mod:`~saeguard.evals.ce`: CE loss and KL recovered by splicing
- :mod:`~saeguard.evals.absorption`: first-letter feature absorption
- :mod:`~saeguard.evals.probing`: sparse probing beside raw-activation probes
- :mod:`~saeguard.evals.ood_probing`: probes under typos and language shift
- :mod:`~saeguard.evals.effective`: effective number of features
"""

from saeguard.evals.registry import EVAL_SPECS, EVALS
from saeguard.evals.results import MetricResult

__all__ = ["EVALS", "EVAL_SPECS", "MetricResult"]
