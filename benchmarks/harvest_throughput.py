"""Harvest throughput against a plain full forward, measured in the same run.

Prints tokens/s of (a) saeguard's harvest step (forward that stops after the hook's layer, plus
the exclusion rules) and (b) a plain full forward with ``output_hidden_states=True`` reading the
same layer, on the same batches, alternating the two so machine drift hits both alike.

    python benchmarks/harvest_throughput.py [--model smollm2-135m] [--hook resid_post.15]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from saeguard.activations import ActivationSourceConfig
from saeguard.activations.source import ActivationHarvester, prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hook", default="resid_post.15")
    parser.add_argument("--batch-size", type=int, default=32, help="contexts per forward")
    parser.add_argument("--ctx-len", type=int, default=128)
    parser.add_argument("--batches", type=int, default=3, help="distinct batches per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating timing rounds")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    cfg = ActivationSourceConfig(
        model=args.model, hooks=[args.hook], ctx_len=args.ctx_len, dtype=args.dtype
    )
    prepared = prepare(cfg)
    loaded, contexts = prepared.loaded, prepared.contexts()
    harvester = ActivationHarvester(loaded, [args.hook], prepared.rules)
    calibration = list(itertools.islice(contexts, cfg.calibration_contexts))
    harvester.calibrate(calibration, args.batch_size)
    batches = [
        torch.tensor(list(itertools.islice(contexts, args.batch_size)), dtype=torch.long)
        for _ in range(args.batches)
    ]
    layer = loaded.hook_point(args.hook).layer
    tokens_per_batch = args.batch_size * args.ctx_len

    def harvest_step(tokens: torch.Tensor) -> None:
        harvester.kept(tokens, 0)

    @torch.inference_mode()
    def full_forward(tokens: torch.Tensor) -> None:
        out = loaded.model(input_ids=tokens, output_hidden_states=True, use_cache=False)
        out.hidden_states[layer + 1].float()

    harvest_step(batches[0])  # warm-up both paths
    full_forward(batches[0])
    times: dict[str, list[float]] = {"harvest": [], "full": []}
    for _ in range(args.rounds):
        for tokens in batches:
            for name, fn in (("harvest", harvest_step), ("full", full_forward)):
                start = time.perf_counter()
                fn(tokens)
                times[name].append(time.perf_counter() - start)
    rate = {k: tokens_per_batch / statistics.median(v) for k, v in times.items()}
    print(
        f"model={args.model} hook={args.hook} (runs {layer + 1} of {loaded.n_layers} blocks) "
        f"batch={args.batch_size}x{args.ctx_len} dtype={args.dtype} "
        f"threads={torch.get_num_threads()}"
    )
    print(f"harvest (stop after layer + exclusions): {rate['harvest']:10,.0f} tok/s")
    print(f"full forward, output_hidden_states=True: {rate['full']:10,.0f} tok/s")
    print(f"speed-up: {rate['harvest'] / rate['full']:.2f}x")


if __name__ == "__main__":
    main()
