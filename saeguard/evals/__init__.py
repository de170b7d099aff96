"""Benchmark-grade SAE metrics (SPEC §4), one module per metric, and the ``saeguard eval`` runner.

- :mod:`~saeguard.evals.core`: FVU, explained variance, MSE, cosine, L2 ratio, L0, dead/dense
- :mod:`~saeguard.evals.ce`: CE loss and KL recovered by splicing
- :mod:`~saeguard.evals.absorption`: first-letter feature absorption
- :mod:`~saeguard.evals.probing`: sparse probing beside raw-activation probes
- :mod:`~saeguard.evals.ood_probing`: probes under typos and language shift
- :mod:`~saeguard.evals.effective`: effective number of features
"""

from saeguard.evals.results import MetricResult
from saeguard.evals.runner import EVALS, EvalConfig, load_eval, run_eval

__all__ = ["EVALS", "EvalConfig", "MetricResult", "load_eval", "run_eval"]
