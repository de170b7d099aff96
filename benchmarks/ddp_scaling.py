"""Data-parallel training against one process, measured in the same run on the same cache.

Trains the same SAE on the same activation cache twice: once as one process, once under
``torchrun --nproc-per-node N`` (gloo on the CPU, nccl with ``--device cuda``), and prints both
training rates (tokens/s, from each run's train_results.json), their ratio, both SAEs'
held-out FVU (validation split) and the largest relative difference between their weights. The
ranks sum their gradients in another order than one process does; with sign-SGD a near-zero
gradient element can change sign, after which TopK training drifts to a different SAE of the
same quality (docs/scaling.md has the measurement), so compare the FVUs, not the weights.

On a CPU the ranks share the machine's cores: one process gets ``--threads`` threads, each rank
``--threads / N``, so the ratio shows what the split and the per-step collectives cost or gain
at equal hardware. On N GPUs each rank has its own GPU.

    python benchmarks/ddp_scaling.py --acts runs/default/acts [--nproc 2] [--tokens 262144]
        [--device cpu] [--threads 2] [--optimizer adam --no-schedule-free]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file


def train(argv: list[str], out: Path, nproc: int, threads: int) -> tuple[dict, float]:
    """(train_results.json, wall seconds) of one training run."""
    launcher = [sys.executable, "-m", "saeguard"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", str(nproc), "-m", "saeguard"]  # fmt: skip
    command = [*launcher, "-q", "train", *argv, "--threads", str(threads), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    return json.loads((out / "train_results.json").read_text()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acts", required=True, help="activation cache from `saeguard harvest`")
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the data-parallel run")
    parser.add_argument("--tokens", type=int, default=262_144)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per rank)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads of one process (each rank: threads / nproc)")  # fmt: skip
    parser.add_argument("--out", default="", help="keep both runs here (default: a temp dir)")
    parser.add_argument("--eval-tokens", type=int, default=16_384, help="held-out FVU tokens")
    args, extra = parser.parse_known_args()  # the rest goes to `saeguard train` as is
    argv = ["--acts", args.acts, "--tokens", str(args.tokens), "--batch-tokens",
            str(args.batch_tokens), "--k", str(args.k), "--expansion", str(args.expansion),
            "--device", args.device, "--eval-tokens", str(args.eval_tokens),
            "--checkpoint-minutes", "0", "--checkpoint-every", "0",
            "--buffer-tokens", str(16 * args.batch_tokens), *extra]  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.out or scratch)
        single, single_s = train(argv, root / "single", 1, args.threads)
        ranks, ranks_s = train(argv, root / f"ddp{args.nproc}", args.nproc,
                               max(args.threads // args.nproc, 1))  # fmt: skip
        a = load_file(str(root / "single" / "sae_weights.safetensors"))
        b = load_file(str(root / f"ddp{args.nproc}" / "sae_weights.safetensors"))
        difference = max(float((a[k] - b[k]).norm() / b[k].norm()) for k in a)
    setting = f"expansion {args.expansion}, device {args.device}, {args.threads} CPU threads"
    print(f"{args.tokens:,} tokens, batch {args.batch_tokens}, k={args.k}, {setting}")
    one, many = single["tokens_per_s"], ranks["tokens_per_s"]
    print(f"one process:  {one:10,.0f} training tok/s ({single_s:.0f} s wall)")
    print(f"torchrun x{args.nproc}:  {many:10,.0f} training tok/s ({ranks_s:.0f} s wall): "
          f"{many / one:.2f}x")  # fmt: skip
    if args.eval_tokens:
        fvus = [next(iter(r["saes"].values()))["held_out"]["fvu"] for r in (single, ranks)]
        print(f"held-out FVU: one process {fvus[0]:.4f}, torchrun x{args.nproc} {fvus[1]:.4f}")
    print(f"largest relative weight difference between the two SAEs: {difference:.1e}"
          f"{' (extra train options: ' + ' '.join(extra) + ')' if extra else ''}")  # fmt: skip


if __name__ == "__main__":
    main()
