"""Does the absorption metric's ground-truth probe find first letters at a model's hook points?

    python benchmarks/letter_probes.py --sae SAE_DIR [--layers 4,9,13]

The absorption metric (SPEC §4) averages only letters whose 26-way probe reaches test F1 > 0.6.
This script reads the metric's own word prompts (SAE_DIR's model, its vocabulary words, its
in-context examples and held-out split) at ``resid_post.L`` for each --layers value, prints the
residual's largest mean dimensions against the median one, and fits the probe in several input
frames: the one saeguard uses (centred, divided by one number), uncentred (one number only, the
frame before absorption VERSION 3) at three regularisation strengths, and standardised per
dimension. A model with huge near-constant residual dimensions (Gemma-3-270M) needs the centring.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler

from saeguard.activations.reader import run_contexts
from saeguard.activations.subject import load_subject
from saeguard.evals.absorption import (
    AbsorptionConfig,
    held_out_words,
    letter_of,
    vocabulary_words,
    word_prompts,
)


def report(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
           y_test: np.ndarray, c: float) -> None:  # fmt: skip
    probe = LogisticRegression(C=c, max_iter=5000, class_weight="balanced", random_state=0)
    predicted = probe.fit(x_train, y_train).predict(x_test)
    f1 = [f1_score(y_test == k, predicted == k, zero_division=0) for k in sorted(set(y_test))]
    passed, accuracy = sum(f > 0.6 for f in f1), np.mean(predicted == y_test)
    print(
        f"   {name:36s} letters with F1 > 0.6: {passed:2d}/{len(f1)}   "
        f"median F1 {np.median(f1):.2f}   accuracy {accuracy:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sae", required=True, help="an SAE directory (its model is read)")
    parser.add_argument("--layers", default="", help="comma-separated L (default: the SAE's)")
    parser.add_argument("--words", type=int, default=2000)
    args = parser.parse_args()
    cfg = AbsorptionConfig(words=args.words)
    subject = load_subject(args.sae)
    tokenizer = subject.loaded.tokenizer
    words = vocabulary_words(tokenizer, cfg.words, cfg.seed)
    start_id = subject.source.spec.start_id
    prompts = word_prompts(tokenizer, words, cfg.icl_examples, cfg.seed, start_id)
    y = np.array([letter_of(w) for w, _ in words])
    test = held_out_words(len(words), cfg)
    hooks = [f"resid_post.{n}" for n in args.layers.split(",")] if args.layers else [subject.hook]
    for hook in hooks:
        began = time.perf_counter()
        rules = dataclasses.replace(  # no outlier rule at hooks the SAE was not fitted on
            subject.source.rules, median_norms={**subject.source.rules.median_norms, hook: 1e30}
        )
        acts = torch.zeros(len(prompts), subject.sae.cfg.d_in)
        for result in run_contexts(subject.loaded, hook, rules, prompts, 32):
            acts[result.index] = result.acts[-1]
        x = acts.double().numpy()
        mean_abs = np.abs(x).mean(0)
        top = np.argsort(-mean_abs)[:3]
        print(f"{hook}: median norm {np.median(np.linalg.norm(x, axis=1)):.1f}; largest mean |x| "
              f"dims {top.tolist()} = {mean_abs[top].round(1).tolist()}, median dim "
              f"{np.median(mean_abs):.2f} ({time.perf_counter() - began:.0f} s)")  # fmt: skip
        centred = x - x[~test].mean(0)
        scale = np.median(np.linalg.norm(centred[~test], axis=1))
        report("centred, one scale, C=10 (saeguard)", centred[~test] / scale, y[~test],
               centred[test] / scale, y[test], 10.0)  # fmt: skip
        raw_scale = np.median(np.linalg.norm(x[~test], axis=1))
        for c in (10.0, 100.0, 1000.0):
            report(f"uncentred, one scale, C={c:g}", x[~test] / raw_scale, y[~test],
                   x[test] / raw_scale, y[test], c)  # fmt: skip
        standard = StandardScaler().fit(x[~test])
        report("standardised per dimension, C=10", standard.transform(x[~test]), y[~test],
               standard.transform(x[test]), y[test], 10.0)  # fmt: skip


if __name__ == "__main__":
    main()
