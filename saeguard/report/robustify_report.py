"""``robustify.html``: before/after of `saeguard robustify`, with intervals, a plot and the
training curve, in one self-contained page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from saeguard.report.html import HtmlPage, with_interval

PLOTTED = (
    "fallacious_count_perturbed",
    "fallacious_count_clean",
    "flag_rate_perturbed",
    "auroc_energy",
    "nll_clean",
    "probe_accuracy_perturbed",
    "continuation_accuracy_perturbed",
)


def summary_sentence(document: dict[str, Any], arm: str = "robust") -> str:
    """The result in one sentence, whichever way it went (the README quotes it)."""
    c = document["arms"][arm]["comparison"]
    count, loss = c["fallacious_count_perturbed"], c["nll_clean"]
    probe = c.get("probe_accuracy_perturbed")
    falls = "fell" if count["difference_ci95"][1] < 0 else (
        "rose" if count["difference_ci95"][0] > 0 else "did not change measurably"
    )  # fmt: skip
    text = (
        f"On {document['held_out']['texts']} held-out texts with {document['shift']}, the "
        f"fallacious count {falls} from {count['before']:.4f} to {count['after']:.4f} per token "
        f"({count['relative_change']:+.0%}, 95% interval of the difference "
        f"[{count['difference_ci95'][0]:+.4f}, {count['difference_ci95'][1]:+.4f}]) while the "
        f"clean next-token loss changed by {loss['relative_change']:+.1%} "
        f"(tolerance +{document['checks']['loss_tolerance']:.0%})"
    )
    other = c.get("nll_other")
    if other is not None:
        text += (
            f", on {document['held_out']['capability_corpus']} text by "
            f"{other['relative_change']:+.1%}"
        )
    if probe is not None:
        text += (
            f" and topic-probe accuracy on perturbed text went from {probe['before']:.3f} to "
            f"{probe['after']:.3f} (difference [{probe['difference_ci95'][0]:+.3f}, "
            f"{probe['difference_ci95'][1]:+.3f}])"
        )
    return text + "."


def _figure(document: dict[str, Any]) -> Figure:
    arms = document["arms"]
    keys = [k for k in PLOTTED if k in arms["robust"]["comparison"]]
    fig = Figure(figsize=(3.0 * len(keys), 3.0))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        entries = [("before", arms["robust"]["comparison"][key], "before", "#999999")]
        entries += [
            (name, arm["comparison"][key], "after", color)
            for (name, arm), color in zip(arms.items(), ("#4477aa", "#ee6677"), strict=False)
        ]
        for j, (_, entry, which, color) in enumerate(entries):
            value, (low, high) = entry[which], entry[f"{which}_ci95"]
            ax.bar(j, value, color=color)
            ax.errorbar(j, value, yerr=[[value - low], [high - value]], color="black", capsize=4)
        ax.set_xticks(range(len(entries)), [e[0] for e in entries], fontsize=8)
        ax.set_title(key.replace("_", " "), fontsize=9)
    fig.tight_layout()
    return fig


def _loss_figure(document: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(7, 2.8))
    ax = fig.add_subplot(1, 2, 1)
    ax2 = fig.add_subplot(1, 2, 2)
    for (name, arm), color in zip(document["arms"].items(), ("#4477aa", "#ee6677"), strict=False):
        losses = arm["losses"]
        if not losses:
            continue
        steps = np.arange(1, len(losses) + 1)
        ax.plot(steps, [r["consistency"] for r in losses], color=color, label=name)
        ax2.plot(steps, [r["lm"] for r in losses], color=color, label=name)
    ax.set_title("latent consistency loss (perturbed vs clean)", fontsize=9)
    ax2.set_title("next-token loss on clean training text", fontsize=9)
    for a in (ax, ax2):
        a.set_xlabel("step")
        a.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_robustify_report(document: dict[str, Any], path: str | Path) -> Path:
    """Write the report page to ``path``."""
    cfg = document["config"]
    page = HtmlPage(f"saeguard robustify: {document['model']} against {document['shift']}")
    held = document["held_out"]
    page.paragraph(
        f"LoRA adapters (rank {cfg['rank']}, {', '.join(cfg['target_modules'])}"
        f"{', blocks up to the hook' if cfg['up_to_hook'] else ''}) trained for {cfg['steps']} "
        f"steps of {cfg['batch_size']} text pairs to keep the SAE latents at {document['hook']} on "
        f"perturbed text close to those of the clean text (weight {cfg['consistency_weight']}), "
        f"plus the next-token loss on clean ID text (weight {cfg['lm_weight']}). Before and after "
        f"are measured on the same {held['texts']} held-out {document['corpus']} {held['split']}"
        f"-split texts and their perturbed copies (same seeds), {held['windows_per_text']} "
        "window(s) per text, against the base model's ID statistics. The topic probe was trained "
        f"on clean base-model activations of {held['probe_texts']} {held['probe_split']}-split "
        "texts. Intervals: paired bootstrap 95%."
        + (" QUICK (smoke-test) SCALE: the numbers are not results." if cfg.get("quick") else "")
    )
    page.paragraph(summary_sentence(document))
    if "control" in document["arms"]:
        page.paragraph("Control: " + summary_sentence(document, "control").replace(
            "On ", "the same training without the consistency loss, on ", 1))  # fmt: skip
    checks = document["checks"]
    page.table(
        ["acceptance check", "measured", "holds"],
        [
            [
                f"clean next-token loss rises by at most {checks['loss_tolerance']:.0%}",
                f"{checks['clean_loss_relative_change']:+.2%}",
                "yes" if checks["clean_loss_within_tolerance"] else "NO",
            ],
            [
                "fallacious count on perturbed text falls (interval below 0)",
                f"{checks['fallacious_count_change']:+.4f}",
                "yes" if checks["fallacious_count_falls"] else "NO",
            ],
        ]
        + (
            [
                [
                    f"next-token loss on {document['held_out']['capability_corpus']} text "
                    f"rises by at most {checks['loss_tolerance']:.0%} (beyond the ID corpus)",
                    f"{checks['other_loss_relative_change']:+.2%}",
                    "yes" if checks["other_loss_within_tolerance"] else "NO",
                ]
            ]
            if "other_loss_relative_change" in checks
            else []
        ),
    )
    for name, arm in document["arms"].items():
        page.heading(f"{name}: before / after / difference")
        rows = []
        for e in arm["comparison"].values():
            rows.append([
                e["label"],
                with_interval(e["before"], e["before_ci95"], 4),
                with_interval(e["after"], e["after_ci95"], 4),
                with_interval(e["difference"], e["difference_ci95"], 4),
                f"{e['relative_change']:+.1%}" if "relative_change" in e else "",
                e["better"],
            ])  # fmt: skip
        page.table(["quantity", "before", "after", "after - before", "relative", "aim"], rows)
    versus = document.get("robust_vs_control")
    if versus:
        page.heading("robust against control (after each; same texts, paired)")
        page.paragraph(
            "Each adapter's after-measurement side by side: the control trained on the LM loss "
            "alone with the same data and steps, so robust - control is what the consistency loss "
            "adds. Intervals: paired bootstrap 95% over the same held-out texts."
        )
        page.table(
            ["quantity", "control", "robust", "robust - control", "aim"],
            [
                [
                    e["label"],
                    with_interval(e["before"], e["before_ci95"], 4),
                    with_interval(e["after"], e["after_ci95"], 4),
                    with_interval(e["difference"], e["difference_ci95"], 4),
                    e["better"],
                ]
                for e in versus.values()
            ],
        )
    page.figure(_figure(document), "Before (grey) and after each adapter, with 95% intervals.")
    page.figure(_loss_figure(document), "Training losses per step.")
    page.paragraph(
        "How to read the OOD AUROC: it measures how well the base model's monitor still tells "
        "perturbed from clean text. A robustified model represents perturbed text more like "
        "clean text, so the AUROC falls: the monitor sees less shift because there is less. "
        f"Load the adapter with `--adapter {document['arms']['robust']['adapter']}` in "
        "`saeguard ood score`, `saeguard ood benchmark` and `saeguard eval`."
    )
    timings = ", ".join(f"{step} {sec:.1f} s" for step, sec in document["timings_s"].items())
    page.paragraph(f"Timings: {timings}.")
    return page.write(path)
