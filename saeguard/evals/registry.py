"""The one table of evals: name -> settings, run function, metric version, and what it needs.

Adding a metric: write its module (a config dataclass, a ``VERSION`` and a run function), add
one row here, one field for its config in :class:`saeguard.jobs.eval.EvalConfig`, and its name
to the ``eval`` enum of ``saeguard/jobs/eval.schema.json`` (eval.json is validated on write).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from saeguard.activations.subject import EvalSubject
from saeguard.evals.absorption import VERSION as ABSORPTION_VERSION
from saeguard.evals.absorption import run_absorption
from saeguard.evals.ce import VERSION as CE_VERSION
from saeguard.evals.ce import run_ce
from saeguard.evals.core import VERSION as CORE_VERSION
from saeguard.evals.core import CoreConfig, run_core
from saeguard.evals.effective import VERSION as EFFECTIVE_VERSION
from saeguard.evals.effective import run_effective
from saeguard.evals.ood_probing import VERSION as OOD_PROBING_VERSION
from saeguard.evals.ood_probing import run_ood_probing
from saeguard.evals.probing import VERSION as PROBING_VERSION
from saeguard.evals.probing import run_probing
from saeguard.evals.results import MetricResult

Outcome = tuple[list[MetricResult], dict[str, Any]]
RunEval = Callable[[EvalSubject, Any, dict[str, Any]], Outcome]
"""(subject, the eval's config, what earlier evals shared) -> (metrics, details)."""


@dataclass(frozen=True, kw_only=True)
class EvalSpec:
    """One eval as the runner sees it."""

    name: str
    """Name in --evals and in eval.json."""
    settings: str
    """Field of EvalConfig holding the config its numbers depend on."""
    run: RunEval
    """Computes its metrics."""
    version: int
    """Version of its metric definitions: a finished eval of another version is re-run."""
    needs: tuple[str, ...] = ()
    """Evals whose shared outputs it reads (they run first, in the same invocation)."""


def _core(subject: EvalSubject, cfg: CoreConfig, shared: dict[str, Any]) -> Outcome:
    results, details, shared["abs_per_context"] = run_core(subject, cfg)
    return results, details


def _effective(subject: EvalSubject, _cfg: Any, shared: dict[str, Any]) -> Outcome:
    d_in = subject.sae.cfg.d_in
    return run_effective(shared["abs_per_context"], d_in, shared["seed"]), {}


def _plain(run: Callable[[EvalSubject, Any], Outcome]) -> RunEval:
    """An eval that needs nothing from the others."""
    return lambda subject, cfg, _shared: run(subject, cfg)


EVAL_SPECS: dict[str, EvalSpec] = {
    spec.name: spec
    for spec in (
        EvalSpec(name="core", settings="core", run=_core, version=CORE_VERSION),
        EvalSpec(name="ce", settings="ce", run=_plain(run_ce), version=CE_VERSION),
        EvalSpec(name="absorption", settings="absorption", run=_plain(run_absorption),
                 version=ABSORPTION_VERSION),
        EvalSpec(name="probing", settings="probing", run=_plain(run_probing),
                 version=PROBING_VERSION),
        EvalSpec(name="ood_probing", settings="ood_probing", run=_plain(run_ood_probing),
                 version=OOD_PROBING_VERSION),
        EvalSpec(name="effective", settings="core", run=_effective, version=EFFECTIVE_VERSION,
                 needs=("core",)),
    )
}  # fmt: skip
"""Every eval, in the order they run and are listed."""

EVALS = tuple(EVAL_SPECS)
