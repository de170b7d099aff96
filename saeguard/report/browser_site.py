"""The feature browser: a static site rendered from the browse document (:mod:`saeguard.browse`).

:func:`render_site` returns the site as ``{relative path: text}``; it reads no files and runs no
model. The site opens from disk (``file://``) with no server and nothing fetched from the
network: the pages are fixed HTML (:mod:`saeguard.report.browser_assets`) and their data are
JavaScript files that call a function or set a variable (a ``<script src>`` loads from disk where
``fetch`` of local JSON is blocked):

- ``data/index.js``: ``window.SAEGUARD_INDEX = {summary, columns, rows}``, one compact row per
  latent (firings, max, mean, top tokens, promoted tokens, the monitor's columns);
- ``data/latents_NNN.js``: ``saeguardShard(NNN, [...])``, the full entries of ``SHARD_SIZE``
  latents (contexts, quantile samples, histogram, logit effects, neighbours), loaded by
  ``latent.html`` for the one latent it shows;
- ``data/texts.js``: ``window.SAEGUARD_TEXTS = [...]``, the 'text -> latents' texts.

Every JSON text is written with ``ensure_ascii`` and ``<``, ``>``, ``&`` escaped as ``\\u003c``,
``\\u003e``, ``\\u0026``, so no data can close a script or open a comment, whatever page
embeds it; the pages build their elements with ``textContent``, never parsing data as markup.

A link to latent N from elsewhere: ``SITE/latent.html?i=N`` (or ``SITE/latent.html#N``).
"""

from __future__ import annotations

import json
from typing import Any

from saeguard.report.browser_assets import (
    COMMON_JS,
    CSS,
    INDEX_HTML,
    INDEX_JS,
    LATENT_HTML,
    LATENT_JS,
    TEXTS_HTML,
    TEXTS_JS,
)

SHARD_SIZE = 128
"""Latents per data file loaded by the latent page."""
INDEX_TOKENS = 3
"""Promoted tokens kept per latent in the index (its table and search; the suppressed ones are
on the latent's page only, which keeps the index of a 9,216-latent SAE well under 1 MB)."""
SITE_ENTRIES = ("index.html", "latent.html", "texts.html", "assets", "data")
"""The top-level entries of a rendered site."""
NEURONPEDIA_DIR = "neuronpedia"


def script_json(value: Any) -> str:
    """JSON that is safe inside any script: ASCII only (no U+2028/2029), with ``<``, ``>`` and
    ``&`` as ``\\u`` escapes (valid JSON and JavaScript: they can only occur inside strings)."""
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _short(value: float) -> float:
    return float(f"{value:.4g}") if value else 0.0


