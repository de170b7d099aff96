"""Feature absorption on the first-letter task (SPEC §4, SAEBench style).

Prompts ``"{w1} has the first letter: W1\\n ... {word}"`` (in-context examples, then the word)
are run to the hook; the activation at the word's token is the input. A 26-way logistic probe on
those clean activations gives the ground truth. For each letter, the SAE's *main* latents are
chosen greedily by k-sparse probing (latents ranked by class-mean difference; k grows from 1 to
10 while test F1 improves by at least 0.03).

For each test word the probe classifies correctly (a true positive), P = <x, d> is the probe
projection of the activation (d the unit probe direction) and each latent's share is
``proj_i = f_i <W_dec,i, d>`` (activation x cosine for unit-norm decoder rows).
*Full absorption*: every main latent is off, P > 0, and the
latent with the largest share has cosine ≥ 0.025 with d and supplies ≥ 40% of P.
``mean_full_absorption`` is the rate of full absorption among true positives, averaged over
letters whose probe F1 > 0.6. ``absorption_fraction`` (partial absorption): the top three
non-main latents with cosine ≥ 0.1 and positive share are the absorbers; if they carry less than
40% of P, or the main latents already carry P, the word scores 0; if the main latents carry
nothing it scores 1; otherwise absorbed / (absorbed + main). Averaged the same way. (These are
the SAEBench definitions; the numbers are comparable in kind, not bit for bit.)

Each letter's details also say how far its true positives get through the definition:
``main_off`` (every main latent off and P > 0), ``main_off_aligned`` (and the top latent's
cosine reaches ``cos_threshold``), ``aligned_top_shares`` (those words' top-latent shares of P;
full absorption needs ``proj_threshold``) and ``main_density`` (the share of all test words on
which a main latent fires). docs/masking_study.md reads them to say why absorption is rare.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from saeguard.errors import ConfigError
from saeguard.evals.results import MetricResult, sampled_metric
from saeguard.sae.base import SparseAutoencoder

if TYPE_CHECKING:  # scikit-learn loads lazily: the CLI starts without it
    from sklearn.linear_model import LogisticRegression

VERSION = 3  # 2: projections f_i <W_dec,i, d>, balanced probe; 3: probe fitted centred
_WORD_TOKEN = re.compile(r"^ [a-z]{2,}$")


@dataclass(kw_only=True)
class AbsorptionConfig:
    """Settings of the feature-absorption metric."""

    words: int = 2000
    """Single-token vocabulary words to use (sampled, seeded)."""
    icl_examples: int = 3
    """In-context examples before each word."""
    test_fraction: float = 0.3
    """Fraction of words held out to score the probes."""
    max_main_latents: int = 10
    """Largest k tried when choosing a letter's main latents."""
    f1_step: float = 0.03
    """k grows while test F1 improves by at least this much."""
    min_probe_f1: float = 0.6
    """Letters whose probe F1 is at or below this are not averaged."""
    cos_threshold: float = 0.025
    """Minimum cosine between an absorbing latent's decoder row and the probe direction."""
    proj_threshold: float = 0.4
    """Share of the probe projection an absorbing latent (or the absorbers) must supply."""
    fraction_cos_threshold: float = 0.1
    """Minimum cosine of the latents counted by the partial absorption fraction."""
    max_absorbers: int = 3
    """Most non-main latents that may jointly absorb a letter (absorption fraction)."""
    probe_c: float = 10.0
    """Inverse L2 strength of the 26-way letter probe (classes are balanced by weight)."""
    seed: int = 0
    """Seed of word sampling, in-context examples and the train/test cut."""

    def __post_init__(self) -> None:
        if self.words < 52:
            raise ConfigError("--words must be at least 52 (two per letter) for a 26-way probe")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"--test-fraction must lie in (0, 1), got {self.test_fraction}")


def letter_of(word: str) -> int:
    return string.ascii_lowercase.index(word.strip()[0].lower())


@dataclass
class LetterProbe:
    """The 26-way ground-truth probe and the input frame it was fitted in."""

    model: LogisticRegression
    center: torch.Tensor
    """Mean training activation, subtracted before the fit."""
    scale: float
    """Median norm of the centred training activations, divided by before the fit."""

    def inputs(self, x: torch.Tensor) -> np.ndarray:
        return ((x - self.center) / self.scale).numpy()

    def predict(self, x: torch.Tensor) -> np.ndarray:
        return np.asarray(self.model.predict(self.inputs(x)))

    @property
    def classes_(self) -> np.ndarray:
        return np.asarray(self.model.classes_)

    @property
    def coef_(self) -> np.ndarray:
        """One weight row per letter: directions in the raw activation space (the frame is a
        shift and one scale factor, so directions are unchanged)."""
        return np.asarray(self.model.coef_)


