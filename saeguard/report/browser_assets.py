"""The feature browser's static files: three HTML pages, one stylesheet and four scripts.

They hold no data: every page reads its data from the site's ``data/*.js`` files, loaded with
``<script src>`` (which works from ``file://``, where ``fetch`` of local JSON is blocked). The
scripts build every element with ``createElement`` / ``textContent`` and never parse data as
markup, so no text of a corpus, token or tokenizer can become HTML. Nothing is fetched from the
network. Element ids and data attributes are stable (docs/browse.md lists them for tests).
"""

from __future__ import annotations

CSS = """
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fff}
header{background:#f3f3f3;border-bottom:1px solid #ccc;padding:.6em 1em}
header nav a{margin-right:1em}
main{padding:0 1em 2em;max-width:1200px}
h1{font-size:1.4em;margin:.4em 0}h2{font-size:1.15em;margin:1.2em 0 .4em}h3{font-size:1em}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right;vertical-align:top}
th{background:#f3f3f3;white-space:nowrap}
td.l,th.l{text-align:left}
th[data-sort]{cursor:pointer}th[data-sort] button{all:unset;cursor:pointer}
th[data-order=asc]::after{content:" \\25B2"}th[data-order=desc]::after{content:" \\25BC"}
.controls{display:flex;flex-wrap:wrap;gap:.8em;align-items:center;margin:.8em 0}
.controls label{font-size:13px}
.controls input[type=text],.controls input[type=search]{width:14em}
.controls input[type=number]{width:8em}
.note{color:#555;font-size:13px}
.error{color:#b00;font-weight:bold}
.chip{display:inline-block;background:#eef;border-radius:3px;padding:0 3px;margin:0 2px 1px 0;
 font-family:ui-monospace,monospace;font-size:12px;white-space:pre}
.ctx{font-family:ui-monospace,monospace;font-size:13px;line-height:1.9;margin:2px 0;
 white-space:nowrap;overflow-x:auto;border-bottom:1px solid #f0f0f0}
.texts .ctx{white-space:normal}
.ctx .val{display:inline-block;width:5em;color:#555;text-align:right;margin-right:.6em}
.tok{white-space:pre;border-radius:2px;padding:1px 0}
.tok.peak{outline:1px solid #c60}
.tok.skipped{color:#aaa}
.tok.selected{outline:2px solid #06c}
.texts .tok{cursor:pointer;white-space:pre-wrap}
.texts .tok.excluded{color:#aaa;cursor:default}
.layout{display:flex;gap:1.5em;align-items:flex-start}
.layout>.texts{flex:3;min-width:0}
#token-panel{flex:1;position:sticky;top:0;border:1px solid #ddd;padding:.5em;min-width:16em}
.cols{display:flex;flex-wrap:wrap;gap:2em}
ul.plain{list-style:none;padding:0;margin:0}
ul.plain li{margin:2px 0}
.num{font-variant-numeric:tabular-nums;color:#333}
#stats{display:grid;grid-template-columns:max-content max-content;gap:2px 1em;font-size:14px}
#stats dt{color:#555}#stats dd{margin:0}
#histogram rect.bar{fill:#e08a1e}#histogram text{font-size:10px;fill:#444}
.badge{display:inline-block;font-size:11px;padding:0 4px;border-radius:3px;color:#fff}
.badge.dead{background:#777}.badge.dense{background:#a40}.badge.rare{background:#06c}
"""

