"""TopK SAE training throughput against a plain dense PyTorch TopK step, in the same run.

Prints training tokens/s of saeguard's TopK step (sparse decode and sparse encoder gradient,
decoder renormalisation) with its default optimiser (sign-SGD + schedule-free) and with Adam,
beside a dense reference step written here with the same shapes, Adam and thread count, plus the
floor implied by the measured matmul speed (the encoder's one unavoidable dense matmul), and the
speed-up of bfloat16 autocast. The CPU's instruction sets are printed with it: bfloat16 is fast
only where the CPU has bfloat16 instructions (avx512_bf16, amx_bf16).

With ``--device cuda`` every step runs on the GPU (timed with a device synchronise) and the
default step is also timed on the CPU in the same run, for the GPU-over-CPU ratio.

With ``--acts CACHE`` it also trains the default SAE for ``--tokens`` on that cache in float32
and under bfloat16 autocast and prints both held-out FVUs (validation split, sinks excluded).

    python benchmarks/train_throughput.py [--batch 4096] [--d-in 576] [--expansion 16] [--k 32]
        [--device cuda] [--acts runs/acts300k --tokens 327680]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from timing import sae_train_step, timed

from saeguard.devices import describe_device, resolve_device
from saeguard.jobs.planning import cpu_flags
from saeguard.sae import SAEConfig, create_sae


def quality(acts: str, tokens: int, out: Path) -> dict[str, tuple[float, float]]:
    """(held-out FVU, training tokens/s) of the default trainer in float32 and bf16 autocast."""
    from time_to_quality import batches, held_out

    from saeguard.activations import CachedActivationSource
    from saeguard.train import Trainer, TrainerConfig, evaluate_reconstruction

    x_eval = held_out(acts, 16_384, out)
    d = CachedActivationSource(acts).d_model
    result = {}
    for name, autocast in (("float32", False), ("bf16 autocast", True)):
        with tempfile.TemporaryDirectory(dir=out) as scratch:
            sae = create_sae(SAEConfig(architecture="topk", d_in=d, d_sae=16 * d, k=32))
            cfg = TrainerConfig(tokens=tokens, checkpoint_every=0, checkpoint_minutes=0,
                                autocast_bf16=autocast)  # fmt: skip
            trainer = Trainer({"sae": sae}, cfg, scratch)
            trainer.fit(batches(acts, 4096, 0))
            fvu = evaluate_reconstruction(trainer.folded("sae"), x_eval)["fvu"]
            result[name] = (fvu, trainer.tokens_per_s)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--acts", default="", help="cache for the float32 vs bf16 FVU check")
    parser.add_argument("--tokens", type=int, default=327_680)
    parser.add_argument("--out", default="runs/train_throughput")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    args = parser.parse_args()
    n, d, k = args.batch, args.d_in, args.k
    d_sae = d * args.expansion
    device = resolve_device(args.device)
    torch.manual_seed(0)
    x_cpu = torch.randn(n, d)
    x = x_cpu.to(device)

    def timed_here(step, repeats: int, on=device) -> float:  # type: ignore[no-untyped-def]
        if on.type != "cuda":
            return timed(step, repeats)

        def synchronised() -> None:
            step()
            torch.cuda.synchronize(on)

        return timed(synchronised, repeats)

    def saeguard_step(optimizer: str, schedule_free: bool, on=device):  # type: ignore[no-untyped-def]
        sae = create_sae(SAEConfig(architecture="topk", d_in=d, d_sae=d_sae, k=k, aux_coef=0))
        sae.to(on)
        return sae_train_step(sae, x if on == device else x_cpu, optimizer, schedule_free)

    default = saeguard_step("signsgd", True)
    adam = saeguard_step("adam", False)

    w_enc = torch.nn.Parameter(torch.randn(d, d_sae, device=device) * d**-0.5)
    b_enc = torch.nn.Parameter(torch.zeros(d_sae, device=device))
    w_dec = torch.nn.Parameter(torch.randn(d_sae, d, device=device) * d**-0.5)
    b_dec = torch.nn.Parameter(torch.zeros(d, device=device))
    dense_opt = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=1e-4)

    def dense() -> None:
        pre = (x - b_dec) @ w_enc + b_enc
        values, indices = pre.topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        x_hat = f @ w_dec + b_dec
        loss = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        dense_opt.zero_grad(set_to_none=True)
        loss.backward()
        dense_opt.step()
        with torch.no_grad():
            w_dec.div_(w_dec.norm(dim=-1, keepdim=True))

    a, b = torch.randn(n, d, device=device), torch.randn(d, d_sae, device=device)
    matmul_s = timed_here(lambda: a @ b, args.repeats)
    gflops = 2 * n * d * d_sae / matmul_s / 1e9
    t_default = timed_here(default, args.repeats)
    t_adam = timed_here(adam, args.repeats)
    t_dense = timed_here(dense, args.repeats)
    t_bf16 = timed_here(lambda: default(autocast=True), args.repeats)
    rate = {"default": n / t_default, "adam": n / t_adam, "dense": n / t_dense,
            "bf16": n / t_bf16}  # fmt: skip
    floor = n / matmul_s
    print(
        f"TopK k={k}, d_in={d}, d_sae={d_sae}, batch={n}, threads={torch.get_num_threads()}, "
        f"device {describe_device(device)}, matmul {gflops:.0f} GFLOP/s, "
        f"CPU {cpu_flags() or 'flags unknown'}"
    )
    print(f"saeguard TopK step, sign-SGD + schedule-free (default): {rate['default']:10,.0f} tok/s "
          f"({rate['default'] / rate['dense']:.2f}x dense)")  # fmt: skip
    print(f"saeguard TopK step, Adam:                              {rate['adam']:10,.0f} tok/s "
          f"({rate['adam'] / rate['dense']:.2f}x dense)")  # fmt: skip
    print(f"dense reference TopK step, Adam (fp32):                {rate['dense']:10,.0f} tok/s")
    print(f"floor (encoder matmul alone):                          {floor:10,.0f} tok/s  "
          f"(default at {100 * rate['default'] / floor:.0f}% of it)")  # fmt: skip
    print(f"saeguard default step under bf16 autocast:             {rate['bf16']:10,.0f} tok/s "
          f"({rate['bf16'] / rate['default']:.2f}x fp32)")  # fmt: skip
    if device.type != "cpu":
        cpu = torch.device("cpu")
        t_cpu = timed(saeguard_step("signsgd", True, on=cpu), args.repeats)
        speedups = f"{device.type} fp32 {t_cpu / t_default:.1f}x, bf16 {t_cpu / t_bf16:.1f}x it"
        print(f"the same default step on this machine's CPU:            {n / t_cpu:10,.0f} tok/s "
              f"({speedups})")  # fmt: skip
    if args.acts:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, (fvu, tok_s) in quality(args.acts, args.tokens, out).items():
            print(f"default trainer, {name}, {args.tokens:,} tokens of {args.acts}: held-out FVU "
                  f"{fvu:.3f}, {tok_s:,.0f} training tok/s")  # fmt: skip


if __name__ == "__main__":
    main()
