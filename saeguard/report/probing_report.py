"""probing_study.md and probing_study.html: the probing-regimes study's table, curves and finding,
rendered from the ``probing_study.json`` document alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from saeguard.report.html import HtmlPage, markdown_table, with_interval

QUIVERS = ("quiver", "quiver_sae")
COLOURS = {
    "logreg": "tab:blue",
    "pca": "tab:orange",
    "knn": "tab:green",
    "mlp": "tab:red",
    "hgb": "tab:purple",
    "sae": "black",
    "quiver": "tab:pink",
    "quiver_sae": "dimgray",
}


def _columns(document: dict[str, Any]) -> list[str]:
    return [*document["methods"], *QUIVERS]


def _regimes(document: dict[str, Any]) -> list[str]:
    return list(document["summary"]["regimes"])


def _cell(entry: dict[str, Any] | None) -> str:
    return "—" if entry is None else with_interval(entry["mean"], entry.get("ci95"))


def main_table(document: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): per method, its mean test AUC over tasks in each regime [95% interval
    over tasks], then the SAE probe against the best baseline and the quivers' difference."""
    labels, summary = document["labels"], document["summary"]["regimes"]
    regimes = _regimes(document)
    headers = ["method", *[document["regime_labels"][r] for r in regimes]]
    rows = [
        [labels[c], *[_cell(summary[r]["methods"].get(c)) for r in regimes]]
        for c in _columns(document)
    ]
    rows.append(
        [
            "SAE probe vs best baseline: win / tie / loss",
            *[_verdicts(summary[r]["sae_vs_best"]) for r in regimes],
        ]
    )
    rows.append(
        [
            "quiver (+ SAE) − quiver",
            *[_difference(summary[r]["quiver_difference"]) for r in regimes],
        ]
    )
    rows.append(
        [
            "SAE probe picked by the quiver",
            *[f"{summary[r]['sae_picked']} of {summary[r]['points']}" for r in regimes],
        ]
    )
    rows.append(
        ["tasks / points", *[f"{summary[r]['tasks']} / {summary[r]['points']}" for r in regimes]]
    )
    return headers, rows


def _verdicts(counts: dict[str, int]) -> str:
    return f"{counts['win']} / {counts['tie']} / {counts['loss']}"


def _difference(entry: dict[str, Any]) -> str:
    low, high = entry["ci95"]
    return f"{entry['mean']:+.4f} [{low:+.4f}, {high:+.4f}]"


