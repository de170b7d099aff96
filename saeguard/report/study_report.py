"""study.html for the masking study: the table plus one plot per metric (mean ± interval)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from saeguard.report.html import HtmlPage

Metrics = tuple[tuple[str, str, str], ...]
"""(metric, label, which direction is better) of each column, in order."""


def write_study_report(
    cfg: Any, table: dict[str, Any], finding: str, path: Path, metrics: Metrics
) -> Path:
    page = HtmlPage("Masking study: masked regularization vs baseline")
    page.paragraph(
        f"{cfg.model} {cfg.hook}, corpus {cfg.corpus}; {', '.join(_archs(cfg))}, "
        f"x{cfg.expansion}; {cfg.tokens:,} "
        f"training activations per SAE; {cfg.seeds} seed(s)."
        + (" QUICK MODE: smoke test." if cfg.quick else "")
    )
    page.paragraph("Finding: " + finding)
    headers = ["SAE", *[label for _, label, _ in metrics]]
    rows = [
        [name, *[study_cell(row[m], True).replace("<br>", " ") for m, _, _ in metrics]]
        for name, row in table.items()
    ]
    page.table(headers, rows)
    fig = Figure(figsize=(12, 6))
    for i, (metric, label, better) in enumerate(metrics):
        ax = fig.add_subplot(2, 4, i + 1)
        for arch, k in ((a, k) for a in _archs(cfg) for k in cfg.ks):
            xs, ys, errs = [], [], []
            for p in cfg.mask_probs:
                entry = _row(table, arch, p, k).get(metric)
                if entry is None:
                    continue
                xs.append(p)
                ys.append(entry["mean"])
                low, high = entry.get("ci95", [entry["mean"], entry["mean"]])
                errs.append([entry["mean"] - low, high - entry["mean"]])
            if xs:
                ax.errorbar(
                    xs,
                    ys,
                    yerr=list(zip(*errs, strict=True)),
                    marker="o",
                    capsize=3,
                    label=f"{arch} k={k}" if len(_archs(cfg)) > 1 else f"k={k}",
                )
        ax.set_title(f"{label} ({better} better)", fontsize=9)
        ax.set_xlabel("mask probability", fontsize=8)
        if i == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    page.figure(fig, "Mean over seeds with bootstrap 95% intervals, per mask probability.")
    return page.write(path)


def render_markdown(cfg: Any, table: dict[str, Any], finding: str, metrics: Metrics) -> str:
    """study.md: the table of every SAE cell and the settings."""
    headers = ["SAE", *[label for _, label, _ in metrics]]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name, row in table.items():
        cells = [study_cell(row[m], True) for m, _, _ in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    settings = (
        f"{cfg.model} `{cfg.hook}`, corpus {cfg.corpus}; {', '.join(_archs(cfg))}, "
        f"expansion {cfg.expansion}, "
        f"{cfg.tokens:,} training activations per SAE, {cfg.seeds} seed(s) per cell"
        + (" (**--quick**: smoke-test scale, not evidence)" if cfg.quick else "")
    )
    return (
        "# Masking study: masked regularization vs baseline\n\n"
        f"{settings}.\n\n"
        "Each cell: mean over seeds [bootstrap 95% interval over evaluation units]; "
        "Δ: difference from p=0 at the same architecture and k, paired bootstrap 95% interval "
        "(* : excludes 0). Seeds differ only in initialisation, so the intervals cover "
        "evaluation noise, not training noise.\n\n"
        + "\n".join(lines)
        + f"\n\n**Finding.** {finding}\n"
    )


def _archs(cfg: Any) -> list[str]:
    return list(getattr(cfg, "archs", None) or ["topk"])


def _row(table: dict[str, Any], arch: str, p: float, k: int) -> dict[str, Any]:
    """The table row of one cell (rows of studies before architectures were arms lack the
    architecture in their name)."""
    return table.get(f"{arch}, p={p:g}, k={k}") or table.get(f"p={p:g}, k={k}") or {}


def study_cell(entry: dict[str, Any] | None, show_delta: bool) -> str:
    """mean [interval] of a study cell, with its difference from the baseline."""
    if entry is None:
        return "—"
    text = f"{entry['mean']:.3f}"
    if "ci95" in entry:
        text += f" [{entry['ci95'][0]:.3f}, {entry['ci95'][1]:.3f}]"
    if show_delta and "delta" in entry:
        low, high = entry["delta_ci95"]
        star = "*" if low > 0 or high < 0 else ""
        text += f"<br>Δ {entry['delta']:+.3f} [{low:+.3f}, {high:+.3f}]{star}"
    return text
