"""Renders a comparison of evaluated SAEs (``saeguard compare``): terminal table, markdown and
compare.html. The numbers come from :mod:`saeguard.jobs.compare`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saeguard.evals.results import MetricResult
from saeguard.fileio import atomic_write_text
from saeguard.report.html import HtmlPage, fmt, markdown_table


@dataclass
class Comparison:
    headers: list[str]
    rows: list[list[str]]
    terminal: str
    markdown: str


def render_comparison(headers: list[str], rows: list[list[str]], out: Path | None) -> Comparison:
    """The table as text and markdown; with ``out``, also compare.md and compare.html there."""
    md = markdown_table(headers, rows)
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in [headers, *rows]
    ]
    if out is not None:
        atomic_write_text(out / "compare.md", md + "\n")
        page = HtmlPage("SAE comparison")
        page.paragraph(
            "Values with bootstrap 95% intervals; Δ is the difference from the first SAE with a "
            "bootstrap 95% interval (* : the interval excludes 0)."
        )
        page.table(headers, rows)
        page.write(out / "compare.html")
    return Comparison(headers, rows, "\n".join(lines), md)


def metric_cell(metric: MetricResult | None) -> str:
    """value [interval] of one metric, or a dash."""
    if metric is None:
        return "—"
    if metric.ci is None:
        return fmt(metric.value)
    return f"{fmt(metric.value)} [{fmt(metric.ci[0], 3)}, {fmt(metric.ci[1], 3)}]"


def delta_cell(delta: float, low: float, high: float) -> str:
    """The difference from the reference with its interval, starred when it excludes 0."""
    star = "*" if low > 0 or high < 0 else ""
    return f"  Δ {delta:+.4g} [{low:+.3g}, {high:+.3g}]{star}"
