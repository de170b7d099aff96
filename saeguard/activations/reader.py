"""The one reader from text to activations: tokens -> contexts -> the forward pass to a hook ->
the exclusion rules, for every consumer of whole texts (the OOD monitor, probing, absorption).

Every text is read as the model reads it: a start token, then the text's tokens. A text longer
than the context is cut into consecutive windows of ``ctx_len - 1`` tokens, each with its own
start token (at most ``max_windows``, the rest dropped and marked truncated); with
``max_windows=1`` this is "one context per document", its head or its tail. Contexts are run in
batches of similar length, right-padded (with a causal model padding never changes earlier
positions; padded positions are dropped): each forward holds at most ``batch_size`` times the
longest context's tokens, so many short contexts share one, and at most :data:`PAD_WASTE` of
its token slots are padding, so a text's short last window is never padded to a full one.
Positions the SAE never saw in training (special tokens, attention-sink outliers) are excluded,
as in training; a text whose every position is excluded falls back to its real positions after
the start token, so it still has rows.

With ``with_lm`` the full model runs once and the LM baselines (max-softmax, predictive entropy,
perplexity of the text's own next tokens) are read from the same pass as the hook activations.
The packed training stream is :mod:`saeguard.activations.source`: it packs many documents into
each context, the one thing this reader does not do.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from saeguard.activations.exclusion import ExclusionRules
from saeguard.data.tokenize import packing_spec, tokenize_documents
from saeguard.errors import CorpusError
from saeguard.models.hooks import HookPoint, capture_hooks, run_to_hooks
from saeguard.models.loading import LoadedModel

Keep = Literal["head", "tail"]


@dataclass
class TextActivations:
    """The kept activations of one text, with where each row came from."""

    acts: torch.Tensor
    """[n, d] float32 activations at the hook (kept positions only)."""
    tokens: torch.Tensor
    """[n] the token id at each kept row."""
    window: torch.Tensor
    """[n] which of the text's windows each row is in."""
    position: torch.Tensor
    """[n] position of each row within its window."""
    windows: list[list[int]]
    """Token ids of the text's windows (start token included)."""
    truncated: bool = False
    """True when the text had more than ``max_windows`` windows and the rest was dropped."""
    lm: dict[str, float] = field(default_factory=dict)
    """LM baselines (msp, entropy, perplexity) when the full model ran."""
    lm_surprisal: torch.Tensor | None = None
    """[n] the LM's surprisal ``-log p`` (nats) of each kept token given its window's prefix
    (NaN for a window's first token, which nothing predicts), when the full model ran."""


@dataclass
class ReadFailure:
    """A text that cannot be scored, and why (the batch goes on without it)."""

    message: str


