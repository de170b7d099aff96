"""The "paste a text, see which latents fire on which tokens" page `saeguard serve` shows at
``/live``: one self-contained HTML page (no network but its own service) that posts the text to
``/v1/explain`` with per-token scores and draws the tokens, shaded by fallacious surprisal;
clicking a token lists the fallacious latents that fired there, each linked to its page in the
served browse site (when the service has one). Every text and token is set with textContent."""

from __future__ import annotations

import json

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>saeguard: live latents</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;max-width:60em;margin:1.5em auto;padding:0 1em;color:#222}
textarea{width:100%;height:7em;font:inherit}
#tokens{font-family:monospace;white-space:pre-wrap;line-height:1.9;margin:1em 0}
.tok{border-radius:2px;cursor:pointer}.tok.sel{outline:2px solid #06c}
.note{color:#666;font-size:.9em}table{border-collapse:collapse}td,th{padding:2px 8px;
border-bottom:1px solid #ddd;text-align:left}#error{color:#b00}
</style></head><body>
<h1>Which latents fire on which tokens</h1>
<p class="note">The text goes to this service's <code>/v1/explain</code>; tokens are shaded by
their fallacious surprisal (darker: rarer, further out of range on in-distribution text).
Click a token for its fallacious latents.</p>
<textarea id="text" placeholder="Paste a text"></textarea>
<p><label>Bearer token (if the service has one):
<input id="token" type="password" autocomplete="off"></label>
<button id="go">Score</button></p>
<p id="error"></p><div id="verdict"></div><div id="tokens"></div><div id="latents"></div>
<script>
"use strict";
const SITE = __SITE__;
const $ = (id) => document.getElementById(id);
function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}
function latentLink(latent) {
  if (!SITE) return el("span", "latent " + latent);
  return el("a", "latent " + latent, {href: SITE + "latent.html?i=" + Number(latent)});
}
function showToken(row, span) {
  document.querySelectorAll(".tok.sel").forEach((s) => s.classList.remove("sel"));
  span.classList.add("sel");
  const box = $("latents");
  box.replaceChildren(el("h3", "Token " + JSON.stringify(row.token)));
  const latents = row.latents || [];
  if (!latents.length) { box.append(el("p", "No fallacious latent fired here.")); return; }
  const table = el("table");
  const head = el("tr");
  for (const h of ["latent", "activation", "surprisal weight"]) head.append(el("th", h));
  table.append(head);
  for (const lat of latents) {
    const tr = el("tr");
    const cell = el("td"); cell.append(latentLink(lat.latent)); tr.append(cell);
    tr.append(el("td", Number(lat.value).toPrecision(3)));
    tr.append(el("td", Number(lat.weight).toPrecision(3)));
    table.append(tr);
  }
  box.append(table);
}
async function score() {
  $("error").textContent = ""; $("tokens").replaceChildren(); $("latents").replaceChildren();
  $("verdict").replaceChildren();
  const headers = {"Content-Type": "application/json"};
  const token = $("token").value.trim();
  if (token) headers["Authorization"] = "Bearer " + token;
  let answer;
  try {
    const response = await fetch("../v1/explain", {method: "POST", headers,
      body: JSON.stringify({texts: [$("text").value], tokens: true})});
    answer = await response.json();
    if (!response.ok) { $("error").textContent = answer.error || response.statusText; return; }
  } catch (err) { $("error").textContent = String(err); return; }
  const row = answer.results[0];
  if (row.error) { $("error").textContent = row.error; return; }
  const score = row.scores[answer.flag_score];
  $("verdict").append(el("p", (row.flagged ? "FLAGGED" : "not flagged") + ": " +
    answer.flag_score + " = " + Number(score).toPrecision(4) + " (threshold " +
    Number(answer.threshold).toPrecision(4) + ")", {id: "flag"}));
  const top = Math.max(1e-9, ...row.tokens.map((t) => t.fallacious_surprisal || 0));
  for (const t of row.tokens) {
    const span = el("span", t.token, {"class": "tok",
      title: "fallacious surprisal " + Number(t.fallacious_surprisal).toPrecision(3)});
    const alpha = Math.min(1, (t.fallacious_surprisal || 0) / top);
    span.style.background = "rgba(230,80,30," + (0.85 * alpha).toFixed(3) + ")";
    span.addEventListener("click", () => showToken(t, span));
    $("tokens").append(span);
  }
  const summary = el("div");
  summary.append(el("h3", "Top fallacious latents of the text"));
  const list = el("ul");
  for (const lat of row.explanation || []) {
    const item = el("li"); item.append(latentLink(lat.latent));
    item.append(el("span", ": " + lat.reason + ", fired on " + lat.tokens_fired + " token(s)"));
    list.append(item);
  }
  summary.append(list);
  $("latents").append(summary);
}
$("go").addEventListener("click", score);
</script></body></html>
"""


def live_page(site_prefix: str | None) -> str:
    """The page, linking latents to ``site_prefix`` (e.g. ``/browse/``; None: no links)."""
    literal = json.dumps(site_prefix).replace("<", "\\u003c").replace(">", "\\u003e")
    return PAGE.replace("__SITE__", literal)
