"""Documents and deterministic train / validation / test splits.

A document's split is a function of a seeded hash of its text alone, so the same text lands in the
same split on every machine, in every run and whatever else is in the corpus: nothing can leak
from train into validation or test (duplicates included, since they hash alike).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

Split = Literal["train", "validation", "test", "all"]
SPLITS: tuple[str, ...] = ("train", "validation", "test", "all")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)


@dataclass(frozen=True)
class Document:
    """One text with an optional class label."""

    id: str
    text: str
    label: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def corpus_fingerprint(documents: list[Document]) -> str:
    """SHA-256 of the documents' texts in order: changes whenever any text changes."""
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(doc.text.encode("utf-8", errors="surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()


def split_unit(text: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the text and the seed."""
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(
    text: str, seed: int = 0, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> str:
    """The split ('train', 'validation' or 'test') a document belongs to."""
    u = split_unit(text, seed)
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "validation"
    return "test"


def select_split(
    documents: list[Document],
    split: str,
    seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> list[Document]:
    """The documents of one split, in their original order ('all' keeps every document)."""
    if split == "all":
        return list(documents)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return [d for d in documents if split_of(d.text, seed, fractions) == split]


def held_out(documents: list[Document], seed: int = 0) -> list[Document]:
    """The documents no SAE or monitor is fitted on: the validation split, then the test split."""
    return select_split(documents, "validation", seed) + select_split(documents, "test", seed)
