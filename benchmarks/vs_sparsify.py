"""saeguard's default TopK trainer against EleutherAI sparsify's default, on identical batches.

    python benchmarks/vs_sparsify.py --acts CACHE [--tokens 327680] [--repeats 2] [--out runs/ttq]

sparsify is never a saeguard dependency: run this from your own virtual environment, e.g.
``python -m venv /tmp/sp && /tmp/sp/bin/pip install eai-sparsify==1.3.3 -e .``.

Both trainers see the same shuffled batches of the cache (cycled to ``--tokens``), already in
memory, and only their training step is timed. sparsify runs as its trainer does by default:
sign-SGD wrapped in schedule-free averaging, its width rule for the learning rate, ``b_dec``
set to the first batch's mean, unit-norm decoder rows, no AuxK. saeguard runs its defaults
(TopK k=32, 16x, AuxK, ...). Both are scored on the same held-out activations (the validation
split with the cache's exclusion rules, built by ``time_to_quality.held_out``). Prints each
repeat, the per-repeat speed ratio, and the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from time_to_quality import batches, held_out

from saeguard.sae import SAEConfig, create_sae
from saeguard.train import Trainer, TrainerConfig, evaluate_reconstruction

BATCH = 4096


def sparsify_run(steps: list[torch.Tensor], x_eval: torch.Tensor, k: int, expansion: int):
    """(held-out FVU, training tokens/s, unused fraction) of sparsify's default recipe."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(0)
    d_in = steps[0].shape[1]
    sae = SparseCoder(d_in, SparseCoderConfig(expansion_factor=expansion, k=k), "cpu",
                      dtype=torch.float32)  # fmt: skip
    lr = 5e-3 / (sae.num_latents / 2**14) ** 0.5  # sparsify's default width rule
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95)
    opt.train()
    seconds = 0.0
    for step, x in enumerate(steps):
        start = time.perf_counter()
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x=x, y=x, dead_mask=None, total_variance=(x - x.mean(0)).pow(2).sum())
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        seconds += time.perf_counter() - start
    opt.eval()
    with torch.no_grad():
        enc = sae.encode(x_eval)
        x_hat = sae.decode(enc.top_acts, enc.top_indices)
        used = torch.zeros(sae.num_latents, dtype=torch.bool)
        used[enc.top_indices[enc.top_acts > 0]] = True
        fvu = float((x_hat - x_eval).pow(2).sum() / (x_eval - x_eval.mean(0)).pow(2).sum())
    return fvu, len(steps) * BATCH / seconds, 1 - float(used.float().mean())


def saeguard_run(steps: list[torch.Tensor], x_eval: torch.Tensor, k: int, expansion: int):
    """(held-out FVU, training tokens/s, unused fraction) of saeguard's defaults."""
    d_in = steps[0].shape[1]
    cfg = SAEConfig(architecture="topk", d_in=d_in, d_sae=d_in * expansion, k=k)
    trainer_cfg = TrainerConfig(tokens=len(steps) * BATCH, checkpoint_every=0,
                                checkpoint_minutes=0, log_every=10**9)  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer({"sae": create_sae(cfg)}, trainer_cfg, scratch)
        stream: Iterator[torch.Tensor] = iter(steps)
        with contextlib.redirect_stderr(io.StringIO()):  # one line per run, not a progress bar
            trainer.fit(stream)
        result = evaluate_reconstruction(trainer.folded("sae"), x_eval)
    return result["fvu"], trainer.tokens_per_s, result["dead_frac"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acts", required=True, help="activation cache (saeguard harvest)")
    parser.add_argument("--tokens", type=int, default=327_680, help="training tokens per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each trainer")
    parser.add_argument("--eval-tokens", type=int, default=16_384, help="held-out tokens")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--out", default="runs/ttq", help="where the held-out set is kept")
    args = parser.parse_args()
    try:
        import sparsify  # noqa: F401
    except ImportError:
        sys.exit("sparsify is not installed here: run this from your own venv (pip install "
                 "eai-sparsify==1.3.3 -e .); it is never a saeguard dependency")  # fmt: skip
    x_eval = held_out(args.acts, args.eval_tokens, Path(args.out))
    stream = iter(batches(args.acts, BATCH, seed=0))
    steps = [next(stream) for _ in range(args.tokens // BATCH)]
    rows: dict[str, list[tuple[float, float, float]]] = {"sparsify": [], "saeguard": []}
    for repeat in range(args.repeats):
        for name, run in (("sparsify", sparsify_run), ("saeguard", saeguard_run)):
            fvu, rate, unused = run(steps, x_eval, args.k, args.expansion)
            rows[name].append((fvu, rate, unused))
            print(f"repeat {repeat + 1} {name}: held-out FVU {fvu:.3f}, {rate:,.0f} tok/s, "
                  f"unused latents {100 * unused:.1f}%", flush=True)  # fmt: skip
        ratio = rows["saeguard"][-1][1] / rows["sparsify"][-1][1]
        print(f"repeat {repeat + 1}: saeguard / sparsify tokens/s = {ratio:.2f}x", flush=True)
    medians = {n: [statistics.median(r[i] for r in rs) for i in range(3)] for n, rs in rows.items()}
    for name, (fvu, rate, unused) in medians.items():
        print(f"MEDIAN {name}: FVU {fvu:.3f}, {rate:,.0f} tok/s, unused {100 * unused:.1f}%")
    print(f"MEDIAN ratio: {medians['saeguard'][1] / medians['sparsify'][1]:.2f}x")


if __name__ == "__main__":
    main()
