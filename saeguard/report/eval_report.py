"""eval.html: the numbers of eval.json with the plots people look at first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from saeguard.report.html import HtmlPage


def metric_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for name, m in metrics.items():
        ci = m.get("ci95")
        rows.append(
            [
                name,
                m["eval"],
                m["value"],
                f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "",
                f"{m.get('n', '')} {m.get('unit', '')}".strip(),
            ]
        )
    return rows


def _frequency_figure(details: dict[str, Any]) -> Figure | None:
    hist = details.get("latent_frequency_log10_histogram")
    if not hist:
        return None
    fig = Figure(figsize=(7, 3))
    ax = fig.add_subplot()
    edges = np.asarray(hist["edges"])
    ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", color="#4477aa")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(f"Latent frequency ({details.get('never_active', 0)} never active)")
    return fig


def _probing_figure(tasks: list[dict[str, Any]]) -> Figure | None:
    sets = sorted({t["set"] for t in tasks})
    if not sets:
        return None
    fig = Figure(figsize=(3.2 * len(sets), 3))
    for i, name in enumerate(sets):
        ax = fig.add_subplot(1, len(sets), i + 1)
        for kind, color in (("sae", "#cc3311"), ("raw", "#4477aa")):
            rows = [
                t for t in tasks if t["set"] == name and t["features"] == kind and t["k"] != "all"
            ]
            ks = sorted({t["k"] for t in rows})
            ax.plot(
                ks,
                [np.mean([t["accuracy"] for t in rows if t["k"] == k]) for k in ks],
                "o-",
                color=color,
                label=kind,
            )
        full = [t["accuracy"] for t in tasks if t["set"] == name and t["k"] == "all"]
        if full:
            ax.axhline(float(np.mean(full)), ls="--", color="#888", label="raw, all dims")
        ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel("k")
        ax.set_ylim(0.4, 1.02)
        if i == 0:
            ax.set_ylabel("test accuracy")
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _absorption_figure(letters: list[dict[str, Any]]) -> Figure | None:
    if not letters:
        return None
    fig = Figure(figsize=(9, 3))
    ax = fig.add_subplot()
    x = np.arange(len(letters))
    ax.bar(
        x - 0.2,
        [entry["full_absorption"] for entry in letters],
        0.4,
        label="full absorption rate",
        color="#cc3311",
    )
    ax.bar(
        x + 0.2,
        [entry["absorption_fraction"] for entry in letters],
        0.4,
        label="absorption fraction",
        color="#ee7733",
    )
    ax.set_xticks(x, [entry["letter"] + ("" if entry["counted"] else "*") for entry in letters])
    ax.set_title("Absorption per letter (* : probe F1 too low, not averaged)")
    ax.legend(fontsize=8)
    return fig


def write_eval_report(document: dict[str, Any], path: Path) -> Path:
    sae = document["sae"]
    page = HtmlPage(f"SAE evaluation: {sae['architecture']} on {sae['model']} {sae['hook']}")
    page.paragraph(
        f"SAE {sae['path']} (d_in {sae['d_in']}, d_sae {sae['d_sae']}, k {sae.get('k')}, masking "
        f"{sae.get('masking', {}).get('mask_prob', 0)}). saeguard {document['saeguard_version']}, "
        f"{document.get('created', '')}. Intervals are bootstrap 95% over the unit named in "
        "the table."
    )
    if not document.get("complete"):
        page.paragraph(
            "Incomplete: some evals have not run yet (re-run saeguard eval to finish).", "flag"
        )
    page.heading("Metrics")
    page.table(["metric", "eval", "value", "95% interval", "n"], metric_rows(document["metrics"]))
    details = document["details"]
    figures = [
        ("Latent frequency over the evaluation tokens", _frequency_figure(details.get("core", {}))),
        (
            "Sparse probing accuracy vs k (mean over one-vs-rest tasks)",
            _probing_figure(details.get("probing", {}).get("tasks", [])),
        ),
        (
            "First-letter feature absorption",
            _absorption_figure(details.get("absorption", {}).get("letters", [])),
        ),
    ]
    for caption, fig in figures:
        if fig is not None:
            page.heading(caption)
            page.figure(fig, caption)
    timings = document.get("timings_s", {})
    page.heading("Timings")
    page.table(["eval", "time"], [[k, f"{v:.2f} s"] for k, v in timings.items()])
    return page.write(path)
