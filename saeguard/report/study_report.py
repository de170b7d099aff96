"""study.html for the masking study: the table plus one plot per metric (mean ± interval)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from saeguard.report.html import HtmlPage


def write_study_report(cfg: Any, table: dict[str, Any], finding: str, path: Path) -> Path:
    from saeguard.evals.masking_study import STUDY_METRICS, _cell

    page = HtmlPage("Masking study: masked regularization vs baseline")
    page.paragraph(
        f"{cfg.model} {cfg.hook}, corpus {cfg.corpus}; TopK x{cfg.expansion}; {cfg.tokens:,} "
        f"training activations per SAE; {cfg.seeds} seed(s)."
        + (" QUICK MODE: smoke test." if cfg.quick else "")
    )
    page.paragraph("Finding: " + finding)
    headers = ["SAE", *[label for _, label, _ in STUDY_METRICS]]
    rows = [
        [name, *[_cell(row[m], True).replace("<br>", " ") for m, _, _ in STUDY_METRICS]]
        for name, row in table.items()
    ]
    page.table(headers, rows)
    fig = Figure(figsize=(12, 6))
    for i, (metric, label, better) in enumerate(STUDY_METRICS):
        ax = fig.add_subplot(2, 4, i + 1)
        for k in cfg.ks:
            xs, ys, errs = [], [], []
            for p in cfg.mask_probs:
                entry = table[f"p={p:g}, k={k}"].get(metric)
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
                    label=f"k={k}",
                )
        ax.set_title(f"{label} ({better} better)", fontsize=9)
        ax.set_xlabel("mask probability", fontsize=8)
        if i == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    page.figure(fig, "Mean over seeds with bootstrap 95% intervals, per mask probability.")
    return page.write(path)