COMMON_JS = r"""
"use strict";
/* Shared helpers of the feature browser. No data is ever parsed as markup: elements are made
   with createElement and filled with textContent. */
var SG = (function () {
  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        if (attrs[k] !== null && attrs[k] !== undefined) node.setAttribute(k, String(attrs[k]));
      });
    }
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }
  function fmt(v) {
    if (v === null || v === undefined || v !== v) return "-";
    if (v === 0) return "0";
    var a = Math.abs(v);
    if (a >= 10000 || a < 0.001) return v.toExponential(2);
    return String(Number(v.toPrecision(4)));
  }
  function pct(rate) {
    if (rate === null || rate === undefined) return "-";
    if (rate === 0) return "0%";
    var p = rate * 100;
    return (p >= 0.01 ? String(Number(p.toPrecision(3))) : p.toExponential(1)) + "%";
  }
  function showToken(t) {
    if (t === "") return "\u2205";
    return t.replace(/\r\n|\n|\r/g, "\u23CE").replace(/\t/g, "\u21E5");
  }
  function chip(t) { return el("span", {"class": "chip"}, showToken(t)); }
  function latentHref(i) { return "latent.html?i=" + i; }
  function latentLink(i) {
    return el("a", {"href": latentHref(i), "class": "latent-link"}, "#" + i);
  }
  function colour(act, max) {
    if (!act || !max) return "";
    var a = Math.max(0, Math.min(1, Math.abs(act) / max));
    return (act > 0 ? "rgba(255,136,0," : "rgba(0,102,204,") + (0.08 + 0.82 * a).toFixed(3) + ")";
  }
  function shardFile(i, s) {
    var k = String(Math.floor(i / s.shard_size));
    while (k.length < s.shard_digits) k = "0" + k;
    return "data/latents_" + k + ".js";
  }
  function loadScript(src, onerror) {
    var node = document.createElement("script");
    node.src = src;
    node.onerror = onerror;
    document.head.appendChild(node);
  }
  function fail(message) {
    var box = document.getElementById("error");
    if (box) { box.textContent = message; box.hidden = false; }
  }
  function describe(s) {
    var parts = ["SAE " + s.sae.name + " (" + s.sae.architecture + ", " + s.d_sae + " latents)",
                 "model " + s.sae.model + " at " + s.sae.hook,
                 "held-out text: " + s.corpus + " (" + s.tokens_read + " tokens, " +
                 s.texts_read + " texts)",
                 s.dead + " dead, " + s.dense + " dense (rate \u2265 " + pct(s.dense_rate) + ")"];
    if (s.monitor) parts.push("monitor " + s.monitor.source);
    return parts.join(" \u00B7 ");
  }
  /* One index row as an object: the columns named in the index's "columns". */
  function rowsOf(index) {
    var c = {};
    index.columns.forEach(function (name, k) { c[name] = k; });
    var n = index.summary.tokens_read;
    return index.rows.map(function (r, i) {
      var row = {index: i, count: r[c.count], max: r[c.max], mean: r[c.mean],
                 peak: r[c.peak], pos: r[c.pos]};
      row.rate = row.count / n;
      if ("id_rate" in c) {
        row.id_rate = r[c.id_rate]; row.id_p999 = r[c.id_p999]; row.rare = r[c.rare];
      }
      return row;
    });
  }
  return {el: el, clear: clear, fmt: fmt, pct: pct, showToken: showToken, chip: chip,
          latentHref: latentHref, latentLink: latentLink, colour: colour,
          shardFile: shardFile, loadScript: loadScript, fail: fail, describe: describe,
          rowsOf: rowsOf};
})();
"""

