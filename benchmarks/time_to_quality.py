"""Held-out FVU against training tokens and seconds, for each optimiser setting, on one cache.

    python benchmarks/time_to_quality.py --acts CACHE [--milestones 131072,327680,1048576,2097152]
        [--settings default,adam] [--reference-tokens 327680] [--out runs/ttq]

Every setting trains a TopK SAE (k=32, 16x by default) on the same shuffled batches of the
cache (cycled when the budget exceeds it) and is scored on the same held-out activations: the
validation split, harvested with the cache's own exclusion rules (attention sinks out), unmasked.

- Settings with schedule-free averaging are anytime: one run to the largest milestone, scored
  every ``--eval-every`` tokens. Settings with a decaying LR are scored by separate runs, one per
  milestone, each with its own full schedule (scoring the middle of a longer run would be unfair).
- The reference is a plain dense PyTorch TopK step with Adam (lr 2e-4 x sqrt(16384 / d_sae), no
  schedule) written here, run anytime to ``--reference-tokens``, so every ratio is measured in the
  same run on the same machine.

Prints one table row per setting: FVU at each milestone, training tokens/s and its ratio to the
reference, and the tokens (and seconds) each needs to first reach FVU 0.30 and 0.25. Writes
``ttq.json`` with every curve to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from saeguard.activations import CachedActivationSource, ShuffleBuffer
from saeguard.fileio import atomic_write_json
from saeguard.jobs.train import TrainJobConfig, source_config_from_cache
from saeguard.sae import config_class, create_sae, make_sae_config
from saeguard.sae.base import normalized_mse
from saeguard.train import Trainer, TrainerConfig, evaluate_reconstruction, held_out_activations

# name -> trainer settings (everything else: saeguard's defaults)
SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "adam": {"optimizer": "adam", "schedule_free": False},
    "adam-sf": {"optimizer": "adam", "schedule_free": True},
    "signsgd-nosf": {"optimizer": "signsgd", "schedule_free": False},
}
THRESHOLDS = (0.30, 0.25)


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    """``name`` from SETTINGS, or ``name:key=value,key=value`` on top of the defaults."""
    name, _, overrides = text.partition(":")
    settings = dict(SETTINGS.get(name, {}))
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        settings[key] = json.loads(value) if re.match(r"^[-\d.eE+]+$|^(true|false)$", value) \
            else value  # fmt: skip
    return text, settings


def held_out(acts: str, tokens: int, out: Path) -> torch.Tensor:
    """Validation-split activations with the cache's rules, saved once under ``out``."""
    path = out / f"held_out_{tokens}.safetensors"
    if path.is_file():
        return load_file(str(path))["acts"]
    source = CachedActivationSource(acts)
    job = source_config_from_cache(TrainJobConfig(out=str(out), acts=acts), source.cache)
    medians = source.cache.manifest["exclusions"].get("median_norms")
    x = held_out_activations(job, source.hook, tokens, medians)
    assert x is not None
    out.mkdir(parents=True, exist_ok=True)
    save_file({"acts": x.contiguous()}, str(path))
    return x


def batches(acts: str, batch: int, seed: int) -> ShuffleBuffer:
    return ShuffleBuffer(CachedActivationSource(acts, cycle=True), batch, 262_144, seed=seed)


