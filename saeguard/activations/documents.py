"""Activations of whole documents, one context per document (for probing and OOD scoring).

Unlike the packed harvest, each text gets its own context: the start token, then the text's
first (or last) ``ctx_len - 1`` tokens. Rows are right-padded; with a causal model the padding
never changes earlier positions, and padded positions are dropped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from saeguard.activations.exclusion import ExclusionRules
from saeguard.data.tokenize import packing_spec, tokenize_documents
from saeguard.errors import CorpusError
from saeguard.models.hooks import run_to_hooks
from saeguard.models.loading import LoadedModel


@dataclass
class DocumentBatch:
    """Activations of a batch of documents at one hook."""

    acts: torch.Tensor
    """[batch, seq, d] float32 activations."""
    keep: torch.Tensor
    """[batch, seq] bool: real, non-excluded positions."""
    tokens: torch.Tensor
    """[batch, seq] token ids (padding included)."""
    first_index: int
    """Index of the batch's first document in the input list."""


def encode_documents(
    loaded: LoadedModel,
    texts: Sequence[str],
    ctx_len: int,
    truncate: Literal["head", "tail"] = "head",
    prepend_bos: bool = True,
) -> list[list[int]]:
    """Token ids of each text as one context (start token + at most ``ctx_len - 1`` tokens)."""
    spec = packing_spec(loaded.tokenizer, ctx_len, prepend_bos)
    room = ctx_len - (spec.start_id is not None)
    out = []
    for i, ids in enumerate(tokenize_documents(loaded.tokenizer, list(texts))):
        if not ids:
            raise CorpusError(f"text {i} is empty after tokenisation; remove it or give it words")
        ids = ids[:room] if truncate == "head" else ids[-room:]
        out.append(([spec.start_id] if spec.start_id is not None else []) + ids)
    return out


def pad_contexts(contexts: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids [batch, width] and the mask of their real positions."""
    width = max(len(c) for c in contexts)
    tokens = torch.full((len(contexts), width), pad, dtype=torch.long)
    real = torch.zeros(len(contexts), width, dtype=torch.bool)
    for r, context in enumerate(contexts):
        tokens[r, : len(context)] = torch.tensor(list(context), dtype=torch.long)
        real[r, : len(context)] = True
    return tokens, real


def iter_document_activations(
    loaded: LoadedModel,
    hook: str,
    contexts: Sequence[list[int]],
    rules: ExclusionRules,
    batch_size: int = 16,
    progress: str | None = None,
) -> Iterator[DocumentBatch]:
    """Run the model to ``hook`` on each context; yield batches with their keep masks."""
    point = loaded.hook_point(hook)
    pad = rules.special_ids[0] if rules.special_ids else 0
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
    bar = tqdm(total=len(contexts), desc=progress, unit="doc", disable=progress is None)
    # Batches of similar length waste little padding; results come back in input order.
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        tokens, real = pad_contexts([contexts[i] for i in rows], pad)
        with torch.inference_mode():
            acts = run_to_hooks(loaded.model, tokens.to(loaded.device), [point])[hook]
        acts = acts.float().cpu()
        keep = rules.keep_mask(tokens, acts, hook) & real
        for r, i in enumerate(rows):
            yield DocumentBatch(acts[r : r + 1], keep[r : r + 1], tokens[r : r + 1], i)
        bar.update(len(rows))
    bar.close()


def kept_document_activations(
    loaded: LoadedModel,
    hook: str,
    texts: Sequence[str],
    rules: ExclusionRules,
    ctx_len: int = 128,
    truncate: Literal["head", "tail"] | str = "head",
    batch_size: int = 16,
    progress: str | None = None,
) -> list[torch.Tensor]:
    """Kept activations [n_i, d] of each text, in input order.

    A text whose every position is excluded (e.g. only special tokens) falls back to all its
    real positions after the start token, so that every text has at least one row.
    """
    contexts = encode_documents(loaded, texts, ctx_len, "tail" if truncate == "tail" else "head")
    out: list[torch.Tensor | None] = [None] * len(texts)
    for batch in iter_document_activations(loaded, hook, contexts, rules, batch_size, progress):
        kept = batch.acts[batch.keep]
        if len(kept) == 0:
            length = len(contexts[batch.first_index])
            kept = batch.acts[0, 1:length] if length > 1 else batch.acts[0, :1]
        out[batch.first_index] = kept.clone()
    return [t for t in out if t is not None]