INDEX_JS = r"""
"use strict";
(function () {
  var D = window.SAEGUARD_INDEX;
  if (!D) { SG.fail("data/index.js did not load: is the site complete?"); return; }
  var S = D.summary, monitor = !!S.monitor;
  var rows = SG.rowsOf(D);
  rows.forEach(function (r) {
    r.kind = r.count === 0 ? "dead" : (r.rate >= S.dense_rate ? "dense" : "alive");
    r.text = [].concat(r.peak, r.pos).join("\u0000").toLowerCase();
  });
  document.title = "saeguard browse: " + S.sae.name;
  document.getElementById("summary").textContent = SG.describe(S);
  document.getElementById("logit-note").textContent = "Promoted tokens: the top logit " +
    "effects of the latent's decoder direction (" + S.logit_effects + ").";
  var state = {sort: "index", dir: 1, page: 0, size: 100};
  var search = document.getElementById("search"), minRate = document.getElementById("min-rate"),
      maxRate = document.getElementById("max-rate"), kind = document.getElementById("kind");
  var head = document.querySelector("#latents thead tr");
  var columns = [["index", "latent", "l"], ["rate", "rate"], ["count", "firings"],
                 ["max", "max act"], ["mean", "mean act"], [null, "top tokens", "l"],
                 [null, "promotes", "l"]];
  if (monitor) {
    columns.push(["id_rate", "ID rate"], ["id_p999", "ID p99.9"], ["rare", "rare on ID"]);
    kind.appendChild(SG.el("option", {"value": "rare"}, "rare on ID"));
  }
  columns.forEach(function (c) {
    var th = SG.el("th", {"class": c[2] || null, "data-sort": c[0]});
    if (c[0]) {
      th.appendChild(SG.el("button", {"type": "button"}, c[1]));
      th.addEventListener("click", function () {
        if (state.sort === c[0]) state.dir = -state.dir;
        else { state.sort = c[0]; state.dir = c[0] === "index" ? 1 : -1; }
        state.page = 0; render();
      });
    } else th.textContent = c[1];
    head.appendChild(th);
  });
  function number(input) {
    var v = input.value.trim();
    if (v === "") return null;
    var x = Number(v);
    return isFinite(x) ? x : null;
  }
  function selected() {
    var q = search.value.trim().toLowerCase(), idq = /^#(\d+)$/.exec(q);
    var lo = number(minRate), hi = number(maxRate), k = kind.value;
    return rows.filter(function (r) {
      if (lo !== null && r.rate < lo) return false;
      if (hi !== null && r.rate > hi) return false;
      if (k === "rare" ? !r.rare : (k !== "all" && r.kind !== k)) return false;
      if (!q) return true;
      if (idq) return r.index === Number(idq[1]);
      return r.text.indexOf(q) >= 0 || String(r.index) === q;
    });
  }
  function chips(cell, tokens) {
    tokens.forEach(function (t) { cell.appendChild(SG.chip(t)); });
    return cell;
  }
  function render() {
    var list = selected(), key = state.sort, dir = state.dir;
    list.sort(function (a, b) {
      var x = a[key], y = b[key];
      if (x === y) return a.index - b.index;
      if (x === undefined || x === null) return 1;
      if (y === undefined || y === null) return -1;
      return (x < y ? -1 : 1) * dir;
    });
    Array.prototype.forEach.call(head.children, function (th) {
      if (th.getAttribute("data-sort") === key) {
        th.setAttribute("data-order", dir > 0 ? "asc" : "desc");
      }
      else th.removeAttribute("data-order");
    });
    var pages = Math.max(1, Math.ceil(list.length / state.size));
    state.page = Math.min(state.page, pages - 1);
    var body = SG.clear(document.querySelector("#latents tbody"));
    list.slice(state.page * state.size, (state.page + 1) * state.size).forEach(function (r) {
      var tr = SG.el("tr", {"data-latent": r.index});
      var first = SG.el("td", {"class": "l"});
      first.appendChild(SG.latentLink(r.index));
      if (r.kind !== "alive") {
        first.appendChild(SG.el("span", {"class": "badge " + r.kind}, r.kind));
      }
      tr.appendChild(first);
      tr.appendChild(SG.el("td", {"data-col": "rate"}, SG.pct(r.rate)));
      tr.appendChild(SG.el("td", {"data-col": "count"}, r.count));
      tr.appendChild(SG.el("td", {"data-col": "max"}, SG.fmt(r.max)));
      tr.appendChild(SG.el("td", {"data-col": "mean"}, SG.fmt(r.mean)));
      tr.appendChild(chips(SG.el("td", {"class": "l", "data-col": "peak"}), r.peak));
      tr.appendChild(chips(SG.el("td", {"class": "l", "data-col": "pos"}), r.pos));
      if (monitor) {
        tr.appendChild(SG.el("td", {"data-col": "id_rate"}, SG.pct(r.id_rate)));
        tr.appendChild(SG.el("td", {"data-col": "id_p999"}, SG.fmt(r.id_p999)));
        tr.appendChild(SG.el("td", {"data-col": "rare"}, r.rare ? "yes" : ""));
      }
      body.appendChild(tr);
    });
    document.getElementById("count").textContent = list.length + " of " + rows.length + " latents";
    document.getElementById("pageinfo").textContent = "page " + (state.page + 1) + " of " + pages;
    document.getElementById("prev").disabled = state.page === 0;
    document.getElementById("next").disabled = state.page >= pages - 1;
  }
  function restart() { state.page = 0; render(); }
  [search, minRate, maxRate].forEach(function (n) { n.addEventListener("input", restart); });
  kind.addEventListener("change", restart);
  document.getElementById("page-size").addEventListener("change", function (e) {
    state.size = Number(e.target.value); restart();
  });
  document.getElementById("prev").addEventListener("click", function () {
    state.page -= 1; render();
  });
  document.getElementById("next").addEventListener("click", function () {
    state.page += 1; render();
  });
  render();
})();
"""

