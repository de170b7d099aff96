"""``index.html`` of `saeguard run`: one page that summarises every step and links its reports."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from saeguard.report.html import HtmlPage, with_interval
from saeguard.report.ood_report import summary_sentences

STEP_NAMES = ("train", "eval", "monitor", "benchmark")
HEADLINE_SCORES = (
    "fused",
    "energy",
    "fallacious_count",
    "fallacious_surprisal_top",
    "fallacious_mass",
    "recon_error",
    "mahalanobis",
    "knn",
    "msp",
    "perplexity",
)


def _training_figure(curve: list[tuple[int, float]]) -> Figure | None:
    if not curve:
        return None
    tokens, fvu = zip(*curve, strict=True)
    fig = Figure(figsize=(6, 2.8))
    ax = fig.add_subplot()
    ax.plot(tokens, fvu, color="#4477aa")
    ax.set_xlabel("training activations")
    ax.set_ylabel("training FVU")
    ax.set_title("SAE training curve")
    fig.tight_layout()
    return fig


def write_run_report(
    out: Path,
    state: dict[str, Any],
    benchmark: dict[str, Any],
    evaluation: dict[str, Any] | None,
    curve: list[tuple[int, float]],
) -> Path:
    """Write ``out/index.html`` from run.json's state, the eval and benchmark documents and the
    training curve ((activations seen, training FVU) pairs)."""
    cfg = state["config"]
    page = HtmlPage(f"saeguard run: {cfg['model']} {cfg['hook']} on {cfg['corpus']}")
    steps = state.get("steps", {})
    page.paragraph(
        "Harvest and train a masked TopK SAE, evaluate it, fit and calibrate the OOD monitor, "
        "benchmark it against baselines on distribution shifts. Each section links its full report."
        + (" QUICK (smoke-test) SCALE: the numbers are not results." if cfg.get("quick") else "")
    )
    page.table(
        ["step", "time (last run)"],
        [[name, f"{steps.get(name, {}).get('seconds', 0):.0f} s"] for name in STEP_NAMES],
    )

    page.heading("1. SAE training")
    results = steps.get("train", {}).get("results", {})
    masking = results.get("masking", {})
    rows = []
    for name, entry in results.get("saes", {}).items():
        held = entry.get("held_out", {})
        rows.append(
            [
                name,
                results.get("training_tokens", ""),
                held.get("fvu", ""),
                held.get("l0", ""),
                held.get("dead_frac", ""),
                masking.get("masked_fraction", 0.0),
            ]
        )
    if rows:
        page.table(
            ["SAE", "training tokens", "held-out FVU", "L0", "dead frac", "masked frac"], rows
        )
    fig = _training_figure(curve)
    if fig is not None:
        page.figure(fig, "Training FVU by activations seen.")

    page.heading("2. Evaluation")
    if evaluation is not None:
        metrics = evaluation["metrics"]
        keep = ("fvu", "explained_variance", "l0", "dead_frac", "ce_loss_recovered", "kl_recovered")
        page.table(
            ["metric", "value [95% interval]"],
            [
                [n, with_interval(metrics[n]["value"], metrics[n].get("ci95"), 4)]
                for n in keep
                if n in metrics
            ],
        )
        page.link(
            os.path.relpath(out / "sae" / "eval.html", out), "eval.html: full evaluation with plots"
        )

    page.heading("3. OOD monitor")
    cal = benchmark["calibration"]
    page.paragraph(
        f"Flag when {cal['flag_score']} > {cal['threshold']:.4g} (target FPR "
        f"{cal['target_fpr']:.0%}, calibrated on {cal.get('n_texts')} held-out ID texts). "
        f"Measured FPR on {cal['measured_on']}: "
        f"{with_interval(cal['measured_fpr'], cal['measured_fpr_ci95'])}. Score new text with "
        f'`saeguard ood score --monitor {out / "monitor"} "some text"`.'
    )

    page.heading("4. OOD benchmark: AUROC [95% interval]")
    names = [n for n in HEADLINE_SCORES if n in benchmark["scores"]]
    page.table(
        ["shift", *names, "flagged"],
        [
            [shift]
            + [
                with_interval(row["scores"][n]["auroc"], row["scores"][n]["auroc_ci95"])
                for n in names
            ]
            + [f"{row['flag_rate']:.2f}"]
            for shift, row in benchmark["shifts"].items()
        ],
    )
    page.raw(
        "<ul>"
        + "".join(f"<li>{html.escape(s)}</li>" for s in summary_sentences(benchmark))
        + "</ul>"
    )
    page.link("ood/ood_report.html", "ood_report.html: every score, FPR@95, ROC curves, histograms")
    page.link(
        "ood/examples.html", "examples.html: flagged texts with the latents that raised the flag"
    )
    page.link(
        "ood/ood_benchmark.json",
        "ood_benchmark.json (schema: saeguard/jobs/ood_benchmark.schema.json)",
    )
    return page.write(out / "index.html")