def fit_letter_probe(x: torch.Tensor, y: np.ndarray, seed: int, c: float = 10.0) -> LetterProbe:
    """The 26-way ground-truth probe on raw activations ``x``, classes weighted so rare letters
    are not ignored. The inputs are centred and divided by one number, which keeps directions;
    centring matters where a few residual dimensions are huge and nearly constant (Gemma-3-270M:
    one dimension carries ~95% of the norm), which would otherwise shrink the letter directions
    ~300-fold against the regularisation (no letter reached F1 0.6 there; 15 of 25 do centred)."""
    from sklearn.linear_model import LogisticRegression

    x = x.float()
    center = x.mean(0)
    scale = float((x - center).norm(dim=-1).median().clamp_min(1e-12))
    probe = LetterProbe(
        LogisticRegression(C=c, max_iter=5000, class_weight="balanced", random_state=seed),
        center, scale,
    )  # fmt: skip
    probe.model.fit(probe.inputs(x), y)
    return probe


def choose_main_latents(
    f_train: np.ndarray,
    is_letter_train: np.ndarray,
    f_test: np.ndarray,
    is_letter_test: np.ndarray,
    cfg: AbsorptionConfig,
) -> tuple[list[int], float]:
    """Greedy k-sparse probing: (main latent ids, their probe's test F1)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    active_train = f_train != 0
    diff = f_train[is_letter_train].mean(0) - f_train[~is_letter_train].mean(0)
    # Only latents that fire on the letter's words can be its main latents.
    diff = np.where(active_train[is_letter_train].any(0), diff, -np.inf)
    ranked = np.argsort(-diff, kind="stable")
    best_f1, best_k = -1.0, 1
    for k in range(1, cfg.max_main_latents + 1):
        cols = ranked[:k]
        if not np.isfinite(diff[cols]).all():
            break
        probe = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced")
        probe.fit(f_train[:, cols], is_letter_train)
        f1 = float(f1_score(is_letter_test, probe.predict(f_test[:, cols]), zero_division=0))
        if k == 1:
            best_f1 = f1
        elif f1 - best_f1 >= cfg.f1_step:
            best_f1, best_k = f1, k
        else:
            break
    return [int(i) for i in ranked[:best_k] if np.isfinite(diff[i])], best_f1


def is_full_absorption(
    f: np.ndarray,
    proj: np.ndarray,
    cos: np.ndarray,
    main: list[int],
    total: float,
    cfg: AbsorptionConfig,
) -> bool:
    """Main latents all off, and the top-projecting latent is aligned and carries >= 40%."""
    if not main or np.any(f[main] != 0) or total <= 0:
        return False
    top = int(np.argmax(proj))
    return bool(cos[top] >= cfg.cos_threshold and proj[top] >= cfg.proj_threshold * total)


def absorption_fraction_of(
    proj: np.ndarray, cos: np.ndarray, main: list[int], total: float, cfg: AbsorptionConfig
) -> float:
    """Share of the probe projection taken over by (at most 3) aligned non-main latents."""
    main_proj = float(proj[main].sum()) if main else 0.0
    candidates = (cos >= cfg.fraction_cos_threshold) & (proj > 0)
    candidates[main] = False
    absorbers = np.sort(proj[candidates])[::-1][: cfg.max_absorbers]
    absorbed = float(absorbers.sum())
    if total <= 0 or main_proj >= total or absorbed < cfg.proj_threshold * total:
        return 0.0
    if main_proj <= 0:
        return 1.0
    absorbed = min(absorbed, total - main_proj)
    return float(np.clip(absorbed / (absorbed + main_proj), 0.0, 1.0))


def measure_absorption(
    sae: SparseAutoencoder,
    x_train: torch.Tensor,
    y_train: np.ndarray,
    x_test: torch.Tensor,
    y_test: np.ndarray,
    cfg: AbsorptionConfig,
) -> tuple[list[MetricResult], dict[str, Any]]:
    """Absorption metrics from word activations and their letters (ints 0..25)."""
    from sklearn.metrics import f1_score

    probe = fit_letter_probe(x_train, y_train, cfg.seed, cfg.probe_c)
    predicted = probe.predict(x_test)
    classes = list(probe.classes_)
    device = sae.W_dec.device  # the SAE encodes where it lives; scikit-learn reads numpy
    with torch.no_grad():
        f_train = sae.encode(x_train.to(device)).cpu().numpy()
        f_test = sae.encode(x_test.to(device)).cpu().numpy()
        w_dec = sae.W_dec.detach().double().cpu().numpy()
    dec_norms = np.linalg.norm(w_dec, axis=1).clip(1e-12)
    x_test_np = x_test.double().numpy()
    per_letter: list[dict[str, Any]] = []
    full_rates, fractions = [], []
    for letter in sorted(set(y_test.tolist())):
        if letter not in classes:
            continue
        is_test = y_test == letter
        probe_f1 = float(f1_score(is_test, predicted == letter, zero_division=0))
        direction = probe.coef_[classes.index(letter)] if len(classes) > 2 else probe.coef_[0]
        direction = direction / max(np.linalg.norm(direction), 1e-12)
        main, main_f1 = choose_main_latents(f_train, y_train == letter, f_test, is_test, cfg)
        along = w_dec @ direction
        cos = along / dec_norms
        true_pos = np.flatnonzero(is_test & (predicted == letter))
        full = 0
        word_fractions = []
        main_off, aligned, top_shares = 0, 0, []  # how far words get through the definition
        for row in true_pos:
            f = f_test[row].astype(np.float64)
            total = float(x_test_np[row] @ direction)  # probe projection of the activation
            # Each latent's share of the projection: f_i <W_dec,i, d> (= activation x cosine for
            # unit-norm decoder rows; saeguard folds input scaling into W_dec, so rows may not be).
            proj = f * along
            word_fractions.append(absorption_fraction_of(proj, cos, main, total, cfg))
            if is_full_absorption(f, proj, cos, main, total, cfg):
                full += 1
            if main and not np.any(f[main] != 0) and total > 0:
                main_off += 1
                top = int(np.argmax(proj))
                if cos[top] >= cfg.cos_threshold:
                    aligned += 1
                    top_shares.append(round(float(proj[top] / total), 4))
        rate = full / len(true_pos) if len(true_pos) else 0.0
        fraction = float(np.mean(word_fractions)) if word_fractions else 0.0
        entry = {
            "letter": string.ascii_lowercase[letter],
            "probe_f1": probe_f1,
            "main_latents": main,
            "main_f1": main_f1,
            "true_positives": int(len(true_pos)),
            "main_off": main_off,
            "main_off_aligned": aligned,
            "aligned_top_shares": top_shares,
            "main_density": float(np.mean(np.any(f_test[:, main] != 0, axis=1))) if main else 0.0,
            "full_absorption": rate,
            "absorption_fraction": fraction,
            "counted": probe_f1 > cfg.min_probe_f1,
        }
        per_letter.append(entry)
        if entry["counted"]:
            full_rates.append(rate)
            fractions.append(fraction)
    if not full_rates:
        raise ConfigError(
            f"no letter's probe reached F1 > {cfg.min_probe_f1}; absorption is undefined here "
            "(use more --words, or check that the hook carries spelling information)"
        )
    results = [
        sampled_metric("mean_full_absorption", VERSION, {"values": full_rates}, "mean", "letter"),
        sampled_metric("absorption_fraction", VERSION, {"values": fractions}, "mean", "letter"),
    ]
    return results, {"letters": per_letter}


def vocabulary_words(tokenizer: Any, count: int, seed: int) -> list[tuple[str, int]]:
    """Up to ``count`` (word, token id) pairs: tokens that decode to a space and 2+ letters."""
    found = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if _WORD_TOKEN.match(text):
            found.append((text, token_id))
    if len(found) < 52:
        raise ConfigError("the tokenizer has too few single-token words for the first-letter task")
    random.Random(seed).shuffle(found)
    return found[:count]


def word_prompts(
    tokenizer: Any, words: list[tuple[str, int]], icl: int, seed: int, start_id: int | None
) -> list[list[int]]:
    """Token ids ending at each word's token (the position that is read)."""
    rng = random.Random(seed + 1)
    prompts = []
    for _, token_id in words:
        examples = rng.sample(words, icl)
        lines = "".join(
            f"{w.strip()} has the first letter: {w.strip()[0].upper()}\n" for w, _ in examples
        )
        ids = tokenizer(lines, add_special_tokens=False)["input_ids"]
        prompts.append(([start_id] if start_id is not None else []) + ids + [token_id])
    return prompts


