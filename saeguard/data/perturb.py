"""Seeded distribution shifts applied to text: typos and jailbreak wrapping.

Every function is deterministic given its seed, so a shifted evaluation set can be rebuilt
exactly (the OOD benchmark and the probing evals rely on that).
"""

from __future__ import annotations

import random
import re
import string

from saeguard.errors import ConfigError

TYPO_KINDS = ("swap", "drop", "insert", "replace")
_WORD = re.compile(r"[^\W\d_]{2,}")  # words of two or more letters, any script


def add_typos(text: str, rate: float, seed: int = 0) -> str:
    """Corrupt a fraction ``rate`` of the words (two letters or more) with one typo each.

    The typo kind (swap two adjacent letters, drop, insert or replace a letter) and its place
    are drawn from a generator seeded by ``seed`` and the text, so the same call gives the same
    output. Words shorter than two letters, digits and punctuation are never touched.
    """
    if not 0 <= rate <= 1:
        raise ConfigError(f"typo rate must lie in [0, 1], got {rate}")
    words = list(_WORD.finditer(text))
    if not words or rate == 0:
        return text
    rng = random.Random(f"{seed}\x00{text}")
    n_typos = round(rate * len(words))
    chosen = sorted(rng.sample(range(len(words)), n_typos))
    pieces, last = [], 0
    for index in chosen:
        match = words[index]
        pieces.append(text[last : match.start()])
        pieces.append(_typo(match.group(), rng))
        last = match.end()
    pieces.append(text[last:])
    return "".join(pieces)


def _typo(word: str, rng: random.Random) -> str:
    kind = rng.choice(TYPO_KINDS)
    letters = string.ascii_uppercase if word.isupper() else string.ascii_lowercase
    if kind == "swap":
        i = rng.randrange(len(word) - 1)
        if word[i] != word[i + 1]:
            return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        kind = "replace"  # swapping equal letters would change nothing
    if kind == "drop":
        i = rng.randrange(len(word))
        return word[:i] + word[i + 1 :]
    if kind == "insert":
        i = rng.randrange(len(word) + 1)
        return word[:i] + rng.choice(letters) + word[i:]
    i = rng.randrange(len(word))
    replacement = rng.choice([c for c in letters if c != word[i].lower() and c != word[i]])
    return word[:i] + replacement + word[i + 1 :]


def parse_shift(spec: str) -> tuple[str, float]:
    """``typos:0.2`` -> ("typos", 0.2). Raises a clear error for anything else."""
    name, _, value = spec.partition(":")
    if name != "typos":
        raise ConfigError(f"unknown shift {spec!r}; use typos:RATE, e.g. typos:0.2")
    try:
        rate = float(value)
    except ValueError:
        raise ConfigError(f"shift {spec!r} needs a rate, e.g. typos:0.2") from None
    if not 0 < rate <= 1:
        raise ConfigError(f"typo rate must lie in (0, 1], got {rate}")
    return name, rate


def wrap_in_template(question: str, template: str) -> str:
    """Place a question after a jailbreak template (the way DAN prompts are used in the wild)."""
    return f"{template.rstrip()}\n\n{question.strip()}"