LATENT_JS = r"""
"use strict";
(function () {
  var D = window.SAEGUARD_INDEX;
  if (!D) { SG.fail("data/index.js did not load: is the site complete?"); return; }
  var S = D.summary, rows = SG.rowsOf(D), shards = {}, waiting = {};
  window.saeguardShard = function (k, latents) {
    shards[k] = latents;
    (waiting[k] || []).forEach(function (f) { f(); });
    delete waiting[k];
  };
  function wanted() {
    var m = /^#?(\d+)$/.exec(location.hash);
    if (m) return Number(m[1]);
    var q = new URLSearchParams(location.search).get("i");
    if (q !== null && /^\d+$/.test(q)) return Number(q);
    return 0;
  }
  function withLatent(i, then) {
    var k = Math.floor(i / S.shard_size);
    var done = function () { then(shards[k][i - k * S.shard_size]); };
    if (shards[k]) return done();
    if (waiting[k]) { waiting[k].push(done); return; }
    waiting[k] = [done];
    SG.loadScript(SG.shardFile(i, S), function () {
      SG.fail("cannot load " + SG.shardFile(i, S));
    });
  }
  function tokens(box, ctx, max) {
    var acts = {}, skipped = {};
    for (var k = 0; k < ctx.acts.length; k += 2) acts[ctx.acts[k]] = ctx.acts[k + 1];
    ctx.skipped.forEach(function (o) { skipped[o] = true; });
    var line = SG.el("div", {"class": "ctx", "data-text": ctx.text, "data-value": ctx.value});
    line.appendChild(SG.el("span", {"class": "val", "title": "activation at the marked token"},
                           SG.fmt(ctx.value)));
    ctx.tokens.forEach(function (t, o) {
      var cls = "tok" + (o === ctx.at ? " peak" : "") + (skipped[o] ? " skipped" : "");
      var span = SG.el("span", {"class": cls}, SG.showToken(t));
      if (skipped[o]) {
        span.setAttribute("title", "not read (excluded position)");
        span.setAttribute("data-act", "");
      }
      else {
        var a = acts[o] || 0;
        span.setAttribute("title", SG.fmt(a));
        span.setAttribute("data-act", String(a));
        var c = SG.colour(a, max);
        if (c) span.style.backgroundColor = c;
      }
      line.appendChild(span);
    });
    box.appendChild(line);
  }
  function histogram(L) {
    var svg = SG.clear(document.getElementById("histogram")), ns = svg.namespaceURI;
    var W = 520, H = 150, pad = 24, counts = L.hist.counts;
    var top = Math.max.apply(null, counts.concat([1]));
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    var bw = (W - 2 * pad) / counts.length;
    counts.forEach(function (n, b) {
      var h = (H - 2 * pad) * n / top;
      var r = document.createElementNS(ns, "rect");
      r.setAttribute("class", "bar"); r.setAttribute("data-count", String(n));
      r.setAttribute("x", String(pad + b * bw));
      r.setAttribute("width", String(Math.max(bw - 1, 1)));
      r.setAttribute("y", String(H - pad - h)); r.setAttribute("height", String(h));
      var t = document.createElementNS(ns, "title");
      t.textContent = SG.fmt(b * L.hist.width) + " to " + SG.fmt((b + 1) * L.hist.width) + ": " + n;
      r.appendChild(t); svg.appendChild(r);
    });
    [[pad, "0"], [W - pad, SG.fmt(L.max)]].forEach(function (p) {
      var t = document.createElementNS(ns, "text");
      t.setAttribute("x", String(p[0])); t.setAttribute("y", String(H - 8));
      t.setAttribute("text-anchor", "middle"); t.textContent = p[1]; svg.appendChild(t);
    });
    var y = document.createElementNS(ns, "text");
    y.setAttribute("x", String(pad)); y.setAttribute("y", "12");
    y.textContent = "max bin: " + top + " tokens";
    svg.appendChild(y);
  }
  function show(L) {
    var i = L.index, row = rows[i];
    document.title = "Latent " + i + " \u00B7 saeguard browse";
    document.getElementById("title").textContent = "Latent " + i;
    document.getElementById("prev-latent").setAttribute("href", SG.latentHref(Math.max(0, i - 1)));
    document.getElementById("next-latent").setAttribute(
      "href", SG.latentHref(Math.min(S.d_sae - 1, i + 1)));
    var stats = SG.clear(document.getElementById("stats"));
    function stat(name, value) {
      stats.appendChild(SG.el("dt", null, name));
      stats.appendChild(SG.el("dd", {"data-stat": name}, value));
    }
    stat("firing rate", SG.pct(L.rate) + " (" + L.count + " of " + S.tokens_read + " tokens)");
    stat("max activation", SG.fmt(L.max));
    stat("mean activation where active", SG.fmt(L.mean));
    stat("kind", L.dead ? "dead on this text" : (L.dense ? "dense" : "alive"));
    if (L.id) {
      stat("ID rate (monitor)", SG.pct(L.id.rate));
      stat("ID p99.9 (monitor)", SG.fmt(L.id.p999));
      stat("rare on ID", L.id.rare ? "yes: every firing counts as fallacious" : "no");
    }
    histogram(L);
    [["logits-pos", L.logits.pos], ["logits-neg", L.logits.neg]].forEach(function (p) {
      var list = SG.clear(document.getElementById(p[0]));
      p[1].forEach(function (tv) {
        var li = SG.el("li");
        li.appendChild(SG.chip(tv[0]));
        li.appendChild(SG.el("span", {"class": "num"}, " " + SG.fmt(tv[1])));
        list.appendChild(li);
      });
    });
    var near = SG.clear(document.getElementById("neighbours"));
    L.neighbours.forEach(function (jc) {
      var li = SG.el("li", {"data-latent": jc[0]});
      li.appendChild(SG.latentLink(jc[0]));
      li.appendChild(SG.el("span", {"class": "num"}, " cos " + SG.fmt(jc[1]) + " "));
      (rows[jc[0]] ? rows[jc[0]].peak : []).forEach(function (t) { li.appendChild(SG.chip(t)); });
      near.appendChild(li);
    });
    var box = SG.clear(document.getElementById("contexts"));
    if (!L.top.length) {
      box.appendChild(SG.el("p", {"class": "note"},
                            "This latent never fired on the held-out text read."));
    }
    L.top.forEach(function (c) { tokens(box, c, L.max); });
    var bands = SG.clear(document.getElementById("bands"));
    L.bands.forEach(function (b) {
      var sec = SG.el("section", {"class": "band", "data-from": b.from, "data-to": b.to});
      sec.appendChild(SG.el("h3", null, "quantiles " + Math.round(b.from * 100) + "\u2013" +
        Math.round(b.to * 100) + "% (" + b.count + " firings, activation " + SG.fmt(b.min) +
        " to " + SG.fmt(b.max) + ")"));
      b.samples.forEach(function (c) { tokens(sec, c, L.max); });
      bands.appendChild(sec);
    });
    document.getElementById("goto").value = String(i);
  }
  function load() {
    var i = wanted();
    if (!(i >= 0 && i < S.d_sae)) {
      SG.fail("no latent " + i + " (this SAE has " + S.d_sae + " latents)");
      return;
    }
    document.getElementById("error").hidden = true;
    withLatent(i, show);
  }
  document.getElementById("goto-form").addEventListener("submit", function (e) {
    e.preventDefault();
    location.hash = "#" + document.getElementById("goto").value.trim();
  });
  document.getElementById("logit-note").textContent = S.logit_effects;
  window.addEventListener("hashchange", load);
  load();
})();
"""

