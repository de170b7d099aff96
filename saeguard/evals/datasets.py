"""Labelled text sets for the probing evals, built from the registered corpora.

Documents come from the ``validation`` and ``test`` splits (never the ``train`` split an SAE is
trained on) except for corpora SAEs are not trained on (BBC, harmful questions). Sampling is
seeded and capped per class so that every set is balanced enough and its cost is bounded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

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