def run_absorption(
    subject: Any, cfg: AbsorptionConfig
) -> tuple[list[MetricResult], dict[str, Any]]:
    """Absorption of the subject's SAE, words drawn from its model's vocabulary."""
    words, acts = word_activations(subject, cfg)
    letters = np.array([letter_of(w) for w, _ in words])
    test = held_out_words(len(words), cfg)
    return measure_absorption(
        subject.sae, acts[~test], letters[~test], acts[test], letters[test], cfg
    )


def held_out_words(count: int, cfg: AbsorptionConfig) -> np.ndarray:
    """Which of ``count`` words are held out to score the probes (seeded)."""
    return np.random.default_rng(cfg.seed).random(count) < cfg.test_fraction


def word_activations(
    subject: Any, cfg: AbsorptionConfig
) -> tuple[list[tuple[str, int]], torch.Tensor]:
    """(word, token id) pairs and the activation at each word's token (computed once per
    subject's model; SAE-independent)."""
    from saeguard.activations.reader import run_contexts

    key = ("absorption", cfg.words, cfg.icl_examples, cfg.seed)
    if key not in subject.memo:  # model activations are shared by the SAEs of a study
        tokenizer = subject.loaded.tokenizer
        words = vocabulary_words(tokenizer, cfg.words, cfg.seed)
        start_id = subject.source.spec.start_id
        prompts = word_prompts(tokenizer, words, cfg.icl_examples, cfg.seed, start_id)
        acts = torch.zeros(len(prompts), subject.sae.cfg.d_in)
        for result in run_contexts(subject.loaded, subject.hook, subject.source.rules, prompts,
                                   32, progress="absorption: words"):  # fmt: skip
            acts[result.index] = result.acts[-1]  # the word's last token
        subject.memo[key] = (words, acts)
    words, acts = subject.memo[key]
    return words, acts