TEXTS_JS = r"""
"use strict";
(function () {
  var D = window.SAEGUARD_INDEX, T = window.SAEGUARD_TEXTS;
  if (!D || !T) {
    SG.fail("data/index.js or data/texts.js did not load: is the site complete?");
    return;
  }
  var rows = SG.rowsOf(D), spans = [];
  var box = document.getElementById("texts"), panel = document.getElementById("token-latents");
  document.getElementById("summary").textContent = SG.describe(D.summary);
  function choose(span, text, pos) {
    spans.forEach(function (s) { s.classList.remove("selected"); });
    span.classList.add("selected");
    SG.clear(panel);
    var token = text.tokens[pos], found = text.latents[pos] || [];
    panel.appendChild(SG.el("h3", {"id": "token-title"}, "Token \u201C" + SG.showToken(token) +
                            "\u201D (text " + text.text + ", position " + pos + ")"));
    var list = SG.el("ul", {"class": "plain"});
    for (var k = 0; k < found.length; k += 2) {
      var li = SG.el("li", {"data-latent": found[k], "data-act": found[k + 1]});
      li.appendChild(SG.latentLink(found[k]));
      li.appendChild(SG.el("span", {"class": "num"}, " " + SG.fmt(found[k + 1]) + " "));
      (rows[found[k]] ? rows[found[k]].peak : []).forEach(function (t) {
        li.appendChild(SG.chip(t));
      });
      list.appendChild(li);
    }
    if (!found.length) panel.appendChild(SG.el("p", {"class": "note"}, "No latent fired here."));
    panel.appendChild(list);
  }
  function highlight() {
    var v = document.getElementById("highlight").value.trim(), j = /^\d+$/.test(v) ? Number(v) : -1;
    var top = j >= 0 && rows[j] ? rows[j].max : 0;
    spans.forEach(function (s) {
      var found = s.saeguardLatents || [], a = 0;
      for (var k = 0; k < found.length; k += 2) if (found[k] === j) a = found[k + 1];
      s.style.backgroundColor = SG.colour(a, top);
    });
  }
  T.forEach(function (text) {
    var div = SG.el("div", {"class": "text", "data-text": text.text});
    div.appendChild(SG.el("h3", null, "Held-out text " + text.text));
    var p = SG.el("p", {"class": "ctx"});
    text.tokens.forEach(function (t, pos) {
      var excluded = text.latents[pos] === null;
      var span = SG.el("span", {"class": "tok" + (excluded ? " excluded" : ""),
                                "data-text": text.text, "data-pos": pos}, SG.showToken(t));
      if (excluded) span.setAttribute("title", "excluded position (not read)");
      else {
        span.saeguardLatents = text.latents[pos];
        span.setAttribute("tabindex", "0");
        span.addEventListener("click", function () { choose(span, text, pos); });
        span.addEventListener("keydown", function (e) {
          if (e.key === "Enter") choose(span, text, pos);
        });
      }
      spans.push(span);
      p.appendChild(span);
    });
    div.appendChild(p);
    box.appendChild(div);
  });
  document.getElementById("highlight").addEventListener("input", highlight);
})();
"""


