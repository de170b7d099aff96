"""One pass over held-out text, collecting what a feature browser shows of every latent.

The texts are read through the one reader (:class:`~saeguard.activations.reader.ActivationReader`:
the SAE's own windows, start token and exclusion rules) until ``tokens`` kept positions are read.
Each position's active latents (the SAE's sparse codes, never a dense ``[n, d_sae]`` matrix) are
kept as (row, latent, value) triples, with each row's window and position: at most about 40
bytes per active latent with the sorted copies made at the end (a TopK SAE with k = 32: about
1.3 KB a token; the token budget bounds it).
Everything else is computed from them at the end, exactly, with a few vectorised sorts:

- firing count and rate (tokens where the latent is non-zero / tokens read), max |activation|;
- a histogram of |activation| over the tokens where it fires: ``bins`` linear bins from 0 to the
  latent's own max (bin width ``max / bins``; the counts sum to the firing count);
- the ``top_k`` highest |activations| (ties: reading order), and quantile samples: the firings
  ranked by |activation| are cut into ``quantile_buckets`` equal bands (with 4: the top quarter,
  the second, ...), and ``per_bucket`` samples are taken at evenly spaced ranks inside each band,
  so a page shows typical firings and not only the top;
- for every shown firing, its snippet: ``left`` tokens before and ``right`` after it within its
  window (the context the model saw), each with the value of *that* latent there (positions
  excluded by the reading rules, or not read, are listed as skipped).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from saeguard.activations.reader import ActivationReader, ReadFailure, TextActivations
from saeguard.errors import ConfigError, CorpusError
from saeguard.sae.base import SparseAutoencoder

DecodeToken = Callable[[int], str]
"""Token id -> its text, as shown on the pages."""


@dataclass(kw_only=True)
class CollectConfig:
    """What `saeguard browse` reads and keeps of every latent."""

    tokens: int = 200_000
    """Held-out tokens to read (kept positions, as the SAE saw them in training); fewer when
    the test split runs out first (wiki-en's holds about 106,000)."""
    top_k: int = 12
    """Top-activating contexts kept per latent."""
    quantile_buckets: int = 4
    """Bands the firings of a latent are cut into by rank (4: top quarter ... bottom quarter)."""
    per_bucket: int = 2
    """Samples shown from each band, at evenly spaced ranks inside it."""
    left: int = 20
    """Tokens shown before a firing token in its snippet."""
    right: int = 6
    """Tokens shown after it."""
    bins: int = 32
    """Histogram bins per latent (linear, from 0 to the latent's max)."""
    dense_rate: float = 0.01
    """Firing rate from which a latent counts as dense."""
    max_windows: int = 4
    """Context windows read per text at most (the rest of a longer text is skipped)."""
    text_examples: int = 40
    """Held-out texts shown on the 'text -> latents' page (the first ones read)."""
    text_tokens: int = 192
    """Tokens of each of those texts shown there."""
    text_latents: int = 5
    """Latents listed per token there (its largest)."""
    batch_size: int = 32
    """Context windows per forward pass."""
    seed: int = 0
    """Seed of the order the held-out texts are read in."""

    def __post_init__(self) -> None:
        positive = {
            "tokens": self.tokens, "top-k": self.top_k, "quantile-buckets": self.quantile_buckets,
            "bins": self.bins, "max-windows": self.max_windows, "batch-size": self.batch_size,
            "text-latents": self.text_latents,
        }  # fmt: skip
        for flag, value in positive.items():
            if value < 1:
                raise ConfigError(f"--{flag} must be at least 1, got {value}")
        for flag, value in (("per-bucket", self.per_bucket), ("left", self.left),
                            ("right", self.right), ("text-examples", self.text_examples),
                            ("text-tokens", self.text_tokens)):  # fmt: skip
            if value < 0:
                raise ConfigError(f"--{flag} must be 0 or more, got {value}")
        if not 0 < self.dense_rate <= 1:
            raise ConfigError(f"--dense-rate must lie in (0, 1], got {self.dense_rate}")


@dataclass
class Collection:
    """The raw result of the pass: every active latent of every token read, and where it was."""

    d_sae: int
    n_tokens: int
    """Kept positions read."""
    n_texts: int
    """Texts read (the last one possibly in part)."""
    row: torch.Tensor
    """[nnz] row (token) of each active latent, in reading order."""
    latent: torch.Tensor
    """[nnz] its latent."""
    value: torch.Tensor
    """[nnz] its value (float32)."""
    row_window: torch.Tensor
    """[n_tokens] window of each row (an index into ``windows``)."""
    row_position: torch.Tensor
    """[n_tokens] position of each row within its window."""
    windows: list[list[int]]
    """Token ids of every window read (start token included)."""
    window_text: list[int]
    """Text of each window."""
    window_offset: torch.Tensor
    """[n_windows] where each window's positions begin in ``position_row``."""
    position_row: torch.Tensor
    """[sum of window lengths] the row read at each position of each window (-1: excluded by
    the reading rules, or not read)."""
    seconds: float = 0.0
    """Time the pass took."""

    def rows_at(self, window: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Rows at (window, position) pairs (-1 where nothing was read)."""
        return self.position_row[self.window_offset[window] + position]


def read_held_out(
    reader: ActivationReader,
    sae: SparseAutoencoder,
    texts: Sequence[str],
    cfg: CollectConfig,
    progress: bool = True,
) -> Collection:
    """Read ``texts`` in order until ``cfg.tokens`` kept positions are read (the last text in
    part) and keep the active latents of every position."""
    started = time.perf_counter()
    device = sae.W_dec.device
    rows: list[torch.Tensor] = []
    lats: list[torch.Tensor] = []
    vals: list[torch.Tensor] = []
    where = _Where()
    pending: list[torch.Tensor] = []
    pending_rows = 0
    n_rows = 0
    n_texts = 0
    encoded = 0

    def flush() -> None:
        nonlocal pending, pending_rows, encoded
        if not pending:
            return
        x = torch.cat(pending).to(device)
        with torch.no_grad():
            values, indices, _ = sae.sparse_codes(x)
        active = values != 0
        local, _ = active.nonzero(as_tuple=True)
        rows.append((local + encoded).cpu())
        lats.append(indices[active].to(torch.int32).cpu())
        vals.append(values[active].float().cpu())
        encoded += len(x)
        pending, pending_rows = [], 0

    bar = tqdm(total=cfg.tokens, desc="browse: read held-out text", unit="tok",
               disable=not progress)  # fmt: skip
    start = 0
    while start < len(texts) and n_rows < cfg.tokens:
        # Many texts per call, so that the reader batches windows of similar length (little
        # padding), but not many more than the budget still needs (no forward pass wasted).
        per_text = n_rows / start if start else 100.0
        chunk = int(min(256, max(8, 1.2 * (cfg.tokens - n_rows) / max(per_text, 1.0))))
        part = list(texts[start : start + chunk])
        for offset, item in reader.read(part, max_windows=cfg.max_windows, chunk_texts=chunk):
            if n_rows >= cfg.tokens or isinstance(item, ReadFailure):
                continue
            take = min(len(item.acts), cfg.tokens - n_rows)
            where.add(item, take, start + offset, n_rows)
            pending.append(item.acts[:take])
            pending_rows += take
            n_rows += take
            n_texts = start + offset + 1
            bar.update(take)
            if pending_rows >= 4096:
                flush()
        start += len(part)
    flush()
    bar.close()
    if n_rows == 0:
        raise CorpusError(
            "no held-out text could be read: the test split of the corpus is empty or blank; "
            "choose a larger --corpus"
        )
    lengths = torch.tensor([len(w) for w in where.windows], dtype=torch.long)
    return Collection(
        d_sae=sae.cfg.d_sae,
        n_tokens=n_rows,
        n_texts=n_texts,
        row=torch.cat(rows).long(),
        latent=torch.cat(lats).long(),
        value=torch.cat(vals),
        row_window=torch.cat(where.row_window).long(),
        row_position=torch.cat(where.row_position).long(),
        windows=where.windows,
        window_text=where.window_text,
        window_offset=torch.cumsum(lengths, 0) - lengths,
        position_row=torch.cat(where.position_row),
        seconds=time.perf_counter() - started,
    )


@dataclass
class _Where:
    """Where each row read sits: its window and position, and the reverse map."""

    windows: list[list[int]] = field(default_factory=list)
    window_text: list[int] = field(default_factory=list)
    row_window: list[torch.Tensor] = field(default_factory=list)
    row_position: list[torch.Tensor] = field(default_factory=list)
    position_row: list[torch.Tensor] = field(default_factory=list)

    def add(self, item: TextActivations, take: int, text_id: int, first_row: int) -> None:
        """Record the windows of one text and where its first ``take`` rows sit in them."""
        first_window = len(self.windows)
        lengths = torch.tensor([len(w) for w in item.windows], dtype=torch.long)
        starts = torch.cumsum(lengths, 0) - lengths
        self.windows.extend(list(w) for w in item.windows)
        self.window_text.extend([text_id] * len(item.windows))
        window, position = item.window[:take].long(), item.position[:take].long()
        reverse = torch.full((int(lengths.sum()),), -1, dtype=torch.long)
        reverse[starts[window] + position] = first_row + torch.arange(take)
        self.position_row.append(reverse)
        self.row_window.append(window + first_window)
        self.row_position.append(position)


@dataclass
class LatentStats:
    """Per-latent statistics of a :class:`Collection`, and its firings ranked per latent."""

    count: torch.Tensor
    """[d_sae] tokens on which each latent fired."""
    max: torch.Tensor
    """[d_sae] largest |activation| (0 when it never fired)."""
    mean: torch.Tensor
    """[d_sae] mean |activation| where it fired (0 when it never fired)."""
    hist: torch.Tensor
    """[d_sae, bins] counts of |activation| in linear bins from 0 to the latent's max."""
    order: torch.Tensor
    """[nnz] the collection's entries sorted by latent, then |activation| descending."""
    starts: torch.Tensor
    """[d_sae] where each latent's entries begin in ``order``."""


def latent_stats(c: Collection, bins: int) -> LatentStats:
    """Counts, max, mean, histograms and the per-latent ranking, all vectorised."""
    d = c.d_sae
    mag = c.value.abs()
    count = torch.bincount(c.latent, minlength=d)
    top = torch.zeros(d).scatter_reduce(0, c.latent, mag, "amax", include_self=True)
    total = torch.zeros(d, dtype=torch.float64).index_add_(0, c.latent, mag.double())
    mean = (total / count.clamp_min(1)).float()
    scale = top[c.latent].clamp_min(1e-30)
    which = (mag / scale * bins).floor().long().clamp_(0, bins - 1)
    hist = torch.bincount(c.latent * bins + which, minlength=d * bins).view(d, bins)
    by_value = torch.argsort(mag, descending=True, stable=True)
    order = by_value[torch.argsort(c.latent[by_value], stable=True)]
    starts = torch.cumsum(count, 0) - count
    return LatentStats(count, top, mean, hist, order, starts)


def band_ranks(count: int, buckets: int, per_bucket: int) -> list[tuple[int, int, list[int]]]:
    """For a latent with ``count`` firings ranked by |activation| (0 = largest): each band's
    rank range ``[lo, hi)`` (band 0 holds the largest) and the ranks sampled in it (evenly
    spaced, without repeats)."""
    out: list[tuple[int, int, list[int]]] = []
    for b in range(buckets):
        lo, hi = (b * count) // buckets, ((b + 1) * count) // buckets
        if hi <= lo or per_bucket == 0:
            out.append((lo, hi, []))
            continue
        ranks = sorted({lo + int((j + 0.5) * (hi - lo) / per_bucket) for j in range(per_bucket)})
        out.append((lo, hi, ranks))
    return out


class ActivationLookup:
    """The value of any latent at any row of a collection (0 where it did not fire)."""

    def __init__(self, c: Collection) -> None:
        self.d = c.d_sae
        keys = c.row * self.d + c.latent
        self.keys, sort = torch.sort(keys)
        self.values = c.value[sort]

    def at(self, rows: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """[n] values of ``latents`` at ``rows`` (same shape)."""
        if len(self.keys) == 0:
            return torch.zeros(rows.shape)
        query = rows.long() * self.d + latents.long()
        where = torch.searchsorted(self.keys, query).clamp_(max=len(self.keys) - 1)
        hit = self.keys[where] == query
        return torch.where(hit, self.values[where], torch.zeros(()))

    def row_latents(self, row: int) -> tuple[list[int], list[float]]:
        """(latents, values) active at one row."""
        lo = int(torch.searchsorted(self.keys, torch.tensor(row * self.d)))
        hi = int(torch.searchsorted(self.keys, torch.tensor((row + 1) * self.d)))
        return (
            (self.keys[lo:hi] - row * self.d).tolist(),
            self.values[lo:hi].tolist(),
        )


def round_value(value: float, digits: int = 4) -> float:
    """A value rounded to ``digits`` significant digits (what the pages show)."""
    if value == 0 or not math.isfinite(value):
        return 0.0
    return float(f"{value:.{digits}g}")


def snippets(
    c: Collection,
    lookup: ActivationLookup,
    decode: DecodeToken,
    samples: list[tuple[int, int, float]],
    left: int,
    right: int,
    first: int,
) -> list[dict[str, Any]]:
    """The snippet of each sampled firing ``(latent, row, value)``: ``left`` tokens before the
    firing token and ``right`` after it within its window (from position ``first``: 1 skips
    the start token), the centre ``at``, and the latent's value at each shown token as a flat
    ``[offset, value, ...]`` list of the non-zero ones; ``skipped`` lists the shown positions
    with no value (excluded by the reading rules, or not read)."""
    if not samples:
        return []
    latent = torch.tensor([s[0] for s in samples], dtype=torch.long)
    row = torch.tensor([s[1] for s in samples], dtype=torch.long)
    window, position = c.row_window[row], c.row_position[row]
    length = torch.tensor([len(w) for w in c.windows], dtype=torch.long)[window]
    lo = (position - left).clamp_min(first)
    hi = torch.minimum(position + right + 1, length)
    span = torch.arange(left + right + 1)
    q = lo[:, None] + span[None, :]
    shown = q < hi[:, None]
    inside = q.clamp(max=length[:, None] - 1)
    rows = torch.where(shown, c.rows_at(window[:, None].expand_as(q), inside), -1)
    read = rows >= 0
    values = torch.zeros(q.shape)
    values[read] = lookup.at(rows[read], latent[:, None].expand_as(q)[read])
    out: list[dict[str, Any]] = []
    for s, (_, _, value) in enumerate(samples):
        w, a, z = int(window[s]), int(lo[s]), int(hi[s])
        acts: list[float] = []
        skipped: list[int] = []
        for offset, (v, r) in enumerate(zip(values[s, : z - a].tolist(), read[s, : z - a].tolist(),
                                            strict=True)):  # fmt: skip
            if not r:
                skipped.append(offset)
            elif v != 0:
                acts += [offset, round_value(v)]
        out.append({
            "text": c.window_text[w],
            "tokens": [decode(t) for t in c.windows[w][a:z]],
            "at": int(position[s]) - a,
            "value": round_value(value),
            "acts": acts,
            "skipped": skipped,
        })  # fmt: skip
    return out


def latent_contexts(
    c: Collection,
    stats: LatentStats,
    lookup: ActivationLookup,
    decode: DecodeToken,
    cfg: CollectConfig,
    first: int,
) -> list[dict[str, Any]]:
    """Per latent: its top contexts (``top``), its quantile bands with their samples
    (``bands``: ``from``/``to`` quantile levels, ``samples``), and the tokens it fires on most
    among its top contexts (``peak_tokens``)."""
    count = stats.count.tolist()
    starts = stats.starts.tolist()
    entry_row = c.row[stats.order].tolist()
    entry_value = c.value[stats.order].tolist()
    samples: list[tuple[int, int, float]] = []
    plan: list[tuple[int, list[dict[str, Any]], list[int]]] = []  # top count, bands, their sizes
    for i in range(c.d_sae):
        n, s0 = count[i], starts[i]
        if n == 0:
            plan.append((0, [], []))
            continue
        ranks = list(range(min(cfg.top_k, n)))
        bands: list[dict[str, Any]] = []
        sizes: list[int] = []
        for b, (lo, hi, band) in enumerate(band_ranks(n, cfg.quantile_buckets, cfg.per_bucket)):
            ranks += band
            sizes.append(len(band))
            bands.append({
                "from": round(1 - (b + 1) / cfg.quantile_buckets, 4),
                "to": round(1 - b / cfg.quantile_buckets, 4),
                "count": hi - lo,
                "min": round_value(entry_value[s0 + hi - 1]) if hi > lo else 0.0,
                "max": round_value(entry_value[s0 + lo]) if hi > lo else 0.0,
            })  # fmt: skip
        samples += [(i, entry_row[s0 + r], entry_value[s0 + r]) for r in ranks]
        plan.append((min(cfg.top_k, n), bands, sizes))
    made = iter(snippets(c, lookup, decode, samples, cfg.left, cfg.right, first))
    out: list[dict[str, Any]] = []
    for n_top, shown, taken in plan:
        top = [next(made) for _ in range(n_top)]
        for entry, size in zip(shown, taken, strict=True):
            entry["samples"] = [next(made) for _ in range(size)]
        peaks: dict[str, int] = {}
        for context in top:
            token = context["tokens"][context["at"]]
            peaks[token] = peaks.get(token, 0) + 1
        ranked = sorted(peaks, key=lambda t: -peaks[t])  # stable: ties keep the value order
        out.append({"top": top, "bands": shown, "peak_tokens": ranked[:3]})
    return out


def text_pages(
    c: Collection, lookup: ActivationLookup, decode: DecodeToken, cfg: CollectConfig, first: int
) -> list[dict[str, Any]]:
    """The first ``text_examples`` texts read, token by token, each token with its largest
    latents as a flat ``[latent, value, ...]`` list (null at positions excluded by the reading
    rules or not read); ``text_tokens`` tokens each, start tokens left out."""
    pages: list[dict[str, Any]] = []
    windows_of: dict[int, list[int]] = {}
    for w, text_id in enumerate(c.window_text):
        if text_id < cfg.text_examples:
            windows_of.setdefault(text_id, []).append(w)
    for text_id in sorted(windows_of):
        tokens: list[str] = []
        latents: list[list[float] | None] = []
        for w in windows_of[text_id]:
            ids = c.windows[w]
            for q in range(first, len(ids)):
                if len(tokens) >= cfg.text_tokens:
                    break
                tokens.append(decode(ids[q]))
                row = int(c.position_row[int(c.window_offset[w]) + q])
                if row < 0:
                    latents.append(None)
                    continue
                found = lookup.row_latents(row)
                best = sorted(zip(*found, strict=True), key=lambda p: -abs(p[1]))
                flat: list[float] = []
                for latent, value in best[: cfg.text_latents]:
                    flat += [latent, round_value(value)]
                latents.append(flat)
        pages.append({"text": text_id, "tokens": tokens, "latents": latents})
    return pages


class TokenDecoder:
    """Token id -> text, decoded once per id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self.cache.get(token)
        if text is None:
            text = str(self.tokenizer.decode([token]))
            self.cache[token] = text
        return text
