"""The tasks of the probing-regimes study: labelled sets, their one-vs-rest binary tasks, the
shifted test sets of the covariate-shift regime, and their pooled features.

Sets (each from held-out documents where an SAE could have trained on the corpus):

- ``wiki-en``, ``bbc``: topics. The ``classes_per_set`` largest classes (by documents available;
  ties by name) are the positives, one task each; ``per_class`` documents of each, plus
  ``per_class`` documents of the other classes (taken in turn), which serve only as negatives.
- ``language``: en / es / fr Wikipedia leads, chosen the same way (the English texts are the
  wiki-en set's own, so they are read once).
- ``jailbreak``: harmful questions, plain vs wrapped in a DAN-style template
  (:func:`~saeguard.data.perturb.wrap_in_template`); one task, positive = wrapped. A third of
  the templates (at least one) are kept out of every training set for the shift below.
- ``data:NAME``: a user's labelled .jsonl/.csv file; two classes give one task (the positive is
  the rarer class, the later name on a tie), more give one per largest class.

Every set is cut into a training pool and a test side by group (a question and its wrapped form
stay together; repeated texts too). A task's test set is balanced: every test positive and as
many seeded test negatives (or fewer positives when negatives are fewer).

Covariate shift, per set; the training side never changes, only the test texts:

- ``typos:RATE`` (every set): the task's very test texts, with RATE of their words given a
  seeded typo (:func:`~saeguard.data.perturb.add_typos`); labels carry over.
- ``wiki-es``, ``wiki-fr`` (wiki-en topics): Spanish / French documents of the language set whose
  topic labels map to the English classes (a topic the language lacks is left out).
- ``unseen-templates`` (jailbreak): the test questions wrapped in the held-out templates instead.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from saeguard.data.corpora import load_corpus
from saeguard.data.perturb import add_typos, wrap_in_template
from saeguard.data.splits import Document
from saeguard.errors import ConfigError, CorpusError
from saeguard.evals.datasets import LabelledSet, held_out_documents, labelled_file
from saeguard.evals.probing import group_split
from saeguard.evals.probing_regimes import ProbeTask, stable_seed

log = logging.getLogger(__name__)

SETS = ("wiki-en", "bbc", "language", "jailbreak")
LANGUAGES = {"en": "wiki-en", "es": "wiki-es", "fr": "wiki-fr"}
UNSEEN_TEMPLATES = "unseen-templates"


@dataclass
class ShiftedTest:
    """Shifted test texts of a set."""

    name: str
    note: str
    texts: list[str]
    labels: list[str]
    paired: bool
    """True: ``texts[i]`` is the shifted form of the set's i-th test text (labels carry over);
    False: other documents with labels of their own (only classes they share are tested)."""
    truncate: str = "head"


@dataclass
class SourceSet:
    """A labelled set, the classes probed one-vs-rest, its test side and its shifted tests."""

    data: LabelledSet
    classes: list[str]
    test: np.ndarray
    """[len(texts)] bool: the test side (by group)."""
    shifts: list[ShiftedTest] = field(default_factory=list)
    note: str = ""

    @property
    def name(self) -> str:
        return self.data.name

    def test_texts(self) -> list[str]:
        return [t for t, m in zip(self.data.texts, self.test, strict=True) if m]


def largest_classes(counts: Counter[str], n: int) -> list[str]:
    """The ``n`` classes with the most texts (ties by name)."""
    return sorted(counts, key=lambda c: (-counts[c], c))[:n]


def _pool(
    docs: Sequence[Document], chosen: list[str], per_class: int, seed: int, tag: str
) -> list[Document]:
    """``per_class`` seeded documents of each chosen class, then ``per_class`` of the others
    taken in turn (negatives only)."""
    by_label: dict[str, list[Document]] = {}
    for doc in docs:
        if doc.label:
            by_label.setdefault(doc.label, []).append(doc)
    for label, items in by_label.items():
        random.Random(f"{seed}:{tag}:{label}").shuffle(items)
    out = [d for c in chosen for d in by_label.get(c, [])[:per_class]]
    others = [by_label[c] for c in sorted(by_label) if c not in chosen]
    rest: list[Document] = []
    for i in range(max((len(o) for o in others), default=0)):
        rest += [o[i] for o in others if i < len(o)]
    return out + rest[:per_class]


def topic_documents(
    corpus: str, per_class: int, classes: int, seed: int
) -> tuple[list[Document], list[str]]:
    """(pool documents, chosen classes) of a topic corpus."""
    docs = (
        held_out_documents(corpus, seed)
        if corpus.startswith("wiki")
        else list(load_corpus(corpus).documents)
    )
    counts = Counter(d.label for d in docs if d.label)
    chosen = largest_classes(counts, classes)
    return _pool(docs, chosen, per_class, seed, corpus), chosen


def _source(
    data: LabelledSet, classes: list[str], test_fraction: float, seed: int, note: str
) -> SourceSet:
    return SourceSet(data, classes, group_split(data.groups, test_fraction, seed), note=note)


def _typos(source: SourceSet, rate: float, seed: int) -> ShiftedTest:
    return ShiftedTest(
        f"typos:{rate:g}",
        f"the same test texts with {rate:.0%} of their words given a seeded typo",
        [add_typos(t, rate, seed) for t in source.test_texts()],
        [lab for lab, m in zip(source.data.labels, source.test, strict=True) if m],
        paired=True,
        truncate=source.data.truncate,
    )


def build_sources(
    sets: Sequence[str],
    files: Sequence[str],
    per_class: int,
    classes: int,
    test_fraction: float,
    typo_rate: float,
    seed: int,
) -> list[SourceSet]:
    """Every requested set with its tasks' classes, test side and shifted tests (user files are
    read, and refused in one line, first)."""
    unknown = set(sets) - set(SETS)
    if unknown:
        raise ConfigError(
            f"unknown probing sets {sorted(unknown)}; use {', '.join(SETS)} "
            "(and --data FILE for your own)"
        )
    user = [labelled_file(path) for path in files]
    out: list[SourceSet] = []
    language = None
    if "language" in sets or "wiki-en" in sets:
        wiki_docs, wiki_classes = topic_documents("wiki-en", per_class, classes, seed)
        language = language_documents(wiki_docs, per_class, classes, seed)
    if "wiki-en" in sets:
        data = LabelledSet(
            "wiki-en", [d.text for d in wiki_docs], [str(d.label) for d in wiki_docs]
        )
        source = _source(
            data,
            wiki_classes,
            test_fraction,
            seed,
            f"topics; positives: the {len(wiki_classes)} largest of the held-out wiki-en classes",
        )
        source.shifts.append(_typos(source, typo_rate, seed))
        assert language is not None
        for lang in ("es", "fr"):
            pairs = [
                (t, str(topic))
                for t, lab, topic in zip(*language[:3], strict=True)
                if lab == lang and topic
            ]
            source.shifts.append(
                ShiftedTest(
                    LANGUAGES[lang],
                    f"{LANGUAGES[lang]} documents (Wikipedia leads), topic labels "
                    "mapped to the English classes",
                    [t for t, _ in pairs],
                    [c for _, c in pairs],
                    paired=False,
                )
            )
        out.append(source)
    if "bbc" in sets:
        docs, chosen = topic_documents("bbc", per_class, classes, seed)
        data = LabelledSet("bbc", [d.text for d in docs], [str(d.label) for d in docs])
        source = _source(
            data,
            chosen,
            test_fraction,
            seed,
            f"news topics; positives: the {len(chosen)} largest BBC classes",
        )
        source.shifts.append(_typos(source, typo_rate, seed))
        out.append(source)
    if "language" in sets:
        assert language is not None
        texts, labels, _, chosen = language
        source = _source(
            LabelledSet("language", texts, labels),
            chosen,
            test_fraction,
            seed,
            "language identification (en/es/fr Wikipedia leads)",
        )
        source.shifts.append(_typos(source, typo_rate, seed))
        out.append(source)
    if "jailbreak" in sets:
        out.append(jailbreak_source(per_class, test_fraction, typo_rate, seed))
    for data in user:
        counts = Counter(data.labels)
        if len(counts) == 2:  # the rarer class, the later name on a tie ("1", "true")
            chosen = [sorted(counts, key=lambda c: (-counts[c], c))[-1]]
        else:
            chosen = largest_classes(counts, classes)
        source = _source(data, chosen, test_fraction, seed, "a user's labelled file")
        source.shifts.append(_typos(source, typo_rate, seed))
        out.append(source)
    return out


def language_documents(
    wiki_docs: Sequence[Document], per_class: int, classes: int, seed: int
) -> tuple[list[str], list[str], list[str | None], list[str]]:
    """(texts, language labels, topic labels, chosen languages) of the language set: the
    English texts are the wiki-en topic set's own (in a seeded order), Spanish and French ones
    held-out documents; the chosen languages are those with the most held-out documents."""
    available = {
        lang: held_out_documents(corpus, seed) for lang, corpus in LANGUAGES.items() if lang != "en"
    }
    counts = Counter({lang: len(docs) for lang, docs in available.items()})
    counts["en"] = len(held_out_documents("wiki-en", seed))
    chosen = largest_classes(counts, classes)
    english = list(wiki_docs)
    random.Random(f"{seed}:language:en").shuffle(english)
    pools: dict[str, list[Document]] = {"en": english}
    for lang, docs in available.items():
        docs = list(docs)
        random.Random(f"{seed}:language:{lang}").shuffle(docs)
        pools[lang] = docs
    taken = {lang: per_class for lang in chosen}
    others = [lang for lang in sorted(LANGUAGES) if lang not in chosen]
    for i in range(per_class if others else 0):  # the rest, in turn
        other = others[i % len(others)]
        taken[other] = taken.get(other, 0) + 1
    texts, labels, topics = [], [], []
    for lang in sorted(taken):
        for doc in pools[lang][: taken[lang]]:
            texts.append(doc.text)
            labels.append(lang)
            topics.append(doc.label)
    return texts, labels, topics, chosen


def jailbreak_source(
    per_class: int, test_fraction: float, typo_rate: float, seed: int
) -> SourceSet:
    """Plain vs wrapped harmful questions (grouped by question); a third of the templates are
    held out of training for the unseen-templates shift."""
    questions = [d.text for d in load_corpus("harmful-questions").documents]
    templates = sorted(d.text for d in load_corpus("dan-templates").documents)
    rng = random.Random(f"{seed}:jailbreak")
    rng.shuffle(questions)
    unseen = sorted(rng.sample(range(len(templates)), max(1, round(len(templates) / 3))))
    seen = [t for i, t in enumerate(templates) if i not in unseen]
    texts, labels, groups = [], [], []
    for i, question in enumerate(questions[:per_class]):
        texts += [question, wrap_in_template(question, rng.choice(seen))]
        labels += ["plain", "wrapped"]
        groups += [i, i]
    data = LabelledSet("jailbreak", texts, labels, groups, truncate="tail")
    source = _source(
        data,
        ["wrapped"],
        test_fraction,
        seed,
        f"harmful questions plain vs wrapped in a jailbreak template ({len(seen)} "
        f"templates for training, {len(unseen)} held out)",
    )
    source.shifts.append(_typos(source, typo_rate, seed))
    held = random.Random(f"{seed}:jailbreak:unseen")
    rewrapped = []
    for position in np.flatnonzero(source.test):
        if labels[position] == "wrapped":
            question = questions[groups[position]]
            rewrapped.append(wrap_in_template(question, templates[held.choice(unseen)]))
        else:
            rewrapped.append(texts[position])
    source.shifts.append(
        ShiftedTest(
            UNSEEN_TEMPLATES,
            f"the test questions wrapped in the {len(unseen)} held-out templates "
            "(plain questions unchanged)",
            rewrapped,
            [lab for lab, m in zip(labels, source.test, strict=True) if m],
            paired=True,
            truncate="tail",
        )
    )
    return source


# --- the feature table -------------------------------------------------------------------------
def text_key(text: str, truncate: str) -> str:
    return hashlib.sha256(f"{truncate}\x00{text}".encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class FeatureTable:
    """Every distinct (text, truncation) the study reads, each once, in a fixed order."""

    texts: list[str] = field(default_factory=list)
    truncates: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    row_of: dict[str, int] = field(default_factory=dict)

    def add(self, text: str, truncate: str) -> int:
        key = text_key(text, truncate)
        if key not in self.row_of:
            self.row_of[key] = len(self.texts)
            self.texts.append(text)
            self.truncates.append(truncate)
            self.keys.append(key)
        return self.row_of[key]

    def row(self, text: str, truncate: str) -> int:
        """The row of a text already in the table."""
        return self.row_of[text_key(text, truncate)]

    def __len__(self) -> int:
        return len(self.texts)


def feature_table(sources: Sequence[SourceSet]) -> FeatureTable:
    table = FeatureTable()
    for source in sources:
        for text in source.data.texts:
            table.add(text, source.data.truncate)
        for shift in source.shifts:
            for text in shift.texts:
                table.add(text, shift.truncate)
    return table


def make_tasks(
    sources: Sequence[SourceSet],
    table: FeatureTable,
    seed: int,
    min_test: int = 2,
    on_skip: Callable[[str], None] | None = None,
) -> list[ProbeTask]:
    """One binary task per chosen class of every set. A task whose test side lacks ``min_test``
    texts of either class is skipped (``on_skip`` gets why; a user's file is refused instead)."""
    tasks = []
    for source in sources:
        rows = np.array([table.row(t, source.data.truncate) for t in source.data.texts])
        test_positions = np.flatnonzero(source.test)
        labels_all = np.asarray(source.data.labels)
        for positive in source.classes:
            name = f"{source.name}:{positive}"
            y = labels_all == positive
            pos = test_positions[y[test_positions]]
            neg = test_positions[~y[test_positions]]
            pool = np.flatnonzero(~source.test)
            m = min(len(pos), len(neg))
            if m < min_test or min(y[pool].sum(), (~y[pool]).sum()) < 2:
                why = (
                    f"{name}: too few texts for a test side of {min_test} per class and a "
                    "training pool of 2 per class"
                )
                if source.name.startswith("data:"):
                    raise CorpusError(f"--data {source.name[5:]}: {why}; add texts")
                (on_skip or log.warning)(why + "; task skipped")
                continue
            rng = np.random.default_rng(stable_seed(seed, name, "test"))
            chosen = np.concatenate(
                [
                    np.sort(rng.choice(pos, m, replace=False)),
                    np.sort(rng.choice(neg, m, replace=False)),
                ]
            )
            task = ProbeTask(
                name, source.name, positive, rows[pool], y[pool], rows[chosen], y[chosen]
            )
            order = {int(p): i for i, p in enumerate(test_positions)}
            for shift in source.shifts:
                shifted = _shift_rows(shift, table, positive, chosen, order, m, seed, name)
                if shifted is None:
                    continue
                task.shifts[shift.name] = shifted
                task.shift_notes[shift.name] = shift.note
            tasks.append(task)
    return tasks


def _shift_rows(
    shift: ShiftedTest,
    table: FeatureTable,
    positive: str,
    chosen: np.ndarray,
    order: dict[int, int],
    m: int,
    seed: int,
    name: str,
) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows, labels) of a task's shifted test set: the shifted forms of its very test texts
    (paired), or a balanced draw of at most ``m`` per class of other documents."""
    if shift.paired:
        at = [order[int(p)] for p in chosen]
        rows = np.array([table.row(shift.texts[i], shift.truncate) for i in at])
        return rows, np.array([shift.labels[i] == positive for i in at])
    y = np.asarray(shift.labels) == positive
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    k = min(len(pos), len(neg), m)
    if k < 2:
        return None
    rng = np.random.default_rng(stable_seed(seed, name, shift.name))
    picked = np.concatenate(
        [np.sort(rng.choice(pos, k, replace=False)), np.sort(rng.choice(neg, k, replace=False))]
    )
    rows = np.array([table.row(shift.texts[i], shift.truncate) for i in picked])
    return rows, y[picked]


def task_fingerprint(task: ProbeTask, table: FeatureTable) -> str:
    """SHA-256 of what a task's results depend on: the texts and labels of its pool, test and
    shifted tests (not their row numbers, which follow the table's order)."""
    digest = hashlib.sha256(task.name.encode())
    parts: list[tuple[str, np.ndarray, np.ndarray]] = [
        ("pool", task.pool_rows, task.pool_labels),
        ("test", task.test_rows, task.test_labels),
        *[(f"shift:{n}", r, y) for n, (r, y) in task.shifts.items()],
    ]
    for tag, rows, labels in parts:
        digest.update(tag.encode())
        for row, label in zip(rows, labels, strict=True):
            digest.update(f"{table.keys[int(row)]}:{int(label)};".encode())
    return digest.hexdigest()


# --- features ----------------------------------------------------------------------------------
def pooled_features(
    subject: Any,
    texts: Sequence[str],
    truncates: Sequence[str],
    ctx_len: int,
    batch_size: int = 16,
    encode_tokens: int = 4096,
) -> dict[str, np.ndarray]:
    """{"raw": [n, d], "sae": [n, d_sae]} float32: each text read once through the activation
    reader (one context: its head, or its tail for ``truncate="tail"``; the SAE's exclusion
    rules), its kept activations mean-pooled, and its SAE latents (encoded in batches of about
    ``encode_tokens`` tokens) mean-pooled. ``subject`` is an
    :class:`~saeguard.activations.subject.EvalSubject`."""
    import torch

    from saeguard.activations.reader import kept_document_activations

    n = len(texts)
    raw = np.zeros((n, subject.sae.cfg.d_in), dtype=np.float32)
    sae = np.zeros((n, subject.sae.cfg.d_sae), dtype=np.float32)
    for mode in ("head", "tail"):
        idx = [i for i in range(n) if truncates[i] == mode]
        if not idx:
            continue
        acts = kept_document_activations(
            subject.loaded,
            subject.hook,
            [texts[i] for i in idx],
            subject.source.rules,
            ctx_len,
            mode,
            batch_size,
        )
        for position, a in zip(idx, acts, strict=True):
            raw[position] = a.mean(0).numpy()
        start = 0
        while start < len(acts):  # SAE encodings in batches of about encode_tokens tokens
            stop, tokens = start, 0
            while stop < len(acts) and (stop == start or tokens < encode_tokens):
                tokens += acts[stop].shape[0]
                stop += 1
            part = acts[start:stop]
            latents = subject.encode(torch.cat(part)).float().cpu()
            lengths = torch.tensor([a.shape[0] for a in part])
            segment = torch.repeat_interleave(torch.arange(len(part)), lengths)
            sums = torch.zeros(len(part), latents.shape[1]).index_add_(0, segment, latents)
            means = (sums / lengths[:, None]).numpy()
            for r, position in enumerate(idx[start:stop]):
                sae[position] = means[r]
            start = stop
    return {"raw": raw, "sae": sae}