def shard_digits(d_sae: int) -> int:
    """Digits of the shard numbers in their file names (at least 3)."""
    return max(3, len(str(max(0, (d_sae - 1) // SHARD_SIZE))))


def shard_path(shard: int, d_sae: int) -> str:
    return f"data/latents_{shard:0{shard_digits(d_sae)}d}.js"


def index_document(document: dict[str, Any]) -> dict[str, Any]:
    """What ``data/index.js`` holds: the summary and one compact row per latent."""
    summary = dict(document["summary"])
    monitor = summary.get("monitor") is not None
    summary["shard_size"] = SHARD_SIZE
    summary["shard_digits"] = shard_digits(int(summary["d_sae"]))
    summary.pop("settings", None)
    summary.pop("timings_s", None)
    columns = ["count", "max", "mean", "peak", "pos"]
    if monitor:
        columns += ["id_rate", "id_p999", "rare"]
    rows = []
    for latent in document["latents"]:
        row: list[Any] = [
            latent["count"],
            latent["max"],
            latent["mean"],
            latent["peak_tokens"],
            [t for t, _ in latent["logits"]["pos"][:INDEX_TOKENS]],
        ]
        if monitor:
            row += [_short(latent["id"]["rate"]), latent["id"]["p999"], int(latent["id"]["rare"])]
        rows.append(row)
    return {"summary": summary, "columns": columns, "rows": rows}


def _latent_entry(latent: dict[str, Any]) -> dict[str, Any]:
    entry = dict(latent)
    entry["rate"] = _short(latent["rate"])
    entry["hist"] = {"width": _short(latent["hist"]["width"]), "counts": latent["hist"]["counts"]}
    return entry


def render_site(document: dict[str, Any]) -> dict[str, str]:
    """The site's files, ``{relative path: text}``, for a browse document
    (:func:`saeguard.browse.build_document`)."""
    latents = document["latents"]
    d_sae = len(latents)
    files = {
        "index.html": INDEX_HTML,
        "latent.html": LATENT_HTML,
        "texts.html": TEXTS_HTML,
        "assets/browse.css": CSS,
        "assets/common.js": COMMON_JS,
        "assets/index.js": INDEX_JS,
        "assets/latent.js": LATENT_JS,
        "assets/texts.js": TEXTS_JS,
        "data/index.js": "window.SAEGUARD_INDEX = " + script_json(index_document(document)) + ";\n",
        "data/texts.js": "window.SAEGUARD_TEXTS = " + script_json(document["texts"]) + ";\n",
    }
    for shard in range(0, (d_sae + SHARD_SIZE - 1) // SHARD_SIZE):
        part = [_latent_entry(x) for x in latents[shard * SHARD_SIZE : (shard + 1) * SHARD_SIZE]]
        files[shard_path(shard, d_sae)] = f"saeguardShard({shard}, {script_json(part)});\n"
    return files


def neuronpedia_batches(document: dict[str, Any]) -> dict[str, str]:
    """The latents in the batch JSON layout SAEDashboard writes for a Neuronpedia upload
    (``neuronpedia/batch-N.json``, ``SHARD_SIZE`` features each): ``pos_str``/``pos_values``
    and ``neg_str``/``neg_values`` (logit effects), ``frac_nonzero`` (firing rate),
    ``freq_hist_data_bar_values``/``_heights`` (histogram bin centres and counts) and
    ``activations`` (each context with one value per token; top contexts have
    ``bin_min = -1``, quantile samples their band's activation range and ``bin_contains`` its
    share of the firings). Fields saeguard does not compute (neuron alignment, correlated
    neurons and features, logit histograms) are empty lists."""
    summary = document["summary"]
    sae = summary.get("sae") or {}
    hook = str(sae.get("hook") or "")
    layer = int(hook.rsplit(".", 1)[-1]) if hook.rsplit(".", 1)[-1].isdigit() else 0
    out: dict[str, str] = {}
    latents = document["latents"]
    for shard in range(0, (len(latents) + SHARD_SIZE - 1) // SHARD_SIZE):
        features = [_neuronpedia_feature(x, summary)
                    for x in latents[shard * SHARD_SIZE : (shard + 1) * SHARD_SIZE]]  # fmt: skip
        batch = {"model_id": str(sae.get("model") or ""), "layer": layer,
                 "sae_set": str(sae.get("name") or ""), "features": features}  # fmt: skip
        out[f"{NEURONPEDIA_DIR}/batch-{shard}.json"] = script_json(batch)
    return out


def _dense_values(ctx: dict[str, Any]) -> list[float]:
    values = [0.0] * len(ctx["tokens"])
    acts = ctx["acts"]
    for k in range(0, len(acts), 2):
        values[int(acts[k])] = float(acts[k + 1])
    return values


def _neuronpedia_feature(latent: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    width = float(latent["hist"]["width"])
    activations = [
        {"bin_min": -1, "bin_max": latent["max"], "bin_contains": -1,
         "tokens": c["tokens"], "values": _dense_values(c)}
        for c in latent["top"]
    ]  # fmt: skip
    for band in latent["bands"]:
        share = band["count"] / latent["count"] if latent["count"] else 0.0
        activations += [
            {"bin_min": band["min"], "bin_max": band["max"], "bin_contains": share,
             "tokens": c["tokens"], "values": _dense_values(c)}
            for c in band["samples"]
        ]  # fmt: skip
    empty: list[Any] = []
    return {
        "feature_index": latent["index"],
        "neuron_alignment_indices": empty, "neuron_alignment_values": empty,
        "neuron_alignment_l1": empty, "correlated_neurons_indices": empty,
        "correlated_neurons_l1": empty, "correlated_neurons_pearson": empty,
        "correlated_features_indices": empty, "correlated_features_l1": empty,
        "correlated_features_pearson": empty,
        "neg_str": [t for t, _ in latent["logits"]["neg"]],
        "neg_values": [v for _, v in latent["logits"]["neg"]],
        "pos_str": [t for t, _ in latent["logits"]["pos"]],
        "pos_values": [v for _, v in latent["logits"]["pos"]],
        "frac_nonzero": latent["rate"],
        "freq_hist_data_bar_values": [round((b + 0.5) * width, 4)
                                      for b in range(len(latent["hist"]["counts"]))],
        "freq_hist_data_bar_heights": latent["hist"]["counts"],
        "logits_hist_data_bar_heights": empty, "logits_hist_data_bar_values": empty,
        "n_prompts_total": summary.get("texts_read", 0),
        "n_tokens_in_prompt": summary.get("ctx_len", 0),
        "dataset": summary.get("corpus", ""),
        "decoder_weights_dist": empty,
        "activations": activations,
    }  # fmt: skip
