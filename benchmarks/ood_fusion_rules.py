"""How the fused OOD score's rule was chosen: every rule x tail x component set, on one run.

Reads a monitor (its held-out reference scores and calibration scores) and a finished
`saeguard ood benchmark` directory (its per-text scores of every single score), recomputes the
fused score under each variant, and prints per shift its AUROC, the mean over shifts, whether
it is within 0.01 of the best single score on every shift, and the false-positive rate of its
calibrated threshold on the benchmark's held-out ID texts (scored as deployed).

Only ID text fits anything here: the reference distributions are the monitor's held-back fit
texts, the thresholds its calibration texts. The shifts only *measure* the variants; the rule
that `MonitorConfig` uses by default is the one this table favoured (docs/ood.md states which).

    python benchmarks/ood_fusion_rules.py --monitor runs/mon --bench runs/ood
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from saeguard.jobs.ood import score_set_path
from saeguard.ood.config import DEFAULT_FUSED_SCORES
from saeguard.ood.fusion import FUSION_RULES, TAILS, Fusion
from saeguard.ood.metrics import auroc
from saeguard.ood.scores import LM_BASELINES, SINGLE_SCORES

COMPONENT_SETS: dict[str, tuple[str, ...]] = {
    "all (default)": DEFAULT_FUSED_SCORES,
    "no LM": tuple(s for s in DEFAULT_FUSED_SCORES if s not in LM_BASELINES),
    "one per family": (
        "fallacious_surprisal_top",
        "recon_error",
        "l0_shift",
        "mahalanobis",
        "knn",
        "entropy",
        "perplexity",
    ),  # fmt: skip
}


def _rows(bench: Path, name: str) -> list[dict[str, Any]]:
    rows = json.loads(score_set_path(bench, name).read_text())["results"]
    return [r for r in rows if r["error"] is None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--monitor", required=True, help="Monitor directory (ood fit).")
    parser.add_argument("--bench", required=True, help="Finished ood benchmark directory.")
    parser.add_argument("--target-fpr", type=float, default=0.05)
    args = parser.parse_args()
    monitor, bench = Path(args.monitor), Path(args.bench)
    reference = json.loads((monitor / "reference_scores.json").read_text())
    calibration = json.loads((monitor / "calibration_scores.json").read_text())
    document = json.loads((bench / "ood_benchmark.json").read_text())
    id_rows = _rows(bench, "id")
    deployed = _rows(bench, "id-deployed")
    sets: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    for shift, row in document["shifts"].items():
        negatives = id_rows if row["negatives"] == "id" else _rows(bench, f"{shift}-negatives")
        sets[shift] = (negatives, _rows(bench, shift))
    singles = [s for s in SINGLE_SCORES if all(s in r["scores"] for r in id_rows)]
    best_single = {
        shift: max(
            auroc(np.array([r["scores"][s] for r in neg]), np.array([r["scores"][s] for r in pos]))
            for s in singles
        )
        for shift, (neg, pos) in sets.items()
    }
    calib_rows = [
        {k: v[i] for k, v in calibration.items()}
        for i in range(len(next(iter(calibration.values()))))
    ]
    shifts = list(sets)
    print(f"{'variant':44s} " + " ".join(f"{s[:15]:>15s}" for s in shifts) + "   mean  ok  FPR")
    print(f"{'best single score':44s} " + " ".join(f"{best_single[s]:15.3f}" for s in shifts)
          + f"  {np.mean(list(best_single.values())):.3f}")  # fmt: skip
    for label, components in COMPONENT_SETS.items():
        present = [c for c in components if c in singles and c in reference]
        if not present:
            continue
        for rule in FUSION_RULES:
            for tail in TAILS:
                fusion = Fusion.fit(reference, present, rule, tail)  # type: ignore[arg-type]
                values = []
                for shift in shifts:
                    neg, pos = sets[shift]
                    values.append(auroc(
                        np.array(fusion.score_many([r["scores"] for r in neg]), dtype=float),
                        np.array(fusion.score_many([r["scores"] for r in pos]), dtype=float),
                    ))  # fmt: skip
                ok = all(v >= best_single[s] - 0.01 for v, s in zip(values, shifts, strict=True))
                fused_cal = np.array(fusion.score_many(calib_rows), dtype=float)
                threshold = np.quantile(fused_cal, 1 - args.target_fpr, method="higher")
                fused_dep = np.array(
                    fusion.score_many([r["scores"] for r in deployed]), dtype=float
                )
                fpr = float(np.mean(fused_dep > threshold))
                name = f"{label} / {rule} / {tail}"
                verdict = "yes" if ok else "no "
                cells = " ".join(f"{v:15.3f}" for v in values)
                print(f"{name:44s} {cells}  {np.mean(values):.3f}  {verdict} {fpr:.3f}")


if __name__ == "__main__":
    main()
