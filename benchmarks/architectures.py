"""Train every registered SAE architecture on one activation cache and write the comparison table.

    python benchmarks/architectures.py --acts CACHE_DIR [--tokens 2000000] [--out runs/archs]
        [--archs topk,vsae,gated --append "measured 2026-12-04"]

Each architecture is trained on its own (so tokens/s is its own) with the same budget, k and
expansion, then scored on held-out validation-split activations. The table is printed and
written to docs/architectures.md; with ``--append LABEL`` the rows already there are kept and
the new ones added below them, each architecture marked with the label (a run on another day,
beside a re-run of a reference architecture).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from saeguard.fileio import atomic_write_text
from saeguard.jobs.train import TrainJobConfig, run_training
from saeguard.sae import ARCHITECTURES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acts", required=True, help="activation cache (saeguard harvest)")
    parser.add_argument("--tokens", type=int, default=2_000_000, help="training tokens per SAE")
    parser.add_argument("--mp-tokens", type=int, default=0,
                        help="budget for mp, whose k greedy steps cost k dense matmuls "
                             "(0: same as --tokens)")  # fmt: skip
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--eval-tokens", type=int, default=16_384)
    parser.add_argument("--archs", default=",".join(ARCHITECTURES))
    parser.add_argument("--out", default="runs/archs")
    parser.add_argument("--doc", default="docs/architectures.md")
    parser.add_argument("--append", default="", metavar="LABEL",
                        help="keep the table's rows, add these as 'arch (LABEL)'")  # fmt: skip
    args = parser.parse_args()

    rows = []
    for arch in args.archs.split(","):
        tokens = args.mp_tokens if arch == "mp" and args.mp_tokens else args.tokens
        job = TrainJobConfig(
            acts=args.acts, out=str(Path(args.out) / arch), architectures=[arch], k=[args.k],
            expansion=[args.expansion], tokens=tokens, eval_tokens=args.eval_tokens,
            checkpoint_every=0,
        )  # fmt: skip
        result = run_training(job)
        entry = next(iter(result["saes"].values()))
        held = entry["held_out"]
        rows.append((arch, tokens, held["fvu"], held["l0"], held["dead_frac"],
                     result["tokens_per_s"]))  # fmt: skip
        print(json.dumps({"arch": arch, "training_tokens": tokens, "held_out": held,
                          "tokens_per_s": result["tokens_per_s"]}))  # fmt: skip
    columns = [
        "| architecture | training tokens | held-out FVU | L0 | dead % | train tok/s |",
        "|---|---|---|---|---|---|",
    ]
    doc = Path(args.doc)
    begin, end = "<!-- table: written by benchmarks/architectures.py -->", "<!-- /table -->"
    text = doc.read_text(encoding="utf-8") if doc.exists() else ""
    kept = []
    if args.append and begin in text and end in text:
        old_table = text.split(begin, 1)[1].split(end, 1)[0]
        kept = [line for line in old_table.strip().splitlines() if line not in columns]
    label = f" ({args.append})" if args.append else ""
    lines = [*columns, *kept]
    for arch, tokens, fvu, l0, dead, rate in rows:
        lines.append(f"| {arch}{label} | {tokens:,} | {fvu:.3f} | {l0:.1f} | {100 * dead:.1f} | "
                     f"{rate:,.0f} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    if begin in text and end in text:  # keep the hand-written commentary around the table
        before, rest = text.split(begin, 1)
        after = rest.split(end, 1)[1]
        atomic_write_text(doc, f"{before}{begin}\n{table}\n{end}{after}")
        return
    header = (
        "# SAE architectures on SmolLM2-135M `resid_post.15` (wiki-en)\n\n"
        f"Produced by `python benchmarks/architectures.py --acts {args.acts} --tokens "
        f"{args.tokens}{f' --mp-tokens {args.mp_tokens}' if args.mp_tokens else ''}` "
        f"(k={args.k}, expansion {args.expansion}, batch 4096). Held-out: "
        f"{args.eval_tokens} activations of the validation split, default exclusions.\n\n"
    )
    atomic_write_text(doc, header + begin + "\n" + table + "\n" + end + "\n")


if __name__ == "__main__":
    main()
