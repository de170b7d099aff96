"""Why is feature absorption what it is on a real SAE, and does the metric see planted absorption?

    python benchmarks/absorption_check.py --sae SAE_DIR [--words 2000] [--acts FILE]
                                          [--plant-fraction 0.3] [--no-plant]

Part 1, the diagnosis: the absorption metric (SPEC §4, saeguard/evals/absorption.py) on SAE_DIR,
and per letter how far its probe true positives get through the definition: probe F1, main
latents (k-sparse probing) and their F1, how often a main latent fires on any word, true
positives, those with every main latent off, those whose top-projecting latent is also aligned
(cosine >= 0.025), and those where it also supplies >= 40% of the probe projection (= full
absorption); then the full-absorption rate had the 40% threshold been 30% or 20%.

Part 2, the planted check (saeguard/evals/planted.py): on --plant-fraction of each counted
letter's words, plant a token latent that absorbs the letter ("absorb": main latents off, the
token latent's decoder at cosine 0.5 with the probe direction supplying 60% of the projection;
"takeover": main latents off, the token latent takes over exactly what they reconstructed), or
does not ("control": the same token latents orthogonal to the probe, main latents on;
"suppress": main latents off, nothing absorbs). The metric must score both absorbing plants
clearly above both controls. --acts caches the word activations (the model runs once).
"""

from __future__ import annotations

import argparse
import string
import time
from pathlib import Path

import numpy as np
import torch

from saeguard.evals.absorption import (
    AbsorptionConfig,
    fit_letter_probe,
    held_out_words,
    letter_of,
    measure_absorption,
)
from saeguard.evals.planted import plant_absorption
from saeguard.sae.io import load_sae


def word_activations(sae_dir: str, cfg: AbsorptionConfig, cache: str) -> tuple[list, torch.Tensor]:
    """The words and their activations, from ``cache`` when it holds the same model, hook and
    word settings (SAE-independent: one cache serves every SAE of a model and hook)."""
    _, meta = load_sae(sae_dir)
    settings = [cfg.words, cfg.icl_examples, cfg.seed, meta.get("model"), meta.get("hook")]
    if cache and Path(cache).exists():
        saved = torch.load(cache)
        if saved["settings"] == settings:
            return saved["words"], saved["acts"]
    from saeguard.activations.subject import load_subject
    from saeguard.evals.absorption import word_activations as run_words

    words, acts = run_words(load_subject(sae_dir), cfg)
    if cache:
        torch.save({"settings": settings, "words": words, "acts": acts}, cache)
    return words, acts