def _page(title: str, body: str, scripts: tuple[str, ...]) -> str:
    tags = "".join(f'<script src="{s}"></script>' for s in scripts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{title}</title><link rel="stylesheet" href="assets/browse.css"></head>\n'
        '<body><header><nav><a href="index.html" id="nav-index">All latents</a>'
        '<a href="texts.html" id="nav-texts">Text \u2192 latents</a></nav></header>\n'
        f'<main><p id="error" class="error" hidden></p>\n{body}\n</main>\n{tags}\n</body></html>\n'
    )


INDEX_HTML = _page(
    "saeguard browse",
    """<h1>Latents</h1>
<p id="summary" class="note"></p>
<div class="controls">
<label>Search <input type="search" id="search" placeholder="token, substring or #N"></label>
<label>rate (fraction) from <input type="number" id="min-rate" step="any" min="0"
placeholder="0.0001"></label>
<label>to <input type="number" id="max-rate" step="any" min="0" placeholder="0.01"></label>
<label>Show <select id="kind"><option value="all">all</option><option value="alive">alive</option>
<option value="dead">dead</option><option value="dense">dense</option></select></label>
<label>Rows <select id="page-size"><option>50</option><option selected>100</option>
<option>500</option></select></label>
<span id="count" class="note"></span>
</div>
<div class="controls"><button type="button" id="prev">&larr; previous</button>
<span id="pageinfo" class="note"></span><button type="button" id="next">next &rarr;</button></div>
<table id="latents"><thead><tr></tr></thead><tbody></tbody></table>
<p class="note">Rates are fractions of the held-out tokens read; "top tokens" are the tokens the
latent fires on most among its top contexts; search matches them and the promoted
tokens (the suppressed ones are on each latent's page). <span id="logit-note"></span></p>""",
    ("data/index.js", "assets/common.js", "assets/index.js"),
)

