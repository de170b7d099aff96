"""Every registered SAE architecture on a CUDA device: correct against the CPU, and how fast.

The one prepared script for a lent GPU (docs/scaling.md). For each architecture it builds the
same SAE (same seed) on the CPU and on the GPU and runs one training step on the same batch:

- the loss on the GPU in float32 against the CPU's float64 loss (relative difference; fp32 lands
  far under 1e-3), under bfloat16 autocast (1e-3 to 3e-2 is bf16 rounding), and whether every
  gradient is finite;
- the trained step's encoder output (inference path) on the GPU against the CPU's;
- training tokens/s of the whole step (forward, backward, the default optimiser, decoder
  renormalisation) on the GPU in float32 and bf16, and on the CPU in the same run (a few steps),
  each the median of --repeats after a warm-up, the GPU ones synchronised;
- the default trainer (``Trainer`` with ``device``) for --trainer-steps random batches on the
  GPU, its checkpoint resumed on the CPU: the resumed weights equal the GPU's.

Prints one table; exits 1 when a check fails. Without CUDA it refuses in one line.

    python benchmarks/gpu_check.py [--batch 4096] [--d-in 576] [--expansion 16] [--k 32]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time

import torch
from timing import sae_train_step, timed

from saeguard.devices import describe_device
from saeguard.sae import SAEConfig, SparseAutoencoder, create_sae
from saeguard.sae.registry import ARCHITECTURES, make_sae_config

FP32_TOLERANCE = 1e-3
"""Relative loss difference GPU fp32 vs CPU float64 above which the check fails."""
BF16_TOLERANCE = 5e-2
"""The same under bfloat16 autocast."""


def make(architecture: str, d: int, d_sae: int, k: int) -> SparseAutoencoder:
    torch.manual_seed(0)
    cfg: SAEConfig = make_sae_config(architecture, strict=False, d_in=d, d_sae=d_sae, k=k)
    return create_sae(cfg)


def step_fn(sae, x: torch.Tensor, autocast: bool):  # type: ignore[no-untyped-def]
    """One training step of the default optimiser (sign-SGD + schedule-free)."""
    step = sae_train_step(sae, x)
    return lambda: step(autocast)


def first_loss(sae, x: torch.Tensor, autocast: bool) -> tuple[float, bool]:  # type: ignore[no-untyped-def]
    """Loss of one forward/backward and whether every gradient is finite."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = sae.training_step(x, None, 1.0)
    out.loss.backward()
    finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in sae.parameters())
    return float(out.loss.detach()), finite


