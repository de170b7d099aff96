"""``saeguard compare``: several evaluated SAEs side by side.

The first directory is the reference. For every other SAE and metric the table shows its value
and ``Δ`` (value − reference) with a bootstrap 95% interval: units (contexts, tasks, letters)
are resampled jointly when both SAEs were scored on the same units, independently otherwise.
An interval that excludes 0 is marked with ``*``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saeguard.evals.results import MetricResult, paired_difference
from saeguard.fileio import claim_output_directory
from saeguard.jobs.eval import load_eval

if TYPE_CHECKING:
    from saeguard.report.compare import Comparison


def _metric(document: dict[str, Any], samples: dict[str, Any], name: str) -> MetricResult | None:
    entry = document["metrics"].get(name)
    if entry is None:
        return None
    stored = samples.get(name, {})
    ci = entry.get("ci95")
    return MetricResult(
        name, entry["version"], entry["value"], tuple(ci) if ci else None,
        samples=stored.get("samples", {}), statistic=stored.get("statistic", "mean"),
    )  # fmt: skip


def _label(document: dict[str, Any], directory: str) -> str:
    sae = document["sae"]
    mask = sae.get("masking", {}).get("mask_prob", 0)
    return f"{Path(directory).name} ({sae['architecture']} k={sae.get('k')} p={mask})"


def compare(directories: list[str], out: str = "", metrics: str = "", seed: int = 0) -> Comparison:
    from saeguard.report.compare import delta_cell, metric_cell, render_comparison

    loaded = [load_eval(d) for d in directories]
    names: list[str] = []
    for document, _ in loaded:
        names += [n for n in document["metrics"] if n not in names]
    if metrics:
        wanted = [m.strip() for m in metrics.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in names]
        if unknown:
            from saeguard.errors import ConfigError

            raise ConfigError(f"no SAE has metrics {unknown}; known: {', '.join(names)}")
        names = wanted
    headers = ["metric"] + [_label(doc, d) for (doc, _), d in zip(loaded, directories, strict=True)]
    rows = []
    for name in names:
        reference = _metric(*loaded[0], name)
        row = [name, metric_cell(reference)]
        for document, samples in loaded[1:]:
            other = _metric(document, samples, name)
            cell = metric_cell(other)
            if reference is not None and other is not None:
                version_ok = reference.version == other.version
                diff = paired_difference(reference, other, seed) if version_ok else None
                if not version_ok:
                    cell += " (metric version differs)"
                elif diff is not None:
                    delta, (low, high) = diff
                    cell += delta_cell(delta, low, high)
            row.append(cell)
        rows.append(row)
    if out:
        claim_output_directory(Path(out), "compare", index=("compare.md",))
    return render_comparison(headers, rows, Path(out) if out else None)


@dataclass(kw_only=True)
class CompareConfig:
    """`saeguard compare`: which evaluated SAEs, and what to show."""

    directories: list[str]
    """SAE (or eval output) directories with eval.json."""
    out: str = ""
    """Directory for compare.html and compare.md (empty: none)."""
    metrics: str = ""
    """Comma-separated metric names to show (empty: all)."""
    markdown: bool = False
    """Also print the markdown table."""
    seed: int = 0
    """Seed of the bootstrap."""
