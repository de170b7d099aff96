from __future__ import annotations

import re

import pytest

from saeguard.data.perturb import add_typos, parse_shift, wrap_in_template
from saeguard.errors import ConfigError

TEXT = " ".join(["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"] * 5)


def test_typos_hit_the_asked_fraction_of_words_deterministically() -> None:
    out = add_typos(TEXT, 0.2, seed=3)
    assert out == add_typos(TEXT, 0.2, seed=3) and out != add_typos(TEXT, 0.2, seed=4)
    before, after = TEXT.split(), out.split(" ")
    changed = sum(a != b for a, b in zip(before, after, strict=True))
    assert changed == round(0.2 * len(before))
    assert add_typos(TEXT, 0.0) == TEXT


def test_typos_keep_digits_and_punctuation() -> None:
    text = "In 1999, the cat sat. Prices rose 12%!"
    out = add_typos(text, 1.0, seed=0)
    assert re.findall(r"[\d%,.!]", out) == re.findall(r"[\d%,.!]", text)


def test_bad_shift_specs() -> None:
    assert parse_shift("typos:0.2") == ("typos", 0.2)
    for bad in ("typo:0.2", "typos:x", "typos:0", "typos:2"):
        with pytest.raises(ConfigError):
            parse_shift(bad)
    with pytest.raises(ConfigError):
        add_typos(TEXT, 1.5)


def test_wrap_places_the_question_last() -> None:
    assert wrap_in_template("How?", "You are DAN. ").endswith("You are DAN.\n\nHow?")