def trainer_check(device: torch.device, d: int, steps: int) -> tuple[bool, float]:
    """The default trainer on ``device``; its checkpoint resumed on the CPU equals it."""
    from saeguard.train import Trainer, TrainerConfig

    batch = 4096
    torch.manual_seed(1)
    data = [torch.randn(batch, d) for _ in range(steps)]
    sae = create_sae(SAEConfig(architecture="topk", d_in=d, d_sae=8 * d, k=32))
    with tempfile.TemporaryDirectory() as scratch:
        cfg = TrainerConfig(tokens=batch * steps, batch_tokens=batch, checkpoint_every=steps,
                            checkpoint_minutes=0)  # fmt: skip
        began = time.perf_counter()
        trainer = Trainer({"sae": copy.deepcopy(sae)}, cfg, scratch, device=device)
        trainer.fit(iter(data))
        seconds = time.perf_counter() - began
        on_gpu = {k: v.detach().cpu() for k, v in trainer.saes["sae"].state_dict().items()}
        resumed = Trainer({"sae": copy.deepcopy(sae)}, cfg, scratch, device=torch.device("cpu"))
        resumed.fit(iter(data))
        on_cpu = resumed.saes["sae"].state_dict()
    same = all(torch.equal(on_gpu[k], on_cpu[k].detach()) for k in on_gpu)
    return same, batch * steps / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cpu-repeats", type=int, default=2)
    parser.add_argument("--trainer-steps", type=int, default=30)
    parser.add_argument(
        "--device",
        default="cuda",
        help="the device checked against the CPU (cpu: a dry run of the script)",
    )
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run this on a machine with a GPU")
    gpu = torch.device(args.device)
    n, d, k = args.batch, args.d_in, args.k
    d_sae = d * args.expansion
    torch.manual_seed(0)
    x_cpu = torch.randn(n, d) * 3 + 0.5
    x_gpu = x_cpu.to(gpu)
    print(f"{describe_device(gpu)}; torch {torch.__version__}; batch {n}, d_in {d}, "
          f"d_sae {d_sae}, k {k}; CPU threads {torch.get_num_threads()}")  # fmt: skip
    rows, failures = [], []
    for name in sorted(ARCHITECTURES):
        reference = make(name, d, d_sae, k).double()
        ref_loss, _ = first_loss(reference, x_cpu.double(), False)
        losses = {}
        for label, autocast in (("fp32", False), ("bf16", True)):
            sae = make(name, d, d_sae, k).to(gpu)
            losses[label], finite = first_loss(sae, x_gpu, autocast)
            if not finite:
                failures.append(f"{name} {label}: a gradient is not finite")
        rel = {key: abs(v - ref_loss) / max(abs(ref_loss), 1e-12) for key, v in losses.items()}
        if not rel["fp32"] < FP32_TOLERANCE:
            failures.append(f"{name}: fp32 loss {losses['fp32']} vs float64 {ref_loss}")
        if not rel["bf16"] < BF16_TOLERANCE:
            failures.append(f"{name}: bf16 loss {losses['bf16']} vs float64 {ref_loss}")
        # One trained step on each device, then the inference encoders compared.
        sae_gpu, sae_cpu = make(name, d, d_sae, k).to(gpu), make(name, d, d_sae, k)
        step_fn(sae_gpu, x_gpu, False)()
        step_fn(sae_cpu, x_cpu, False)()
        with torch.no_grad():
            f_gpu = sae_gpu.eval().encode(x_gpu[:256]).cpu()
            f_cpu = sae_cpu.eval().encode(x_cpu[:256])
        enc_rel = float((f_gpu - f_cpu).norm() / f_cpu.norm().clamp_min(1e-12))
        rates = {}
        for label, autocast in (("fp32", False), ("bf16", True)):
            step = step_fn(make(name, d, d_sae, k).to(gpu).train(), x_gpu, autocast)

            def synced(step=step) -> None:  # type: ignore[no-untyped-def]
                step()
                if gpu.type == "cuda":
                    torch.cuda.synchronize(gpu)

            rates[label] = n / timed(synced, args.repeats)
        rates["cpu"] = n / timed(step_fn(make(name, d, d_sae, k).train(), x_cpu, False),
                                 args.cpu_repeats)  # fmt: skip
        rows.append((name, rel["fp32"], rel["bf16"], enc_rel, rates))
    same, trainer_rate = trainer_check(gpu, d, args.trainer_steps)
    if not same:
        failures.append("the GPU trainer's checkpoint resumed on the CPU gave other weights")
    print(
        f"{'architecture':<12} {'fp32 vs f64':>11} {'bf16 vs f64':>11} {'encode':>9} "
        f"{'GPU fp32 tok/s':>15} {'GPU bf16 tok/s':>15} {'CPU tok/s':>10} {'GPU/CPU':>8}"
    )
    for name, r32, r16, enc, rates in rows:
        print(f"{name:<12} {r32:>11.1e} {r16:>11.1e} {enc:>9.1e} {rates['fp32']:>15,.0f} "
              f"{rates['bf16']:>15,.0f} {rates['cpu']:>10,.0f} "
              f"{rates['fp32'] / rates['cpu']:>7.1f}x")  # fmt: skip
    print(
        f"default trainer on the GPU ({args.trainer_steps} steps, d_sae {8 * d}): "
        f"{trainer_rate:,.0f} tok/s incl. start-up; checkpoint resumed on the CPU: "
        f"{'identical weights' if same else 'DIFFERENT weights'}"
    )
    for failure in failures:
        print("FAILED:", failure)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
