"""Tokenisation and packing of documents into fixed-length contexts.

Packing follows how causal LMs are pre-trained: documents are concatenated into one token stream,
each followed by a separator (``<|endoftext|>`` where the vocabulary has it, else EOS), and the
stream is cut into contexts. Every context starts with a start token so that position 0 always
holds the same token (it becomes an attention sink, which the harvester excludes): the tokenizer's
BOS if the tokenizer adds BOS by itself (Gemma, Llama 3), else the separator (SmolLM2, GPT-2).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from saeguard.data.splits import Document
from saeguard.errors import CorpusError

log = logging.getLogger(__name__)

_TOKENIZE_CHUNK = 256


@dataclass(frozen=True)
class PackingSpec:
    """How documents become contexts."""

    ctx_len: int
    """Tokens per context, start token included."""
    start_id: int | None
    """Token placed at position 0 of every context (None: no start token)."""
    sep_id: int | None
    """Token appended after every document (None: documents run together)."""


def packing_spec(tokenizer: Any, ctx_len: int, prepend_bos: bool = True) -> PackingSpec:
    """Choose start and separator tokens the way the model saw them in pre-training."""
    if ctx_len < 2:
        raise CorpusError(f"context length must be at least 2 tokens, got {ctx_len}")
    vocab = tokenizer.get_vocab()
    sep = vocab.get("<|endoftext|>", tokenizer.eos_token_id)
    if sep is None:
        sep = tokenizer.bos_token_id
    start = None
    if prepend_bos:
        probe = tokenizer("a")["input_ids"]
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and len(probe) > 0 and probe[0] == bos
        start = bos if adds_bos else (sep if sep is not None else bos)
    return PackingSpec(ctx_len, start, sep)


def tokenize_documents(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text; special-token strings in the text are tokenised as plain text."""
    out: list[list[int]] = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        chunk = list(texts[start : start + _TOKENIZE_CHUNK])
        # split_special_tokens: a literal "<|endoftext|>" in a document is text, not a separator.
        encoded = tokenizer(
            chunk, add_special_tokens=False, split_special_tokens=True, verbose=False
        )
        out.extend(encoded["input_ids"])
    return out


def iter_contexts(
    tokenizer: Any,
    documents: Sequence[Document],
    spec: PackingSpec,
    seed: int = 0,
    shuffle: bool = True,
    repeat: bool = False,
) -> Iterator[list[int]]:
    """Yield packed contexts of exactly ``spec.ctx_len`` token ids, deterministically.

    The document order is shuffled with ``seed``; with ``repeat`` the corpus is cycled, each
    pass in a new order. A final partial context is dropped.
    """
    if not documents:
        raise CorpusError("cannot pack an empty corpus: the selected split has no documents")
    body_len = spec.ctx_len - (1 if spec.start_id is not None else 0)
    buffer: list[int] = []
    epoch = 0
    produced = 0
    while True:
        order = list(range(len(documents)))
        if shuffle:
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for start in range(0, len(order), _TOKENIZE_CHUNK):
            idx = order[start : start + _TOKENIZE_CHUNK]
            for ids in tokenize_documents(tokenizer, [documents[i].text for i in idx]):
                buffer.extend(ids)
                if spec.sep_id is not None:
                    buffer.append(spec.sep_id)
                while len(buffer) >= body_len:
                    body, buffer = buffer[:body_len], buffer[body_len:]
                    produced += 1
                    yield ([spec.start_id] if spec.start_id is not None else []) + body
        if not repeat:
            return
        if produced == 0:
            raise CorpusError("the corpus is shorter than one context; lower --ctx-len")
        epoch += 1
        log.warning("corpus exhausted after %d contexts: starting pass %d", produced, epoch + 1)