def train_saeguard(
    acts: str, x_eval: torch.Tensor, settings: dict[str, Any], tokens: int, every: int,
    args: argparse.Namespace, out: Path,
) -> tuple[list[tuple[int, float, float]], float]:  # fmt: skip
    """(curve of (tokens, seconds, FVU), training tokens/s) of one saeguard run."""
    source = CachedActivationSource(acts)
    d = source.d_model
    sae_fields = {f.name for f in dataclasses.fields(config_class("topk"))}
    cfg = make_sae_config("topk", d_in=d, d_sae=d * args.expansion, k=args.k,
                          **{k: v for k, v in settings.items() if k in sae_fields})  # fmt: skip
    trainer_settings = {k: v for k, v in settings.items() if k not in sae_fields}
    trainer_cfg = TrainerConfig(tokens=tokens, batch_tokens=args.batch, checkpoint_every=0,
                                checkpoint_minutes=0, log_every=10**9,
                                **trainer_settings)  # fmt: skip
    trainer = Trainer({"sae": create_sae(cfg)}, trainer_cfg, out)  # a fresh directory each
    curve: list[tuple[int, float, float]] = []
    clock = {"train": 0.0, "last": time.perf_counter()}

    def score(t: Trainer) -> None:
        now = time.perf_counter()
        clock["train"] += now - clock["last"]
        seen = t.step * args.batch
        if every and (seen // every > (seen - args.batch) // every or t.step == t.cfg.steps):
            fvu = evaluate_reconstruction(t.folded("sae"), x_eval)["fvu"]
            curve.append((seen, clock["train"], fvu))
        clock["last"] = time.perf_counter()

    trainer.fit(batches(acts, args.batch, args.seed), on_step=score)
    final = evaluate_reconstruction(trainer.folded("sae"), x_eval)
    if not every:
        curve.append((tokens, clock["train"], final["fvu"]))
    print(
        f"  {tokens:,} tokens: FVU {final['fvu']:.3f}, L0 {final['l0']:.1f}, dead "
        f"{100 * final['dead_frac']:.1f}% of latents on the held-out set",
        flush=True,
    )
    return curve, trainer.step * args.batch / max(clock["train"], 1e-9)


def train_dense_reference(
    acts: str, x_eval: torch.Tensor, tokens: int, every: int, args: argparse.Namespace
) -> tuple[list[tuple[int, float, float]], float]:
    """A plain dense TopK SAE with Adam: dense decode, autograd through a full latent matrix."""
    torch.manual_seed(args.seed)
    stream = iter(batches(acts, args.batch, args.seed))
    first = next(stream)
    d, n, k = first.shape[1], first.shape[1] * args.expansion, args.k
    scale = math.sqrt(d) / float(first.norm(dim=-1).pow(2).mean().sqrt())
    w_dec = torch.randn(n, d)
    w_dec /= w_dec.norm(dim=-1, keepdim=True)
    w_dec = torch.nn.Parameter(w_dec)
    w_enc = torch.nn.Parameter(w_dec.detach().t().clone())
    b_enc = torch.nn.Parameter(torch.zeros(n))
    b_dec = torch.nn.Parameter((first * scale).mean(0))
    params = [w_enc, b_enc, w_dec, b_dec]
    opt = torch.optim.Adam(params, lr=2e-4 * math.sqrt(16_384 / n))

    def fvu() -> float:
        with torch.no_grad():
            pre = (x_eval * scale - b_dec) @ w_enc + b_enc
            values, indices = pre.topk(k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, indices, values.relu())
            return float(normalized_mse(x_eval * scale, f @ w_dec + b_dec))

    curve, seconds, seen = [], 0.0, 0
    batch = first
    while seen < tokens:
        start = time.perf_counter()
        x = batch * scale
        pre = (x - b_dec) @ w_enc + b_enc
        values, indices = pre.topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        loss = normalized_mse(x, f @ w_dec + b_dec)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            w_dec.div_(w_dec.norm(dim=-1, keepdim=True))
        seconds += time.perf_counter() - start
        seen += len(batch)
        if every and (seen // every > (seen - len(batch)) // every or seen >= tokens):
            curve.append((seen, seconds, fvu()))
        batch = next(stream)
    return curve, seen / max(seconds, 1e-9)


def first_reaching(curve: list[tuple[int, float, float]], threshold: float) -> str:
    for tokens, seconds, fvu in curve:
        if fvu <= threshold:
            return f"{tokens / 1000:,.0f}k ({seconds:,.0f} s)"
    return "not reached"


def at(curve: list[tuple[int, float, float]], tokens: int) -> float | None:
    """FVU scored after exactly ``tokens`` training tokens, if the curve has that point."""
    points = [fvu for seen, _, fvu in curve if seen == tokens]
    return points[-1] if points else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acts", required=True, help="activation cache (saeguard harvest)")
    parser.add_argument("--milestones", default="131072,327680,1048576,2097152",
                        help="training-token counts to report FVU at")  # fmt: skip
    parser.add_argument("--settings", default="default,adam",
                        help="comma-separated; a name from SETTINGS or NAME:key=value;key=value "
                             "(use ';' between overrides), e.g. 'default:lr=0.003'")  # fmt: skip
    parser.add_argument(
        "--reference-tokens",
        type=int,
        default=327_680,
        help="training tokens of the dense-Adam reference (0: skip it)",
    )
    parser.add_argument(
        "--eval-every", type=int, default=32_768, help="anytime runs: score every this many tokens"
    )
    parser.add_argument("--eval-tokens", type=int, default=16_384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/ttq")
    args = parser.parse_args()
    out = Path(args.out)
    milestones = sorted(int(m) for m in args.milestones.split(","))
    x_eval = held_out(args.acts, args.eval_tokens, out)
    isa = sorted(set(re.findall(r"\b(avx512f|avx512_bf16|amx_bf16|avx2)\b",
                                Path("/proc/cpuinfo").read_text()))) \
        if Path("/proc/cpuinfo").is_file() else []  # fmt: skip
    print(f"cache {args.acts}: {len(CachedActivationSource(args.acts)):,} activations; held-out "
          f"{len(x_eval):,}; TopK k={args.k} {args.expansion}x, batch {args.batch}, "
          f"threads {torch.get_num_threads()}, CPU {' '.join(isa) or 'unknown'}")  # fmt: skip

    results: dict[str, Any] = {"args": vars(args), "cpu_flags": isa, "settings": {}}
    rows = []
    if args.reference_tokens:
        curve, rate = train_dense_reference(args.acts, x_eval, args.reference_tokens,
                                            args.eval_every, args)  # fmt: skip
        rows.append(("dense Adam reference", curve, rate))
        print(f"reference done: {rate:,.0f} tok/s, FVU {curve[-1][2]:.3f}", flush=True)
    for text in filter(None, args.settings.split(",")):
        name, settings = parse_setting(text.replace(";", ","))
        schedule_free = settings.get("schedule_free", TrainerConfig().schedule_free)
        if schedule_free:
            with tempfile.TemporaryDirectory(dir=out) as scratch:
                curve, rate = train_saeguard(args.acts, x_eval, settings, milestones[-1],
                                             args.eval_every, args, Path(scratch))  # fmt: skip
        else:
            curve, rates = [], []
            for tokens in milestones:
                with tempfile.TemporaryDirectory(dir=out) as scratch:
                    point, r = train_saeguard(args.acts, x_eval, settings, tokens, 0, args,
                                              Path(scratch))  # fmt: skip
                curve += point
                rates.append(r)
            rate = sorted(rates)[len(rates) // 2]
        rows.append((name, curve, rate))
        print(f"{name} done: {rate:,.0f} tok/s, FVU {curve[-1][2]:.3f}", flush=True)
        results["settings"][name] = {"settings": settings, "curve": curve, "tokens_per_s": rate}
    reference_rate = rows[0][2] if args.reference_tokens else None
    header = ("| setting | " + " | ".join(f"FVU @ {m / 1000:,.0f}k" for m in milestones)
              + " | train tok/s | x reference | to FVU 0.30 | to FVU 0.25 |")  # fmt: skip
    print(header)
    print("|---" * (len(milestones) + 5) + "|")
    for name, curve, rate in rows:
        cells = [f"{v:.3f}" if (v := at(curve, m)) is not None else "-" for m in milestones]
        ratio = f"{rate / reference_rate:.2f}" if reference_rate else "-"
        print(f"| {name} | " + " | ".join(cells) + f" | {rate:,.0f} | {ratio} | "
              + " | ".join(first_reaching(curve, t) for t in THRESHOLDS) + " |")  # fmt: skip
    if args.reference_tokens:
        results["reference"] = {"curve": rows[0][1], "tokens_per_s": rows[0][2]}
    atomic_write_json(out / "ttq.json", results)


if __name__ == "__main__":
    main()