def pad_contexts(contexts: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids [batch, width] and the mask of their real positions."""
    width = max(len(c) for c in contexts)
    tokens = torch.full((len(contexts), width), pad, dtype=torch.long)
    real = torch.zeros(len(contexts), width, dtype=torch.bool)
    for r, context in enumerate(contexts):
        tokens[r, : len(context)] = torch.tensor(list(context), dtype=torch.long)
        real[r, : len(context)] = True
    return tokens, real


@dataclass
class ContextResult:
    """The activations of one context at the hook, and which positions to keep."""

    index: int
    """Position of the context in the input list."""
    acts: torch.Tensor
    """[n, d] float32 activations, one row per token of the context."""
    keep: torch.Tensor
    """[n] bool: positions the exclusion rules keep."""
    logits: torch.Tensor | None
    """[n, vocab] next-token logits when the full model ran (on the model's device)."""


PAD_WASTE = 0.25
"""Largest share of a forward's token slots that may be padding (beyond one longest context's
worth of slots, which short contexts may always pad)."""
MAX_ROWS_FACTOR = 4
"""A forward holds at most this many times ``batch_size`` contexts (however short)."""


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into forward passes, in ascending length: at most
    ``batch_size`` x the longest length tokens (padding included) and ``MAX_ROWS_FACTOR`` x
    ``batch_size`` rows per forward, and at most ``PAD_WASTE`` of its slots (or one longest
    context's worth of slots) padding. Contexts of
    one length go ``batch_size`` to a forward, as a plain cut would; a batch of texts whose last
    windows are short runs those together instead of padding each to a full window."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    longest = max(lengths, default=0)
    budget = batch_size * longest
    batches: list[list[int]] = []
    batch: list[int] = []
    real = 0
    for i in order:
        n = lengths[i]
        slots = (len(batch) + 1) * n  # n is the longest so far: ascending order
        if batch and (
            len(batch) + 1 > MAX_ROWS_FACTOR * batch_size
            or slots > budget
            or slots - real - n > max(PAD_WASTE * slots, longest)
        ):
            batches.append(batch)
            batch, real = [], 0
        batch.append(i)
        real += n
    if batch:
        batches.append(batch)
    return batches


def run_contexts(
    loaded: LoadedModel,
    hook: str,
    rules: ExclusionRules,
    contexts: Sequence[list[int]],
    batch_size: int = 16,
    with_lm: bool = False,
    progress: str | None = None,
) -> Iterator[ContextResult]:
    """Run the model to ``hook`` on token contexts, in batches of similar length
    (:func:`length_batches`: little padding wasted); yields each context's result (not in input
    order)."""
    point = loaded.hook_point(hook)
    pad = rules.special_ids[0] if rules.special_ids else 0
    bar = tqdm(total=len(contexts), desc=progress, unit="doc", disable=progress is None)
    for rows in length_batches([len(c) for c in contexts], batch_size):
        tokens, real = pad_contexts([contexts[i] for i in rows], pad)
        acts, logits = _forward(loaded, point, tokens.to(loaded.device), with_lm)
        keep = rules.keep_mask(tokens, acts, hook) & real
        for r, i in enumerate(rows):
            n = len(contexts[i])
            yield ContextResult(i, acts[r, :n], keep[r, :n],
                                logits[r, :n] if logits is not None else None)  # fmt: skip
        bar.update(len(rows))
    bar.close()


def _forward(
    loaded: LoadedModel, point: HookPoint, tokens: torch.Tensor, with_lm: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Activations at the hook (the forward stops there), on the CPU, or with ``with_lm`` also
    the logits, left on the model's device (the LM baselines reduce them there)."""
    model = loaded.model
    with torch.inference_mode():
        if with_lm:
            with capture_hooks(model, [point], stop_early=False) as store:
                logits = model(input_ids=tokens, use_cache=False).logits
            return store[point.name].float().cpu(), logits.float()
        return run_to_hooks(model, tokens, [point])[point.name].float().cpu(), None


class ActivationReader:
    """Windows texts and reads their activations at one hook point."""

    def __init__(
        self,
        loaded: LoadedModel,
        hook: str,
        rules: ExclusionRules,
        ctx_len: int = 128,
        prepend_bos: bool = True,
        batch_size: int = 16,
    ) -> None:
        self.loaded = loaded
        self.hook = hook
        self.point = loaded.hook_point(hook)
        self.rules = rules
        self.spec = packing_spec(loaded.tokenizer, ctx_len, prepend_bos)
        self.batch_size = batch_size
        self.room = ctx_len - (self.spec.start_id is not None)

    def windows(
        self, ids: list[int], keep: Keep = "head", max_windows: int | None = None
    ) -> tuple[list[list[int]], bool]:
        """Cut token ids into windows (each with the start token); (windows, truncated)."""
        # "tail" cuts from the end, so the last window is full and ends with the text's last token.
        first = len(ids) % self.room if keep == "tail" else 0
        chunks = ([ids[:first]] if first else []) + [
            ids[i : i + self.room] for i in range(first, len(ids), self.room)
        ]
        truncated = max_windows is not None and len(chunks) > max_windows
        if max_windows is not None and truncated:
            chunks = chunks[:max_windows] if keep == "head" else chunks[-max_windows:]
        start = [self.spec.start_id] if self.spec.start_id is not None else []
        return [start + c for c in chunks], truncated

    def read(
        self,
        texts: Sequence[str],
        with_lm: bool = False,
        keep: Keep = "head",
        max_windows: int | None = None,
        progress: str | None = None,
        chunk_texts: int = 64,
        blank_fails: bool = True,
    ) -> Iterator[tuple[int, TextActivations | ReadFailure]]:
        """Yield ``(index, activations or failure)`` for every text, in input order. A text with
        no tokens fails; so does one of whitespace alone, unless ``blank_fails`` is off."""
        bar = tqdm(total=len(texts), desc=progress, unit="text", disable=progress is None)
        for start in range(0, len(texts), chunk_texts):
            chunk = list(texts[start : start + chunk_texts])
            items = self._read_chunk(chunk, with_lm, keep, max_windows, blank_fails)
            for offset, item in enumerate(items):
                yield start + offset, item
            bar.update(len(chunk))
        bar.close()

    def _read_chunk(
        self,
        texts: list[str],
        with_lm: bool,
        keep: Keep,
        max_windows: int | None,
        blank_fails: bool = True,
    ) -> list[TextActivations | ReadFailure]:
        token_ids = tokenize_documents(self.loaded.tokenizer, texts)
        per_text: list[tuple[list[list[int]], bool] | None] = []
        flat: list[tuple[int, int, list[int]]] = []  # (text, window number, ids)
        for t, ids in enumerate(token_ids):
            if not ids or (blank_fails and not texts[t].strip()):  # nothing to judge
                per_text.append(None)
                continue
            wins, truncated = self.windows(ids, keep, max_windows)
            per_text.append((wins, truncated))
            flat.extend((t, w, ids_w) for w, ids_w in enumerate(wins))
        results = self._run_windows([w for _, _, w in flat], with_lm)
        by_text: dict[int, list[tuple[int, WindowResult]]] = {}
        for (t, w, _), res in zip(flat, results, strict=True):
            by_text.setdefault(t, []).append((w, res))
        out: list[TextActivations | ReadFailure] = []
        for t, entry in enumerate(per_text):
            if entry is None:
                what = "empty text" if not texts[t].strip() else "text with no tokens"
                out.append(ReadFailure(f"{what}: nothing to score"))
                continue
            out.append(_assemble(entry[0], entry[1], by_text[t], with_lm))
        return out

    def _run_windows(self, windows: list[list[int]], with_lm: bool) -> list[WindowResult]:
        results: list[WindowResult | None] = [None] * len(windows)
        batch = max(1, self.batch_size // 2 if with_lm else self.batch_size)
        for res in run_contexts(self.loaded, self.hook, self.rules, windows, batch, with_lm):
            n = len(windows[res.index])
            kept = res.keep
            if not kept.any():  # only special tokens: fall back to every real position
                kept = torch.ones(n, dtype=torch.bool)
                kept[0] = n == 1
            positions = kept.nonzero().squeeze(1)
            window = torch.tensor(windows[res.index], dtype=torch.long)
            lm, surprisal = None, None
            if res.logits is not None:
                lm, nll = _lm_sums(res.logits, window)
                surprisal = torch.cat([torch.full((1,), math.nan), nll])[positions]
            results[res.index] = WindowResult(
                res.acts[positions], window[positions], positions, lm, surprisal
            )
        return [r for r in results if r is not None]


@dataclass
class WindowResult:
    acts: torch.Tensor
    tokens: torch.Tensor
    positions: torch.Tensor
    lm: tuple[float, float, float, int] | None
    """Sums over predicted positions of (max prob, entropy, NLL) and their count."""
    surprisal: torch.Tensor | None = None
    """[kept] the LM's surprisal of each kept token (NaN at the window's first position)."""


def _lm_sums(
    logits: torch.Tensor, tokens: torch.Tensor
) -> tuple[tuple[float, float, float, int], torch.Tensor]:
    """Per-window sums for the LM baselines (each position predicting the window's next token),
    and the surprisal of each token from position 1 on ([len - 1], on the CPU)."""
    if len(tokens) < 2:
        return (0.0, 0.0, 0.0, 0), torch.zeros(0)
    tokens = tokens.to(logits.device)
    logp = F.log_softmax(logits[:-1].float(), dim=-1)
    probs = logp.exp()
    max_prob = probs.max(dim=-1).values.sum().item()
    entropy = -(probs * logp).sum(dim=-1).sum().item()
    nll_each = -logp.gather(-1, tokens[1:, None]).squeeze(1)
    nll = nll_each.sum().item()
    return (max_prob, entropy, nll, len(tokens) - 1), nll_each.cpu()


def _assemble(
    windows: list[list[int]],
    truncated: bool,
    parts: list[tuple[int, WindowResult]],
    with_lm: bool,
) -> TextActivations:
    parts.sort(key=lambda p: p[0])
    acts = torch.cat([p.acts for _, p in parts])
    tokens = torch.cat([p.tokens for _, p in parts])
    position = torch.cat([p.positions for _, p in parts])
    window = torch.cat([torch.full((len(p.positions),), w) for w, p in parts])
    lm: dict[str, float] = {}
    surprisal = None
    if with_lm and all(p.surprisal is not None for _, p in parts):
        surprisal = torch.cat([p.surprisal for _, p in parts if p.surprisal is not None])
    if with_lm:
        sums = [p.lm for _, p in parts if p.lm is not None and p.lm[3] > 0]
        count = sum(s[3] for s in sums)
        if count:
            lm = {
                "msp": 1.0 - sum(s[0] for s in sums) / count,
                "entropy": sum(s[1] for s in sums) / count,
                "perplexity": math.exp(min(sum(s[2] for s in sums) / count, 50.0)),
            }
        else:  # a one-token text predicts nothing: neutral values, never NaN
            lm = {"msp": 0.0, "entropy": 0.0, "perplexity": 1.0}
    return TextActivations(acts, tokens, window, position, windows, truncated, lm, surprisal)


def kept_document_activations(
    loaded: LoadedModel,
    hook: str,
    texts: Sequence[str],
    rules: ExclusionRules,
    ctx_len: int = 128,
    truncate: Keep | str = "head",
    batch_size: int = 16,
    progress: str | None = None,
) -> list[torch.Tensor]:
    """Kept activations [n_i, d] of each text read as one context (its head or its tail), in
    input order; an empty text is an error naming it."""
    reader = ActivationReader(loaded, hook, rules, ctx_len, batch_size=batch_size)
    keep: Keep = "tail" if truncate == "tail" else "head"
    out: list[torch.Tensor] = []
    for i, item in reader.read(texts, keep=keep, max_windows=1, progress=progress,
                               chunk_texts=max(1, len(texts)), blank_fails=False):  # fmt: skip
        if isinstance(item, ReadFailure):
            raise CorpusError(f"text {i} is empty after tokenisation; remove it or give it words")
        out.append(item.acts.clone())
    return out
