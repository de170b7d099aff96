"""``saeguard compare``: several evaluated SAEs side by side.

The first directory is the reference. For every other SAE and metric the table shows its value
and ``Δ`` (value − reference) with a bootstrap 95% interval: units (contexts, tasks, letters)
are resampled jointly when both SAEs were scored on the same units, independently otherwise.
An interval that excludes 0 is marked with ``*``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saeguard.evals.results import MetricResult, paired_difference
from saeguard.evals.runner import load_eval
from saeguard.fileio import atomic_write_text, claim_output_directory
from saeguard.report.html import HtmlPage, fmt, markdown_table


@dataclass
class Comparison:
    headers: list[str]
    rows: list[list[str]]
    terminal: str
    markdown: str


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
        row = [name, _cell(reference)]
        for document, samples in loaded[1:]:
            other = _metric(document, samples, name)
            cell = _cell(other)
            if reference is not None and other is not None:
                version_ok = reference.version == other.version
                diff = paired_difference(reference, other, seed) if version_ok else None
                if not version_ok:
                    cell += " (metric version differs)"
                elif diff is not None:
                    delta, (low, high) = diff
                    star = "*" if low > 0 or high < 0 else ""
                    cell += f"  Δ {delta:+.4g} [{low:+.3g}, {high:+.3g}]{star}"
            row.append(cell)
        rows.append(row)
    md = markdown_table(headers, rows)
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in [headers, *rows]
    ]
    terminal = "\n".join(lines)
    if out:
        target = Path(out)
        claim_output_directory(target, "compare", index=("compare.md",))
        atomic_write_text(target / "compare.md", md + "\n")
        page = HtmlPage("SAE comparison")
        page.paragraph(
            "Values with bootstrap 95% intervals; Δ is the difference from the first SAE with a "
            "bootstrap 95% interval (* : the interval excludes 0)."
        )
        page.table(headers, rows)
        page.write(target / "compare.html")
    return Comparison(headers, rows, terminal, md)


def _cell(metric: MetricResult | None) -> str:
    if metric is None:
        return "—"
    if metric.ci is None:
        return fmt(metric.value)
    return f"{fmt(metric.value)} [{fmt(metric.ci[0], 3)}, {fmt(metric.ci[1], 3)}]"