def diagnose(details: dict, cfg: AbsorptionConfig) -> None:
    letters = details["letters"]
    print(f"{'':2} {'F1':>5} {'main latents':<22} {'mainF1':>6} {'dens':>5} {'TP':>4} "
          f"{'off':>4} {'algn':>4} {'full':>4} {'rate':>6} {'top share (median)':>18}")  # fmt: skip
    for e in letters:
        shares = e["aligned_top_shares"]
        med = f"{np.median(shares):.2f}" if shares else "-"
        full = round(e["full_absorption"] * e["true_positives"])
        mark = "" if e["counted"] else "  (not counted: probe F1 <= 0.6)"
        print(f"{e['letter']:2} {e['probe_f1']:5.2f} {str(e['main_latents']):<22} "
              f"{e['main_f1']:6.2f} {e['main_density']:5.2f} {e['true_positives']:4d} "
              f"{e['main_off']:4d} {e['main_off_aligned']:4d} {full:4d} "
              f"{e['full_absorption']:6.3f} {med:>18}{mark}")  # fmt: skip
    counted = [e for e in letters if e["counted"]]
    tp = sum(e["true_positives"] for e in counted)
    off = sum(e["main_off"] for e in counted)
    aligned = sum(e["main_off_aligned"] for e in counted)
    shares = [s for e in counted for s in e["aligned_top_shares"]]
    full = sum(1 for s in shares if s >= cfg.proj_threshold)
    print(f"\ncounted letters (probe F1 > {cfg.min_probe_f1}): {len(counted)} of {len(letters)}")
    print(
        f"true positives {tp}; every main latent off (and P > 0) {off} ({off / max(tp, 1):.0%});"
        f" top latent aligned {aligned}; top latent >= {cfg.proj_threshold:.0%} of P {full}"
    )
    if shares:
        q = np.percentile(shares, [25, 50, 75, 90])
        print(f"top-latent share of P where the mains are off: quartiles {q[0]:.2f} {q[1]:.2f} "
              f"{q[2]:.2f}, 90th percentile {q[3]:.2f}")  # fmt: skip
    for threshold in (cfg.proj_threshold, 0.3, 0.2):
        rates = [
            sum(1 for s in e["aligned_top_shares"] if s >= threshold) / e["true_positives"]
            for e in counted
            if e["true_positives"]
        ]
        print(f"mean full absorption with a {threshold:.0%} share threshold: {np.mean(rates):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sae", required=True, help="SAE directory")
    parser.add_argument("--words", type=int, default=2000)
    parser.add_argument("--acts", default="", help="cache file for the word activations")
    parser.add_argument("--plant-fraction", type=float, default=0.3)
    parser.add_argument("--no-plant", action="store_true", help="the diagnosis only")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = AbsorptionConfig(words=args.words)
    start = time.perf_counter()
    words, acts = word_activations(args.sae, cfg, args.acts)
    sae, meta = load_sae(args.sae)
    sae.eval()
    letters = np.array([letter_of(w) for w, _ in words])
    test = held_out_words(len(words), cfg)
    split = (acts[~test], letters[~test], acts[test], letters[test])
    metrics, details = measure_absorption(sae, *split, cfg)
    values = {m.name: m.value for m in metrics}
    cis = {m.name: m.ci for m in metrics}
    print(f"{args.sae}: {meta.get('model')} {meta.get('hook')}, {sae.cfg.architecture} "
          f"k={sae.cfg.k}, d_sae={sae.cfg.d_sae}; {len(words)} words, "
          f"{int(test.sum())} held out")  # fmt: skip
    for name in ("mean_full_absorption", "absorption_fraction"):
        low, high = cis[name] or (float("nan"), float("nan"))
        print(f"{name} {values[name]:.4f} [{low:.4f}, {high:.4f}] (bootstrap 95% over letters)")
    print()
    diagnose(details, cfg)
    if not args.no_plant:
        plant(sae, acts, letters, test, details, cfg, args.plant_fraction, values)
    print(f"\n{time.perf_counter() - start:.0f} s")


def plant(sae, acts, letters, test, details, cfg, fraction, base_values) -> None:  # noqa: ANN001
    # The metric's own probe (the same fit on the same activations: deterministic).
    x_train = acts[~test]
    probe = fit_letter_probe(x_train, letters[~test], cfg.seed, cfg.probe_c)
    classes = list(probe.classes_)
    counted = {string.ascii_lowercase.index(e["letter"]): e for e in details["letters"]
               if e["counted"]}  # fmt: skip
    directions = {c: probe.coef_[classes.index(c)] for c in counted}
    mains = {c: e["main_latents"] for c, e in counted.items()}
    rng = np.random.default_rng(cfg.seed + 7)
    chosen = np.flatnonzero(np.isin(letters, list(counted)) & (rng.random(len(letters)) < fraction))
    print(f"\nplanted check: token latents on {len(chosen)} words ({fraction:.0%} of the "
          f"{len(counted)} counted letters' words)")  # fmt: skip
    print(f"{'SAE':<10} {'mean_full_absorption':>21} {'absorption_fraction':>20}")
    print(f"{'real':<10} {base_values['mean_full_absorption']:21.4f} "
          f"{base_values['absorption_fraction']:20.4f}")  # fmt: skip
    for mode in ("absorb", "takeover", "control", "suppress"):
        planted = plant_absorption(sae, acts, directions, mains, letters, chosen, mode)
        split = (acts[~test], letters[~test], acts[test], letters[test])
        metrics, _ = measure_absorption(planted, *split, cfg)  # type: ignore[arg-type]
        values = {m.name: m.value for m in metrics}
        print(f"{mode:<10} {values['mean_full_absorption']:21.4f} "
              f"{values['absorption_fraction']:20.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
