"""The OOD benchmark's HTML: tables, ROC curves, score histograms and explained examples."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from saeguard.ood.metrics import score_values
from saeguard.ood.scores import TOKEN_SCORES
from saeguard.report.html import HtmlPage, with_interval

CURVE_SCORES = (
    "fused",
    "energy",
    "fallacious_count",
    "recon_error",
    "mahalanobis",
    "knn",
    "msp",
    "perplexity",
)


def _grid(n: int) -> tuple[int, int]:
    cols = min(3, n)
    return math.ceil(n / cols), cols


def roc_figure(
    raw: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]], scores: list[str]
) -> Figure:
    rows, cols = _grid(len(raw))
    fig = Figure(figsize=(4.2 * cols, 3.6 * rows))
    for i, (shift, (ood, neg)) in enumerate(raw.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for score in [s for s in CURVE_SCORES if s in scores]:
            pos, negs = score_values(ood, score), score_values(neg, score)
            labels = np.r_[np.zeros(len(negs)), np.ones(len(pos))]
            fpr, tpr, _ = roc_curve(labels, np.r_[negs, pos])
            style = "-" if score in ("fused", "energy", "fallacious_count", "recon_error") else "--"
            ax.plot(fpr, tpr, style, label=score, linewidth=1.3)
        ax.plot([0, 1], [0, 1], ":", color="#999", linewidth=0.8)
        ax.set_title(shift, fontsize=10)
        ax.set_xlabel("FPR", fontsize=8)
        ax.set_ylabel("TPR", fontsize=8)
        if i == 0:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def histogram_figure(
    raw: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]],
    score: str,
    threshold: float | None,
    negative_labels: dict[str, str] | None = None,
) -> Figure:
    rows, cols = _grid(len(raw))
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows))
    for i, (shift, (ood, neg)) in enumerate(raw.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        pos, negs = score_values(ood, score), score_values(neg, score)
        both = np.r_[pos, negs]
        low, high = np.percentile(both, [0.5, 99.5]) if len(both) else (0, 1)
        bins = np.linspace(low, high if high > low else low + 1, 40).tolist()
        ax.hist(
            np.clip(negs, low, high), bins=bins, alpha=0.6, label="in-distribution", color="#4477aa"
        )
        ax.hist(np.clip(pos, low, high), bins=bins, alpha=0.6, label=shift, color="#cc6677")
        if threshold is not None and low <= threshold <= high:
            ax.axvline(threshold, color="#222", linestyle="--", linewidth=1, label="threshold")
        ax.set_title(shift, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(f"{score}: in-distribution vs shifted texts", fontsize=11)
    fig.tight_layout()
    return fig


def _cell(cell: dict[str, Any], metric: str) -> str:
    return with_interval(cell[metric], cell[f"{metric}_ci95"])


def summary_sentences(document: dict[str, Any]) -> list[str]:
    """Per shift: the best SAE score against Mahalanobis, said plainly with intervals."""
    out = []
    for shift, row in document["shifts"].items():
        cells = row["scores"]
        sae = [s for s in document["sae_scores"] if s in cells]
        if not sae or "mahalanobis" not in cells:
            continue
        best = max(sae, key=lambda s: cells[s]["auroc"])
        b, m = cells[best], cells["mahalanobis"]
        if b["auroc_ci95"][0] > m["auroc_ci95"][1]:
            verdict = "beats"
        elif b["auroc_ci95"][1] < m["auroc_ci95"][0]:
            verdict = "loses to"
        else:
            verdict = "is level with (intervals overlap)"
        out.append(
            f"{shift}: best SAE score {best} AUROC {_cell(b, 'auroc')} {verdict} Mahalanobis "
            f"{_cell(m, 'auroc')}."
        )
    return out


SUMMARY_HEADERS = ("shift", "best single score", "fused", "best baseline",
                   "fused vs best baseline")  # fmt: skip
SUMMARY_NOTE = (
    "AUROC [95% interval], three decimals (near 1 the intervals of two scores can be apart by "
    "less than the two-decimal tables show)."
)


def fused_summary(document: dict[str, Any]) -> tuple[list[list[str]], list[str]]:
    """The fused score's summary as table rows (per shift: the best single score, the fused
    score and its verdict against the best baseline, intervals compared) and the sentences
    under it (the tally, each score's mean AUROC); empty without a summary. Bold is marked
    ``**`` for markdown."""
    summary = document.get("summary")
    if not summary:
        return [], []

    def fine(value: float, interval: list[float]) -> str:
        return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"

    rows = []
    for shift, e in summary["per_shift"].items():
        fused = fine(e["fused_auroc"], e["fused_auroc_ci95"])
        if not e["within_margin_of_best_single"]:
            fused += f" (below best - {summary['margin']})"
        base = "-"
        if "best_baseline" in e:
            best = fine(e["best_baseline_auroc"], e["best_baseline_auroc_ci95"])
            base = f"{e['best_baseline']} {best}"
        single = f"{e['best_single']} {fine(e['best_single_auroc'], e['best_single_auroc_ci95'])}"
        rows.append([shift, single, fused, base, e.get("vs_best_baseline", "-")])
    tally = summary["vs_best_baseline"]
    within = sum(e["within_margin_of_best_single"] for e in summary["per_shift"].values())
    means = sorted(summary["mean_auroc"].items(), key=lambda kv: -kv[1])
    sentences = [
        f"Fused score against the best baseline of each shift (95% intervals; ties overlap): "
        f"**{tally['win']} wins, {tally['tie']} ties, {tally['loss']} losses**; within "
        f"{summary['margin']} of the best single score on {within} of "
        f"{len(summary['per_shift'])} shifts.",
        "Mean AUROC over the shifts: "
        + ", ".join(
            f"{'**' + k + '**' if k == summary['fused_score'] else k} {v:.3f}" for k, v in means
        )  # fmt: skip
        + ".",
    ]
    return rows, sentences


def _token_colour(value: float | None, top: float) -> str:
    if value is None or top <= 0:
        return "transparent"
    alpha = min(1.0, max(0.0, value / top))
    return f"rgba(214,96,77,{alpha:.2f})"


def token_heatmap_html(tokens: list[dict[str, Any]], score: str) -> str:
    """The scored tokens of a text, each shaded by ``score`` (darker: further from ID), with a
    tooltip of its per-token scores and the fallacious latents that fired on it."""
    values = [t.get(score) for t in tokens]
    finite = [v for v in values if v is not None]
    top = max(finite) if finite else 0.0
    spans = []
    for token, value in zip(tokens, values, strict=True):
        tip = [f"{k}: {token[k]:.3g}" for k in TOKEN_SCORES if token.get(k) is not None]
        tip += [
            f"latent {lat['latent']} (weight {lat['weight']:.3g}, value {lat['value']:.3g})"
            for lat in token.get("latents", [])
        ]
        spans.append(
            f"<span class='tok' style='background:{_token_colour(value, top)}' "
            f"title='{html.escape(chr(10).join(tip), quote=True)}'>"
            f"{html.escape(token['token'])}</span>"
        )
    return f"<div class='heat'>{''.join(spans)}</div>"


def _context_html(ctx: dict[str, Any]) -> str:
    return (
        f"<code>{html.escape(ctx['left'])}<mark>{html.escape(ctx['token'])}</mark>"
        f"{html.escape(ctx['right'])}</code> <span class='note'>({ctx['value']:.3g})</span>"
    )


def explanation_html(
    example: dict[str, Any], flag_score: str, threshold: float | None, n_id_tokens: int
) -> str:
    """One explained text: its scores, then each fallacious latent with input and ID contexts."""
    text = example["text"]
    shown = text if len(text) <= 700 else text[:700] + " [...]"
    score = example["scores"].get(flag_score)
    shown_score = f"{score:.3g}" if isinstance(score, int | float) else "not computed"
    verdict = "<span class='flag'>flagged</span>" if example.get("flagged") else "not flagged"
    parts = [
        f"<div class='example'><h3>{html.escape(example['shift'])}</h3>",
        f"<p>{verdict}: {html.escape(flag_score)} = {shown_score}"
        + (f" (threshold {threshold:.3g})" if threshold is not None else "")
        + f"; fallacious latents per token {example['scores'].get('fallacious_count', 0):.3g}</p>",
        f"<pre style='white-space:pre-wrap'>{html.escape(shown)}</pre>",
    ]
    p_values = example.get("p_values") or {}
    if p_values:
        lowest = sorted(p_values.items(), key=lambda kv: kv[1])[:4]
        parts.append(
            "<p class='note'>Most unusual for ID text (p-value against held-out ID texts): "
            + ", ".join(f"{html.escape(k)} p = {v:.2g}" for k, v in lowest)
            + "</p>"
        )
    if example.get("tokens"):
        parts.append(
            "<p>Where the text leaves the distribution (shade: fallacious surprisal of the "
            "token's latents; hover for every per-token score and the latents):</p>"
        )
        parts.append(token_heatmap_html(example["tokens"], "fallacious_surprisal"))
        parts.append("<p>Reconstruction error per token:</p>")
        parts.append(token_heatmap_html(example["tokens"], "recon_error"))
    if not example.get("explanation"):
        parts.append("<p class='note'>No fallacious latent: the alarm comes from the other scores "
                     "(reconstruction error, L0 shift).</p>")  # fmt: skip
    for latent in example.get("explanation", []):
        name = f"latent {latent['latent']}"
        if latent.get("page"):  # its page in a `saeguard browse` site
            name = f"<a href='{html.escape(latent['page'], quote=True)}'>{name}</a>"
        parts.append(
            f"<h4 id='latent-{latent['latent']}'>{name}: "
            f"{html.escape(latent['reason'])}</h4><p class='note'>"
            f"active on {latent['id_firings']} of {n_id_tokens:,} ID tokens (rate "
            f"{latent['id_rate']:.2g}); ID range p50 / p99 / p99.9 "
            + " / ".join(f"{q:.3g}" for q in latent.get("id_range") or [latent["id_p999"]])
            + f"; here max {latent['max_activation']:.3g} on {latent['tokens_fired']} token(s)"
            + (f", surprisal {latent['surprisal']:.3g}" if "surprisal" in latent else "")
            + "</p>"
        )
        parts.append("<p>Where it fired in this text:</p><ul>")
        parts += [f"<li>{_context_html(c)}</li>" for c in latent["input_contexts"]]
        parts.append("</ul><p>Its top in-distribution contexts:</p><ul>")
        if latent["id_contexts"]:
            parts += [f"<li>{_context_html(c)}</li>" for c in latent["id_contexts"]]
        else:
            parts.append(f"<li class='note'>never active on the {n_id_tokens:,} ID tokens the "
                         "monitor was fitted on</li>")  # fmt: skip
        parts.append("</ul>")
    parts.append("</div><hr>")
    return "\n".join(parts)


def write_ood_report(
    out: Path,
    document: dict[str, Any],
    raw: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]],
    examples: list[dict[str, Any]],
    *,
    n_id_tokens: int,
) -> Path:
    """Write ``ood_report.html`` and ``examples.html`` into ``out``."""
    cal = document["calibration"]
    names = document["scores"]
    page = HtmlPage(f"OOD benchmark: {document['model']} {document['hook']}")
    page.paragraph(
        f"SAE {document.get('sae')}; monitor {document['monitor']}; in-distribution corpus "
        f"{document['id_corpus']} (test split as negatives). Every score is higher = more OOD. "
        "Tables: value [bootstrap 95% interval]."
    )
    page.heading("Calibrated flag")
    page.paragraph(
        f"Flag when {cal['flag_score']} > {cal['threshold']:.4g}, set for {cal['target_fpr']:.0%} "
        f"false positives on {cal.get('n_texts')} held-out ID texts ({cal.get('source', '')}). "
        f"Measured FPR on {cal['measured_on']}: {cal['measured_fpr']:.3f} "
        f"[{cal['measured_fpr_ci95'][0]:.3f}, {cal['measured_fpr_ci95'][1]:.3f}]."
    )
    fused_rows, fused_sentences = fused_summary(document)
    if fused_rows:
        page.heading("The fused score against the best single score and the best baseline")
        page.paragraph(SUMMARY_NOTE)
        page.table(SUMMARY_HEADERS, fused_rows)
        for sentence in fused_sentences:
            page.paragraph(sentence.replace("**", ""))
    page.heading("Where the SAE scores beat Mahalanobis, and where not")
    page.raw(
        "<ul>"
        + "".join(f"<li>{html.escape(s)}</li>" for s in summary_sentences(document))
        + "</ul>"
    )
    for metric, title in (
        ("auroc", "AUROC (higher is better)"),
        ("fpr95", "FPR at 95% TPR (lower is better)"),
    ):
        page.heading(title)
        rows = [
            [shift] + [_cell(row["scores"][n], metric) for n in names]
            for shift, row in document["shifts"].items()
        ]
        page.table(["shift", *names], rows)
    page.heading("Flag rate per shift (share of shifted texts flagged)")
    page.table(
        ["shift", "kind", "flagged [95% interval]"],
        [
            [s, r["kind"], with_interval(r["flag_rate"], r["flag_rate_ci95"])]
            for s, r in document["shifts"].items()
        ],
    )
    page.heading("ROC curves")
    page.figure(roc_figure(raw, names), "Solid: SAE scores; dashed: baselines; dotted: chance.")
    page.heading("Score histograms")
    labels = {
        name: "in-distribution" if row["negatives"] == "id" else "own negatives"
        for name, row in document["shifts"].items()
    }
    page.figure(
        histogram_figure(raw, cal["flag_score"], cal["threshold"], labels), "The flag score."
    )
    if "mahalanobis" in names:
        page.figure(
            histogram_figure(raw, "mahalanobis", None, labels), "The strongest usual baseline."
        )
    page.link("examples.html", f"Explained examples ({len(examples)} texts)")
    page.write(out / "ood_report.html")

    ex_page = HtmlPage("OOD monitor: explained examples")
    ex_page.paragraph(
        "For each shift, its highest-scoring flagged texts; last, in-distribution texts the "
        "monitor flags (false positives). Each lists its top fallacious latents: why the latent "
        "counts as fallacious, where it fired in the text (highlighted token, activation), and "
        "the in-distribution contexts where it fires most."
    )
    style = (
        "<style>mark{background:#fd6;padding:0 2px}.example h4{margin:.6em 0 .2em}"
        ".heat{font-family:monospace;white-space:pre-wrap;line-height:1.6}"
        ".tok{border-radius:2px}</style>"
    )
    ex_page.raw(style)
    for example in examples:
        ex_page.raw(explanation_html(example, cal["flag_score"], cal["threshold"], n_id_tokens))
    if not examples:
        ex_page.paragraph("No text was flagged.")
    ex_page.write(out / "examples.html")
    return out / "ood_report.html"


def markdown_tables(document: dict[str, Any]) -> str:
    """AUROC and FPR@95 tables (shift rows, score columns) with 95% intervals."""
    names = document["scores"]
    lines = []
    cal = document["calibration"]
    lines.append(
        f"Monitor flag: `{cal['flag_score']}` > {cal['threshold']:.4g}, calibrated for "
        f"{cal['target_fpr']:.0%} FPR on {cal.get('n_texts')} held-out ID texts; measured FPR "
        f"{cal['measured_fpr']:.3f} [{cal['measured_fpr_ci95'][0]:.3f}, "
        f"{cal['measured_fpr_ci95'][1]:.3f}] on {cal['measured_on']}.\n"
    )
    fused_rows, fused_sentences = fused_summary(document)
    if fused_rows:
        lines.append("### The fused score against the best single score and the best baseline\n")
        lines += [SUMMARY_NOTE, "", "| " + " | ".join(SUMMARY_HEADERS) + " |",
                  "|---" * len(SUMMARY_HEADERS) + "|"]  # fmt: skip
        lines += ["| " + " | ".join(row) + " |" for row in fused_rows]
        lines += ["", *fused_sentences, ""]
    for metric, title in (
        ("auroc", "AUROC (higher is better)"),
        ("fpr95", "FPR at 95% TPR (lower is better)"),
    ):
        lines.append(f"### {title}\n")
        lines.append("| shift | " + " | ".join(names) + " |")
        lines.append("|---|" + "---|" * len(names))
        for shift, row in document["shifts"].items():
            cells = []
            values = {n: row["scores"][n][metric] for n in names}
            best = max(values.values()) if metric == "auroc" else min(values.values())
            for n in names:
                cell = row["scores"][n]
                text = with_interval(cell[metric], cell[f"{metric}_ci95"])
                cells.append(f"**{text}**" if values[n] == best else text)
            lines.append(f"| {shift} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