def task_table(document: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): per task and regime, the SAE probe's and the best baseline's mean test
    AUC over the regime's points and the SAE probe's wins / ties / losses."""
    labels = document["labels"]
    headers = [
        "task",
        "regime",
        "points",
        "SAE probe",
        "best baseline (per point)",
        "quiver (+ SAE)",
        "win / tie / loss",
    ]
    rows = []
    for task, regimes in document["results"].items():
        for regime, points in regimes.items():
            if not points:
                continue
            sae = sum(p["methods"]["sae"]["test_auc"] for p in points) / len(points)
            best = sum(p["methods"][p["best_baseline"]]["test_auc"] for p in points) / len(points)
            quiver = sum(p["quiver_sae"]["test_auc"] for p in points) / len(points)
            counts = {"win": 0, "tie": 0, "loss": 0}
            for p in points:
                counts[p["sae_vs_best"]["verdict"]] += 1
            winners = sorted({labels[p["best_baseline"]] for p in points})
            rows.append(
                [
                    task,
                    regime,
                    str(len(points)),
                    f"{sae:.3f}",
                    f"{best:.3f} ({', '.join(winners)})",
                    f"{quiver:.3f}",
                    _verdicts(counts),
                ]
            )
    return headers, rows


def settings_line(document: dict[str, Any]) -> str:
    cfg, sae, feats, tasks = (
        document["config"],
        document["sae"],
        document["features"],
        document["tasks"],
    )
    regimes = cfg["regimes"]
    used = sorted({n for t in tasks for n in t["train_sizes"]})
    fixed = sorted({t["fixed_train"] for t in tasks})
    fixed_text = str(fixed[0]) if len(fixed) == 1 else f"{fixed[0]}-{fixed[-1]}"
    return (
        f"SAE `{sae['path']}` ({sae['architecture'] or 'SAE'}, {sae['d_sae']} latents) on "
        f"{sae['model']} `{sae['hook']}`; {feats['texts']} distinct texts read once each (first "
        f"{feats['ctx_len']} tokens, a wrapped jailbreak's last), activations and latents "
        f"mean-pooled; {len(tasks)} tasks, {cfg['per_class']} texts per probed class; training "
        f"sizes {_list(used)} (of {_list(regimes['train_sizes'])}: capped by each task's pool), "
        f"positive fractions {_list(regimes['positive_fractions'])} and flipped fractions "
        f"{_list(regimes['noise_fractions'])} at {fixed_text} training texts (--fixed-train "
        f"{regimes['fixed_train']}, capped so that every fraction fits the pool); seed "
        f"{cfg['seed']}" + ("; **--quick: a smoke test, not evidence**" if cfg["quick"] else "")
    )


def _list(values: list[Any]) -> str:
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def render_markdown(document: dict[str, Any]) -> str:
    """probing_study.md: settings, the main table, the finding, the tasks and the per-task
    table."""
    headers, rows = main_table(document)
    t_headers, t_rows = task_table(document)
    tasks = "\n".join(
        f"- `{t['name']}`: pool {t['pool_positive']} positive / {t['pool_negative']} negative, "
        f"test {t['test_positive']} / {t['test_negative']}; shifts: "
        + ("; ".join(f"`{name}` ({note})" for name, note in t["shifts"].items()) or "none")
        for t in document["tasks"]
    )
    skipped = "".join(f"\n- skipped: {why}" for why in document["skipped_tasks"])
    methods = "\n".join(
        f"- **{document['labels'][m]}** (`{m}`): {note}"
        for m, note in document["method_notes"].items()
    )
    return (
        "# Probing study: SAE probes vs baselines in four regimes\n\n"
        f"{settings_line(document)}.\n\n"
        "Each cell: mean test AUC over tasks (a task's value is its mean over the regime's "
        "points) [bootstrap 95% interval over tasks]. Hyper-parameters were chosen on "
        "validation folds of the training set only. Win / tie / loss: the SAE probe against "
        "the baseline with the highest test AUC at each point, by the paired bootstrap 95% "
        "interval over test texts (a tie when it includes 0).\n\n"
        + markdown_table(headers, rows)
        + f"\n\n**Finding.** {document['finding']}\n\n## Tasks\n\n{tasks}{skipped}\n\n"
        f"## Methods\n\n{methods}\n\n## Per task\n\n" + markdown_table(t_headers, t_rows) + "\n"
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def curves_figure(document: dict[str, Any]) -> Figure:
    """One panel per regime: each method's mean test AUC over tasks at each regime value, with
    its 95% interval over tasks."""
    regimes = _regimes(document)
    curves, labels = document["summary"]["curves"], document["labels"]
    fig = Figure(figsize=(13, 3.6 * ((len(regimes) + 1) // 2)))
    for i, regime in enumerate(regimes):
        ax = fig.add_subplot((len(regimes) + 1) // 2, 2, i + 1)
        points = curves[regime]
        values = [p["value"] for p in points]
        numeric = all(_is_number(v) for v in values)
        xs = values if numeric else list(range(len(values)))
        columns = _columns(document)
        for j, column in enumerate(columns):
            means = [p["methods"][column]["mean"] for p in points]
            lows = [p["methods"][column]["ci95"][0] for p in points]
            highs = [p["methods"][column]["ci95"][1] for p in points]
            style = {
                "color": COLOURS.get(column),
                "label": labels[column],
                "linewidth": 2.2 if column in ("sae", "quiver_sae") else 1.2,
            }
            if numeric:
                ax.plot(
                    xs,
                    means,
                    marker="o",
                    markersize=3,
                    linestyle="--" if column in QUIVERS else "-",
                    **style,
                )
                ax.fill_between(xs, lows, highs, alpha=0.07, color=style["color"])
            else:  # categories (the shifts): no line between them
                at = [x + (j - (len(columns) - 1) / 2) * 0.08 for x in xs]
                errors = [
                    [m - lo for m, lo in zip(means, lows, strict=True)],
                    [hi - m for m, hi in zip(means, highs, strict=True)],
                ]
                ax.errorbar(
                    at,
                    means,
                    yerr=errors,
                    fmt="s" if column in QUIVERS else "o",
                    markersize=4,
                    capsize=2,
                    **style,
                )
        if regime == "scarcity" and numeric:
            ax.set_xscale("log", base=2)
        if not numeric:
            ax.set_xticks(xs, [str(v) for v in values], fontsize=8)
        ax.set_title(document["regime_labels"][regime], fontsize=10)
        ax.set_ylabel("test AUC", fontsize=8)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def write_probing_report(document: dict[str, Any], path: Path) -> Path:
    """probing_study.html: settings, finding, the main table, the curves and the per-task table."""
    page = HtmlPage("Probing study: SAE probes vs baselines in four regimes")
    page.paragraph(settings_line(document).replace("`", "").replace("**", "") + ".")
    page.paragraph("Finding: " + document["finding"])
    headers, rows = main_table(document)
    page.table(headers, rows)
    page.paragraph(
        "Mean test AUC over tasks [bootstrap 95% interval over tasks]; win / tie / loss: the SAE "
        "probe against the best baseline at each point (paired bootstrap over test texts).",
        "note",
    )
    page.figure(
        curves_figure(document),
        "Mean test AUC over tasks per regime value; shaded: "
        "bootstrap 95% interval over tasks. Solid: single methods; dashed: quivers.",
    )
    page.heading("Per task")
    t_headers, t_rows = task_table(document)
    page.table(t_headers, t_rows)
    page.heading("Tasks and shifts")
    for task in document["tasks"]:
        shifts = "; ".join(f"{n} ({note})" for n, note in task["shifts"].items()) or "none"
        page.paragraph(
            f"{task['name']}: pool {task['pool_positive']} positive / "
            f"{task['pool_negative']} negative, test {task['test_positive']} / "
            f"{task['test_negative']}; shifts: {shifts}",
            "note",
        )
    return page.write(path)