LATENT_HTML = _page(
    "Latent",
    """<div class="controls"><a id="prev-latent" href="latent.html?i=0">&larr; previous</a>
<a id="next-latent" href="latent.html?i=1">next &rarr;</a>
<form id="goto-form"><label>Latent <input type="text" id="goto" size="6"></label>
<button type="submit">show</button></form></div>
<h1 id="title">Latent</h1>
<dl id="stats"></dl>
<h2>Activation histogram</h2>
<svg id="histogram" width="520" height="150" role="img" aria-label="activation histogram"></svg>
<p class="note">Tokens where the latent fired, by |activation|: linear bins from 0 to its max.</p>
<div class="cols"><section><h2>Top activating contexts</h2><div id="contexts"></div></section></div>
<h2>Samples across quantiles</h2>
<p class="note">The latent's firings ranked by activation, cut into equal bands; samples are
taken at evenly spaced ranks within each band (typical firings, not only the top).</p>
<div id="bands"></div>
<div class="cols">
<section id="logits"><h2>Logit effects</h2><p id="logit-note" class="note"></p>
<div class="cols"><div><h3>Promotes</h3><ul class="plain" id="logits-pos"></ul></div>
<div><h3>Suppresses</h3><ul class="plain" id="logits-neg"></ul></div></div></section>
<section><h2>Nearest latents (decoder cosine)</h2><ul class="plain" id="neighbours"></ul></section>
</div>""",
    ("data/index.js", "assets/common.js", "assets/latent.js"),
)

TEXTS_HTML = _page(
    "Text to latents",
    """<h1>Text &rarr; latents</h1>
<p id="summary" class="note"></p>
<div class="controls"><label>Colour by latent <input type="text" id="highlight" size="6"
placeholder="N"></label><span class="note">Click a token to list the latents that fired on it
(its largest; grey tokens were excluded from reading, as in training).</span></div>
<div class="layout"><div class="texts" id="texts"></div>
<aside id="token-panel"><div id="token-latents"><p class="note">Click a token.</p></div></aside>
</div>""",
    ("data/index.js", "data/texts.js", "assets/common.js", "assets/texts.js"),
)
