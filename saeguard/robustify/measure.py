"""Before/after measurements of a robustified model, on the same held-out texts and seeds.

One :func:`measure` call reads a set of held-out ID texts and their perturbed copies through the
model (base or adapted) once, with the full forward pass, and keeps per text:

- the monitor's SAE scores (``fallacious_count``, ``fallacious_mass``, ``recon_error``,
  ``energy``) against the *base* model's ID statistics, and whether the calibrated flag fires;
- ``nll``: the mean next-token loss over the text's own tokens (log of the reader's perplexity);
- ``correct``: whether a topic probe trained on clean *base-model* activations (mean-pooled at
  the hook) names the text's topic. It measures whether the downstream representation survives
  the shift; the probe never changes between before and after.

A harder downstream check than the topic probe (which typos barely hurt): each held-out text is
cut into a prefix of :data:`PREFIX_WORDS` words and the :data:`CONTINUATION_WORDS` words that
follow; the model predicts the **clean** continuation after the **perturbed** prefix, and after
the clean prefix as a control (the same continuation tokens, so the two are paired exactly).
A model whose reading of typo'd text is damaged predicts what follows it worse.

:func:`compare` turns two such snapshots into before/after/difference with paired bootstrap
intervals (the same texts are resampled for both sides, and a clean text with its perturbed copy).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from saeguard.activations.reader import ReadFailure, run_contexts
from saeguard.data.corpora import load_corpus
from saeguard.data.perturb import add_typos, parse_shift
from saeguard.data.splits import Document, select_split
from saeguard.data.tokenize import tokenize_documents
from saeguard.errors import ConfigError, CorpusError
from saeguard.evals.datasets import sample_per_class
from saeguard.ood.metrics import BOOTSTRAP_RESAMPLES, rank_auroc
from saeguard.ood.monitor import Monitor

if TYPE_CHECKING:  # scikit-learn loads lazily: the CLI starts without it
    from sklearn.pipeline import Pipeline

MONITOR_SCORES: tuple[str, ...] = ("fallacious_count", "fallacious_mass", "recon_error", "energy")
MEASUREMENT_VERSION = 2
"""Bumped when :func:`measure` keeps new quantities (2: the continuation check), so measurements
saved by an older version are taken again rather than compared with new ones."""
PREFIX_WORDS = 48
"""Words of a held-out text read before the continuation (perturbed, or clean as the control)."""
CONTINUATION_WORDS = 24
"""Clean words whose tokens the model predicts after the prefix."""
CONTINUATION_BATCH = 8
"""Prefix + continuation sequences per forward pass."""


@dataclass
class Continuations:
    """Held-out texts cut into a prefix (clean, and perturbed) and the clean words after it."""

    clean_prefix: list[str]
    perturbed_prefix: list[str]
    continuation: list[str]


@dataclass
class HeldOutPairs:
    """Labelled held-out ID texts and their perturbed copies (same order)."""

    clean: list[str]
    perturbed: list[str]
    labels: list[str]
    other: list[str] = field(default_factory=list)
    """Clean texts of another corpus: capability beyond the corpus the adapter is tuned on."""
    continuations: Continuations | None = None
    """The texts long enough to cut into prefix + continuation (the harder downstream check)."""


def typo_rate(shift: str) -> float:
    """The rate of a ``typos:RATE`` shift, the only paired shift (a clean counterpart to stay
    consistent with)."""
    kind, rate = parse_shift(shift)
    if kind != "typos":
        raise ConfigError(
            f"--shift {shift!r} has no clean counterpart to stay consistent with; robustify "
            "supports typos:RATE (e.g. typos:0.2)"
        )
    return rate


def perturb(texts: Sequence[str], shift: str, seed: int) -> list[str]:
    """The perturbed copy of each text; only paired shifts (``typos:RATE``) have one."""
    rate = typo_rate(shift)
    return [add_typos(t, rate, seed=hash_seed(seed, i)) for i, t in enumerate(texts)]


def cut_continuations(texts: Sequence[str], rate: float, seed: int) -> Continuations:
    """Prefix / continuation pairs of every text with at least ``PREFIX_WORDS +
    CONTINUATION_WORDS`` words; the prefix gets typos at ``rate`` with its own seed (not the
    whole text's)."""
    clean, perturbed, continuation = [], [], []
    for i, text in enumerate(texts):
        words = text.split()
        if len(words) < PREFIX_WORDS + CONTINUATION_WORDS:
            continue
        prefix = " ".join(words[:PREFIX_WORDS])
        clean.append(prefix)
        perturbed.append(add_typos(prefix, rate, seed=hash_seed(seed + 1, i)))
        continuation.append(" ".join(words[PREFIX_WORDS : PREFIX_WORDS + CONTINUATION_WORDS]))
    return Continuations(clean, perturbed, continuation)


def continuation_scores(
    monitor: Monitor, prefixes: Sequence[str], continuations: Sequence[str]
) -> tuple[list[float], list[float]]:
    """Per text: top-1 next-token accuracy and mean loss (nats) of the model on the
    continuation's tokens after its prefix. The continuation is tokenised on its own, so the
    targets are the same tokens whatever the prefix; a prefix too long for the context loses its
    start (the words next to the continuation stay)."""
    loaded = monitor.loaded
    reader = monitor.reader
    start = [reader.spec.start_id] if reader.spec.start_id is not None else []
    room = monitor.ctx_len - len(start)
    sequences: list[list[int]] = []
    firsts: list[int] = []  # index of each sequence's first continuation token
    pre_ids = tokenize_documents(loaded.tokenizer, prefixes)
    cont_ids = tokenize_documents(loaded.tokenizer, [" " + c for c in continuations])
    for pre, cont in zip(pre_ids, cont_ids, strict=True):
        cont = cont[: room // 2]
        pre = pre[max(0, len(pre) - (room - len(cont))) :]
        sequences.append(start + pre + cont)
        firsts.append(len(start) + len(pre))
    accuracy = [0.0] * len(sequences)
    loss = [0.0] * len(sequences)
    with torch.inference_mode():
        results = run_contexts(loaded, reader.hook, reader.rules, sequences,
                               batch_size=CONTINUATION_BATCH, with_lm=True)  # fmt: skip
        for res in results:
            assert res.logits is not None  # with_lm=True
            seq, first = sequences[res.index], firsts[res.index]
            targets = torch.tensor(seq[first:], device=res.logits.device)
            logp = torch.log_softmax(res.logits[first - 1 : len(seq) - 1].float(), dim=-1)
            accuracy[res.index] = float((logp.argmax(-1) == targets).float().mean())
            loss[res.index] = float(-logp.gather(-1, targets[:, None]).mean())
    return accuracy, loss


def hash_seed(seed: int, index: int) -> int:
    """A distinct, reproducible typo seed per text (Random's string seeding is stable)."""
    return random.Random(f"{seed}:{index}").getrandbits(31)


def labelled_split(corpus: str, split: str, per_class: int, seed: int) -> list[Document]:
    """At most ``per_class`` labelled documents per topic from one split (seeded)."""
    docs = [d for d in select_split(list(load_corpus(corpus).documents), split, seed) if d.text]
    chosen = sample_per_class(docs, per_class, seed)
    labels = {d.label for d in chosen}
    if len(labels) < 2:
        raise CorpusError(
            f"the {split} split of {corpus!r} has {len(labels)} topic label(s); the downstream "
            "probe needs a labelled corpus with at least two topics (wiki-en has eleven)"
        )
    return chosen


def held_out_pairs(
    corpus: str, shift: str, per_class: int, seed: int, other_corpus: str = "", other_n: int = 0
) -> HeldOutPairs:
    """Test-split texts (never trained on, never used to calibrate) with perturbed copies, and
    ``other_n`` texts of ``other_corpus`` (a seeded sample)."""
    docs = labelled_split(corpus, "test", per_class, seed)
    clean = [d.text for d in docs]
    other: list[str] = []
    if other_corpus and other_n > 0:
        pool = [d.text for d in load_corpus(other_corpus).documents if d.text.strip()]
        random.Random(f"{seed}:{other_corpus}").shuffle(pool)
        other = pool[:other_n]
    return HeldOutPairs(
        clean, perturb(clean, shift, seed), [str(d.label) for d in docs], other,
        cut_continuations(clean, typo_rate(shift), seed),
    )  # fmt: skip


def pooled_activations(
    monitor: Monitor, texts: Sequence[str], max_windows: int, progress: str | None = None
) -> np.ndarray:
    """Mean-pooled hook activations [n, d] of each text (kept tokens only)."""
    rows = []
    for i, item in monitor.reader.read(texts, max_windows=max_windows, progress=progress):
        if isinstance(item, ReadFailure):
            raise CorpusError(f"text {i} cannot be read: {item.message}")
        rows.append(item.acts.mean(0).numpy())
    return np.stack(rows).astype(np.float64)


def fit_topic_probe(x: np.ndarray, labels: Sequence[str], seed: int) -> Pipeline:
    """Multinomial logistic regression on standardised pooled activations (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
    probe.set_params(logisticregression__random_state=seed)
    probe.fit(x, list(labels))
    return probe


def measure(
    monitor: Monitor,
    pairs: HeldOutPairs,
    probe: Pipeline,
    max_windows: int,
    tag: str = "",
) -> dict[str, dict[str, list[float]]]:
    """Per-text values for the clean and the perturbed texts: {side: {quantity: [values]}}."""
    flag_score = monitor.cfg.flag_score
    threshold = monitor.thresholds.get(flag_score)
    out: dict[str, dict[str, list[float]]] = {}
    sides = [("clean", pairs.clean), ("perturbed", pairs.perturbed)]
    sides += [("other", pairs.other)] if pairs.other else []
    for side, texts in sides:
        items = []
        for i, item in monitor.reader.read(
            texts, with_lm=True, max_windows=max_windows, progress=f"{tag} {side}".strip()
        ):
            if isinstance(item, ReadFailure):
                raise CorpusError(f"{side} text {i} cannot be read: {item.message}")
            items.append(item)
        analyses = []
        for start in range(0, len(items), 64):
            analyses += monitor.analyse(items[start : start + 64], with_lm=True)
        values: dict[str, list[float]] = {
            s: [a.scores[s] for a in analyses] for s in MONITOR_SCORES
        }
        values["nll"] = [math.log(max(a.scores["perplexity"], 1e-12)) for a in analyses]
        if threshold is not None:
            values["flagged"] = [float(a.scores[flag_score] > threshold) for a in analyses]
        if side != "other":  # the other corpus has no topic labels of this corpus
            pooled = np.stack([it.acts.mean(0).numpy() for it in items]).astype(np.float64)
            predicted = probe.predict(pooled)
            values["correct"] = [
                float(p == y) for p, y in zip(predicted, pairs.labels, strict=True)
            ]
        out[side] = values
    cut = pairs.continuations
    if cut is not None and cut.continuation:
        accuracy, loss = continuation_scores(monitor, cut.perturbed_prefix, cut.continuation)
        accuracy_clean, loss_clean = continuation_scores(
            monitor, cut.clean_prefix, cut.continuation
        )
        out["continuation"] = {
            "nll": loss,
            "accuracy": accuracy,
            "nll_clean_prefix": loss_clean,
            "accuracy_clean_prefix": accuracy_clean,
        }
    return out


# --- comparison ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Quantity:
    """One before/after line of the report."""

    key: str
    side: str
    source: str
    """Per-text values it is computed from ("auroc:SCORE" compares clean with perturbed)."""
    label: str
    better: str
    """"lower" or "higher": which direction the robustification aims for (or "none")."""
    relative: bool = True
    """Report after / before - 1 (only for quantities that are never negative)."""


QUANTITIES: tuple[Quantity, ...] = (
    Quantity("fallacious_count_perturbed", "perturbed", "fallacious_count",
             "fallacious latents per token, perturbed text", "lower"),
    Quantity("fallacious_count_clean", "clean", "fallacious_count",
             "fallacious latents per token, clean text (control)", "lower"),
    Quantity("fallacious_mass_perturbed", "perturbed", "fallacious_mass",
             "fallacious share of latent activation, perturbed text", "lower"),
    Quantity("energy_perturbed", "perturbed", "energy", "energy score, perturbed text", "lower",
             relative=False),
    Quantity("flag_rate_perturbed", "perturbed", "flagged",
             "share of perturbed texts the calibrated monitor flags", "lower"),
    Quantity("flag_rate_clean", "clean", "flagged",
             "share of clean texts flagged (false positives)", "lower"),
    Quantity("auroc_energy", "both", "auroc:energy",
             "OOD AUROC of energy, clean vs perturbed", "lower"),
    Quantity("auroc_fallacious_count", "both", "auroc:fallacious_count",
             "OOD AUROC of the fallacious count, clean vs perturbed", "lower"),
    Quantity("nll_clean", "clean", "nll", "next-token loss on clean ID text (nats)", "lower"),
    Quantity("nll_perturbed", "perturbed", "nll", "next-token loss on perturbed text (nats)",
             "lower"),
    Quantity("nll_other", "other", "nll",
             "next-token loss on clean text of another corpus (nats)", "lower"),
    Quantity("probe_accuracy_perturbed", "perturbed", "correct",
             "topic-probe accuracy on perturbed text", "higher"),
    Quantity("probe_accuracy_clean", "clean", "correct", "topic-probe accuracy on clean text",
             "higher"),
    Quantity("continuation_accuracy_perturbed", "continuation", "accuracy",
             "next-token accuracy on a clean continuation after a perturbed prefix", "higher"),
    Quantity("continuation_accuracy_clean", "continuation", "accuracy_clean_prefix",
             "next-token accuracy on the same continuation after the clean prefix", "higher"),
    Quantity("continuation_nll_perturbed", "continuation", "nll",
             "next-token loss on a clean continuation after a perturbed prefix (nats)", "lower"),
    Quantity("continuation_nll_clean", "continuation", "nll_clean_prefix",
             "next-token loss on the same continuation after the clean prefix (nats)", "lower"),
)  # fmt: skip


def _statistic(snapshot: dict[str, dict[str, np.ndarray]], q: Quantity, idx: np.ndarray) -> Any:
    """The quantity on the texts ``idx`` ([R, n] resamples or [n]); vectorised over resamples."""
    if q.source.startswith("auroc:"):
        score = q.source.split(":", 1)[1]
        neg, pos = snapshot["clean"][score][idx], snapshot["perturbed"][score][idx]
        return rank_auroc(np.atleast_2d(neg), np.atleast_2d(pos))
    return snapshot[q.side][q.source][idx].mean(axis=-1)


def compare(
    before: dict[str, dict[str, list[float]]],
    after: dict[str, dict[str, list[float]]],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Before, after and after - before of every quantity, with paired bootstrap 95% intervals
    (texts resampled jointly for both sides; each clean text stays with its perturbed copy)."""
    b = {s: {k: np.asarray(v, dtype=np.float64) for k, v in d.items()} for s, d in before.items()}
    a = {s: {k: np.asarray(v, dtype=np.float64) for k, v in d.items()} for s, d in after.items()}
    sizes = {side: len(values["nll"]) for side, values in b.items()}
    same_sets = set(a) == set(b) and sizes["clean"] == sizes["perturbed"]
    if not same_sets or any(
        len(v) != sizes[side] for snap in (a, b) for side, d in snap.items() for v in d.values()
    ):
        raise ConfigError("before and after were measured on different text sets")
    # One resampling per text set: a clean text and its perturbed copy are drawn together.
    rng = np.random.default_rng(seed)
    draws = {n: rng.integers(0, n, (resamples, n)) for n in sorted(set(sizes.values()))}
    out: dict[str, dict[str, Any]] = {}
    for q in QUANTITIES:
        source = q.source.split(":", 1)[1] if q.source.startswith("auroc:") else q.source
        side = "clean" if q.side == "both" else q.side
        if side not in b or source not in b[side] or source not in a[side]:
            continue  # e.g. no flag without a calibrated monitor, no other corpus
        n = sizes[side]
        idx, every = draws[n], np.arange(n)
        value_b = float(np.ravel(_statistic(b, q, every))[0])
        value_a = float(np.ravel(_statistic(a, q, every))[0])
        boot_b, boot_a = _statistic(b, q, idx), _statistic(a, q, idx)
        entry: dict[str, Any] = {
            "label": q.label,
            "better": q.better,
            "before": value_b,
            "before_ci95": _interval(boot_b),
            "after": value_a,
            "after_ci95": _interval(boot_a),
            "difference": value_a - value_b,
            "difference_ci95": _interval(boot_a - boot_b),
            "n_texts": n,
        }
        if q.relative and abs(value_b) > 1e-12 and not q.source.startswith("auroc:"):
            entry["relative_change"] = value_a / value_b - 1
            safe = np.where(np.abs(boot_b) > 1e-12, boot_b, np.nan)
            entry["relative_change_ci95"] = _interval(boot_a / safe - 1)
        out[q.key] = entry
    return out


def _interval(samples: np.ndarray) -> list[float]:
    finite = samples[np.isfinite(samples)]
    if not len(finite):
        return [float("nan"), float("nan")]
    return [float(v) for v in np.percentile(finite, [2.5, 97.5])]
