"""Labelled text sets for the probing evals, built from the registered corpora.

Documents come from the ``validation`` and ``test`` splits (never the ``train`` split an SAE is
trained on) except for corpora SAEs are not trained on (BBC, harmful questions). Sampling is
seeded and capped per class so that every set is balanced enough and its cost is bounded. A
user's labelled .jsonl/.csv file is read strictly by :func:`labelled_file` (`study probing --data`).
"""

from __future__ import annotations

import csv
import io
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saeguard.data.corpora import load_corpus
from saeguard.data.perturb import add_typos, wrap_in_template
from saeguard.data.splits import Document, held_out


@dataclass
class LabelledSet:
    """Texts with class labels; ``groups`` keep related texts on one side of a train/test cut."""

    name: str
    texts: list[str]
    labels: list[str]
    groups: list[int] = field(default_factory=list)
    truncate: str = "head"
    """Which end of a long text the context keeps ("tail" keeps a question at the end)."""

    def __post_init__(self) -> None:
        if not self.groups:
            self.groups = list(range(len(self.texts)))


def held_out_documents(corpus: str, seed: int = 0) -> list[Document]:
    return held_out(list(load_corpus(corpus).documents), seed)


def sample_per_class(
    docs: list[Document], per_class: int, seed: int, labels: set[str] | None = None
) -> list[Document]:
    """At most ``per_class`` labelled documents of each class, seeded, in a stable order."""
    by_label: dict[str, list[Document]] = {}
    for doc in docs:
        if doc.label is not None and (labels is None or doc.label in labels):
            by_label.setdefault(doc.label, []).append(doc)
    out = []
    for label in sorted(by_label):
        items = by_label[label]
        random.Random(f"{seed}:{label}").shuffle(items)
        out.extend(items[:per_class])
    return out


def topic_set(
    corpus: str, per_class: int, seed: int, labels: set[str] | None = None
) -> LabelledSet:
    source = (
        held_out_documents(corpus, seed)
        if corpus.startswith("wiki")
        else list(load_corpus(corpus).documents)
    )
    docs = sample_per_class(source, per_class, seed, labels)
    return LabelledSet(corpus, [d.text for d in docs], [str(d.label) for d in docs])


def language_set(per_class: int, seed: int) -> LabelledSet:
    texts, labels = [], []
    for lang in ("en", "es", "fr"):
        docs = held_out_documents(f"wiki-{lang}", seed)
        random.Random(f"{seed}:lang:{lang}").shuffle(docs)
        texts += [d.text for d in docs[:per_class]]
        labels += [lang] * min(per_class, len(docs))
    return LabelledSet("language", texts, labels)


def jailbreak_set(per_class: int, seed: int) -> LabelledSet:
    """The same harmful questions plain and inside a DAN-style template (grouped by question)."""
    questions = list(load_corpus("harmful-questions").documents)
    templates = [d.text for d in load_corpus("dan-templates").documents]
    rng = random.Random(f"{seed}:jailbreak")
    rng.shuffle(questions)
    texts, labels, groups = [], [], []
    for i, question in enumerate(questions[:per_class]):
        texts += [question.text, wrap_in_template(question.text, rng.choice(templates))]
        labels += ["plain", "wrapped"]
        groups += [i, i]
    return LabelledSet("jailbreak", texts, labels, groups, truncate="tail")


def with_typos(base: LabelledSet, rate: float, seed: int) -> LabelledSet:
    return LabelledSet(
        f"{base.name}+typos{rate:g}",
        [add_typos(t, rate, seed) for t in base.texts],
        list(base.labels),
        list(base.groups),
        base.truncate,
    )


def labelled_file(path: str, min_per_class: int = 8) -> LabelledSet:
    """A user's labelled ``.jsonl`` (objects with ``text`` and ``label``) or ``.csv`` (a header
    with ``text`` and ``label`` columns), read strictly: a missing file, another format, bytes
    that are not UTF-8, a record without a label, an empty text, a single class or a class with
    fewer than ``min_per_class`` texts is one :class:`CorpusError` line naming the file, the
    place and the fix. Texts that repeat share a group (they fall on one side of a split)."""
    import json

    from saeguard.errors import CorpusError

    source = Path(path).expanduser()
    if not source.is_file():
        raise CorpusError(
            f"--data {path}: no such file; pass a .jsonl or .csv file with text and label fields"
        )
    kind = source.suffix.lower()
    if kind not in (".jsonl", ".csv"):
        raise CorpusError(
            f"--data {path}: use a .jsonl file (one JSON object with text and "
            "label per line) or a .csv file with text and label columns"
        )
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise CorpusError(f"--data {path}: cannot read it ({exc.strerror or exc})") from exc
    try:
        content = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        where = data[: exc.start].count(b"\n") + 1
        raise CorpusError(
            f"--data {path} is not valid UTF-8 (line {where}, byte {exc.start}); "
            "re-save it as UTF-8"
        ) from exc
    records: list[tuple[int, Any, Any]] = []  # (line, text, label)
    if kind == ".jsonl":
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(
                    f"--data {path}: line {number} is not valid JSON ({exc.msg})"
                ) from exc
            if not isinstance(obj, dict) or "text" not in obj:
                raise CorpusError(
                    f"--data {path}: line {number} has no 'text' field; give "
                    "every line a text and a label"
                )
            if "label" not in obj:
                raise CorpusError(
                    f"--data {path}: line {number} has no 'label' field; give every text its class"
                )
            records.append((number, obj["text"], obj["label"]))
    else:
        reader = csv.DictReader(io.StringIO(content, newline=""))
        try:
            columns = reader.fieldnames or []
            if "text" not in columns or "label" not in columns:
                raise CorpusError(
                    f"--data {path} needs a header row with 'text' and 'label' "
                    f"columns (found: {', '.join(columns) or 'none'})"
                )
            for row in reader:
                records.append((reader.line_num, row.get("text"), row.get("label")))
        except csv.Error as exc:
            raise CorpusError(
                f"--data {path} is not a readable CSV file (line {reader.line_num}: {exc})"
            ) from exc
    texts, labels = [], []
    for number, text, label in records:
        if not isinstance(text, str) or not text.strip():
            raise CorpusError(
                f"--data {path}: line {number} has an empty text; remove the line or give it words"
            )
        if isinstance(label, bool):
            label = "true" if label else "false"
        if not isinstance(label, str | int | float) or not str(label).strip():
            raise CorpusError(
                f"--data {path}: line {number} has an empty or non-scalar label; "
                "give every text its class (a string or a number)"
            )
        texts.append(text.strip())
        labels.append(str(label).strip())
    if not texts:
        raise CorpusError(f"--data {path} holds no texts")
    counts = Counter(labels)
    if len(counts) < 2:
        raise CorpusError(
            f"--data {path} has a single class ({labels[0]!r}); a probe needs "
            "texts of at least two classes"
        )
    small = sorted((n, c) for c, n in counts.items() if n < min_per_class)
    if small:
        n, c = small[0]
        raise CorpusError(
            f"--data {path}: class {c!r} has {n} text(s); each class needs at "
            f"least {min_per_class} (to train, validate and test a probe)"
        )
    group_of: dict[str, int] = {}
    groups = [group_of.setdefault(t, len(group_of)) for t in texts]
    return LabelledSet(f"data:{source.stem}", texts, labels, groups)
