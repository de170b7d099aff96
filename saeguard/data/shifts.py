"""Distribution-shift sets for the OOD benchmark: which texts are "out", which are "in".

A shift is named by a short string (the same names on the CLI and in the result tables):

- ``typos:RATE``: the in-distribution evaluation texts with seeded typos in ``RATE`` of the words;
- ``jailbreak-wrap``: harmful questions inside DAN-style templates, against the same questions
  plain (its own negatives: the question is the constant, the template is the shift);
- any corpus name (``jailbreaks-wild``, ``wiki-es``, ``wiki-fr``, ``bbc``, ``code-python``, or a
  user's ``.txt``/``.jsonl``/``.csv`` file): a seeded sample of its held-out documents.

Negatives default to the in-distribution evaluation texts (the ID corpus's ``test`` split), which
are never used to fit the monitor's statistics (``train``) or to calibrate it (``validation``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from saeguard.data.corpora import load_corpus
from saeguard.data.perturb import add_typos, parse_shift, wrap_in_template
from saeguard.data.splits import held_out, select_split
from saeguard.errors import ConfigError, CorpusError

DEFAULT_SHIFTS: tuple[str, ...] = (
    "typos:0.05",
    "typos:0.1",
    "typos:0.2",
    "jailbreak-wrap",
    "jailbreaks-wild",
    "wiki-es",
    "wiki-fr",
    "bbc",
    "code-python",
)
SHIFT_KINDS: dict[str, str] = {
    "jailbreaks-wild": "in-the-wild jailbreaks",
    "wiki-es": "language",
    "wiki-fr": "language",
    "bbc": "domain",
    "code-python": "code",
}


@dataclass
class ShiftSet:
    """Out-of-distribution texts of one shift, and the negatives they are told apart from."""

    name: str
    """The shift's name as given (``typos:0.2``, ``wiki-es``, ...)."""
    kind: str
    """typos, jailbreak wrapping, in-the-wild jailbreaks, language, domain, code or corpus."""
    ood_texts: list[str]
    id_texts: list[str] | None = None
    """Negatives of its own (plain questions for jailbreak wrapping); None: the shared ID set."""
    truncate: str = "head"
    """Which end of a long text is scored ("tail" keeps a question placed after a template)."""


def id_split_texts(corpus: str, split: str, n: int, seed: int = 0) -> list[str]:
    """A seeded sample of ``n`` texts of one split of the in-distribution corpus."""
    docs = select_split(list(load_corpus(corpus).documents), split, seed)
    if not docs:
        raise CorpusError(f"the {split} split of {corpus!r} is empty; use a larger corpus")
    rng = random.Random(f"{seed}:{corpus}:{split}")
    rng.shuffle(docs)
    return [d.text for d in docs[:n]]


def build_shift(name: str, id_texts: list[str], n: int, seed: int = 0) -> ShiftSet:
    """The :class:`ShiftSet` a shift name stands for, with at most ``n`` OOD texts."""
    if n < 1:
        raise ConfigError(f"a shift set needs at least one text, got n={n}")
    if name.partition(":")[0] == "typos":
        _, rate = parse_shift(name)
        texts = [add_typos(t, rate, seed) for t in id_texts[:n]]
        return ShiftSet(name, "typos", texts)
    if name == "jailbreak-wrap":
        questions = [d.text for d in load_corpus("harmful-questions").documents]
        templates = [d.text for d in load_corpus("dan-templates").documents]
        rng = random.Random(f"{seed}:jailbreak-wrap")
        rng.shuffle(questions)
        chosen = questions[:n]
        wrapped = [wrap_in_template(q, rng.choice(templates)) for q in chosen]
        return ShiftSet(name, "jailbreak wrapping", wrapped, chosen, truncate="tail")
    try:
        docs = list(load_corpus(name).documents)
    except CorpusError:
        raise
    except Exception as exc:  # unknown corpus name: say what a shift can be
        raise ConfigError(
            f"unknown shift {name!r}: use typos:RATE, jailbreak-wrap, or a corpus name "
            f"({', '.join(SHIFT_KINDS)}, or a .txt/.jsonl/.csv file). Details: {exc}"
        ) from exc
    docs = held_out(docs, seed) or docs  # a small user file may have no held-out split
    random.Random(f"{seed}:shift:{name}").shuffle(docs)
    return ShiftSet(name, SHIFT_KINDS.get(name, "corpus"), [d.text for d in docs[:n]])
