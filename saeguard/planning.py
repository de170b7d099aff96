"""Plan the main job from a time budget: measure this machine, then size every step to fit.

Machines differ by 2x or more (an AVX2-only 2-core CPU runs the model forward and the GEMMs at
about half the speed of an AVX-512 one), so a fixed token count is minutes on one machine and most
of an hour on another. :func:`measure` times what the job's steps are made of, on the machine at
hand, in under a minute: the model forward up to the hook in float32 and bfloat16 (and whether the
bfloat16 activations stay within cosine 0.99 of float32's), the full forward with the LM head, and
the SAE training step. :func:`plan_run` is a pure function of those rates and the budget, so the
rule can be tested on fake rates and read in one place:

1. every step's cost is expressed in units the probe measured: harvest tokens at the forward rate,
   training tokens at the training rate, text-based steps (evaluation, monitor fit and
   calibration, the OOD benchmark) as "forward-token equivalents" per text, constants measured
   from a real run and kept below;
2. ``SAE_SHARE`` of the budget (after a fixed allowance for model loads) goes to the SAE: harvest
   ``H`` activations and train on ``EPOCHS x H`` of them (repeats cost a fifth of a harvested
   token, and the schedule-free sign-SGD trainer keeps improving on them: docs/training.md);
3. the rest is spread over the text-based steps in proportion to their full-size costs; when it
   cannot pay for the defaults, every text count shrinks by the same factor, down to floors that
   keep the statistics meaningful.

Half the speed therefore gives about half the tokens and texts in the same wall time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

SAE_SHARE = 0.5
"""Fraction of the budget (after the fixed allowance) spent harvesting and training the SAE."""
EPOCHS = 2.0
"""Training tokens per harvested activation (passes over the masked cache)."""
FIXED_SECONDS = 75.0
"""Model loads, the probe itself, the held-out FVU pass and the report: measured ~60-70 s."""
MIN_HARVEST = 65_536
MAX_HARVEST = 4_000_000

# Forward-token equivalents per text (or per eval context), measured from `saeguard run` on the
# embedded SmolLM2 + wiki-en: seconds a step took x the probe's hook-forward rate, / texts.
# Monitor fit/calibration: ~128-token windows to the hook plus the SAE and statistics.
MONITOR_TOKENS_PER_TEXT = 150.0
# OOD benchmark: the full model (LM baselines), longer texts (jailbreaks), k-NN and bootstrap.
BENCHMARK_TOKENS_PER_TEXT = 330.0
# Evaluation (core + CE): a fixed set of contexts; CE runs three full forwards per context.
EVAL_TOKENS = 90_000.0

FLOORS = {"fit_texts": 300, "calibration_texts": 200, "id_texts": 200, "per_shift": 60}
"""Smallest text counts a plan may give (below them AUROC intervals and the 5% threshold are
too loose to report)."""


@dataclass(frozen=True)
class Throughput:
    """What the probe measured on this machine (all rates in tokens per second)."""

    forward_float32: float
    """Model forward up to the hook, float32."""
    forward_bfloat16: float
    """Same in bfloat16 (0 when not measured)."""
    bfloat16_cosine: float
    """Mean cosine of bfloat16 vs float32 activations at the hook (sinks excluded)."""
    train: float
    """SAE training step (TopK, the job's width and k)."""
    cpu_flags: str = ""
    """Instruction sets that decide the bfloat16 speed (avx512_bf16, amx_bf16, avx2...)."""

    @property
    def bfloat16_ok(self) -> bool:
        """bfloat16 is used only when it is both faster and faithful (cosine >= 0.99)."""
        return self.forward_bfloat16 > self.forward_float32 and self.bfloat16_cosine >= 0.99

    @property
    def forward(self) -> float:
        """The rate of the dtype the job will use."""
        return self.forward_bfloat16 if self.bfloat16_ok else self.forward_float32

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bfloat16_ok": self.bfloat16_ok}


@dataclass(frozen=True)
class RunPlan:
    """How much of everything the job does, and what it expects that to cost."""

    dtype: str
    """Model dtype of the harvest and of every later forward."""
    harvest_tokens: int
    """Activations harvested into the masked cache."""
    train_tokens: int
    """SAE training tokens (passes over the cache)."""
    fit_texts: int
    calibration_texts: int
    id_texts: int
    per_shift: int
    budget_s: float
    """The budget the plan was made for."""
    expected_s: dict[str, float]
    """Expected seconds per step."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_run(
    budget_s: float,
    rates: Throughput,
    *,
    n_shifts: int,
    fit_texts: int,
    calibration_texts: int,
    id_texts: int,
    per_shift: int,
    tokens: int = 0,
    dtype: str = "auto",
    eval_scale: float = 1.0,
) -> RunPlan:
    """Size the job to ``budget_s`` seconds on a machine with ``rates``.

    The text counts given are the full-size defaults (the most a plan gives); ``tokens`` > 0
    fixes the training tokens (harvesting ``tokens / EPOCHS``) instead of planning them;
    ``dtype`` other than auto overrides the probe's choice of harvest dtype.
    """
    chosen = dtype if dtype != "auto" else ("bfloat16" if rates.bfloat16_ok else "float32")
    forward = rates.forward_bfloat16 if chosen == "bfloat16" else rates.forward_float32
    usable = max(budget_s - FIXED_SECONDS, 0.0)
    # Evaluation, monitor and benchmark load the model in float32 whatever the harvest used.
    text_rate = rates.forward_float32
    full = {
        "eval": EVAL_TOKENS * eval_scale / text_rate,
        "monitor": MONITOR_TOKENS_PER_TEXT * (fit_texts + calibration_texts) / text_rate,
        "benchmark": BENCHMARK_TOKENS_PER_TEXT * (id_texts + per_shift * n_shifts) / text_rate,
    }
    text_cost = full["monitor"] + full["benchmark"]
    # Per harvested activation: its forward plus EPOCHS training steps on it.
    per_activation = 1 / forward + EPOCHS / rates.train
    if tokens > 0:
        harvest = max(int(tokens / EPOCHS), 1)
        train_tokens = tokens
        sae_s = harvest / forward + train_tokens / rates.train
        left = max(usable - sae_s - full["eval"], 0.0)
    else:
        sae_s = SAE_SHARE * usable
        left = max(usable - sae_s - full["eval"], 0.0)
        if left > text_cost:  # the texts are paid in full: the rest makes a better SAE
            sae_s += left - text_cost
            left = text_cost
        harvest = min(max(int(sae_s / per_activation), MIN_HARVEST), MAX_HARVEST)
        train_tokens = int(EPOCHS * harvest)
    scale = min(1.0, left / text_cost) if text_cost > 0 else 1.0

    def shrink(name: str, value: int) -> int:
        return max(min(FLOORS[name], value), int(value * scale))

    counts = {
        "fit_texts": shrink("fit_texts", fit_texts),
        "calibration_texts": shrink("calibration_texts", calibration_texts),
        "id_texts": shrink("id_texts", id_texts),
        "per_shift": shrink("per_shift", per_shift),
    }
    expected = {
        "fixed": FIXED_SECONDS,
        "harvest": harvest / forward,
        "train": train_tokens / rates.train,
        "eval": full["eval"],
        "monitor": MONITOR_TOKENS_PER_TEXT
        * (counts["fit_texts"] + counts["calibration_texts"])
        / text_rate,
        "benchmark": BENCHMARK_TOKENS_PER_TEXT
        * (counts["id_texts"] + counts["per_shift"] * n_shifts)
        / text_rate,
    }
    return RunPlan(
        dtype=chosen,
        harvest_tokens=harvest,
        train_tokens=train_tokens,
        budget_s=budget_s,
        expected_s={k: round(v, 1) for k, v in expected.items()},
        **counts,
    )


def cpu_flags() -> str:
    """The instruction sets that decide bfloat16 and GEMM speed, from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            words = set(handle.read().split())
    except OSError:
        return ""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return " ".join(w for w in wanted if w in words)


def measure(
    model: str,
    hook: str,
    d_sae_multiple: int,
    k: int,
    device: str = "cpu",
    contexts: int = 32,
    ctx_len: int = 128,
) -> Throughput:
    """Time the forward to ``hook`` in float32 and bfloat16, and an SAE training step.

    Uses real text (the first ``contexts`` packed contexts of wiki-en's train split would need
    the corpus; random token ids suffice for speed, and the cosine check uses them too, since
    bfloat16's error does not depend on which tokens are read). Takes ~20-40 s.
    """
    from saeguard.models import load_model, run_to_hooks
    from saeguard.sae import SAEConfig, create_sae
    from saeguard.train.optim import SaeOptimizer, default_lr

    generator = torch.Generator().manual_seed(0)
    rates: dict[str, float] = {}
    acts: dict[str, torch.Tensor] = {}
    for dtype in ("float32", "bfloat16"):
        loaded = load_model(model, dtype=dtype, device=device)
        point = loaded.hook_point(hook)
        vocab = int(loaded.model.config.vocab_size)
        tokens = torch.randint(0, vocab, (contexts, ctx_len), generator=generator)
        tokens = tokens.to(loaded.device)
        with torch.inference_mode():
            run_to_hooks(loaded.model, tokens[:2], [point])  # warm-up
            start = time.perf_counter()
            out = run_to_hooks(loaded.model, tokens, [point])[point.name]
            rates[dtype] = tokens.numel() / (time.perf_counter() - start)
        acts[dtype] = out.float().cpu()[:, 1:].reshape(-1, out.shape[-1])  # position 0: a sink
        generator = torch.Generator().manual_seed(0)  # the same tokens for both dtypes
        d_in = loaded.d_model
        del loaded
    cosine = float(torch.nn.functional.cosine_similarity(acts["float32"], acts["bfloat16"]).mean())

    sae = create_sae(SAEConfig(architecture="topk", d_in=d_in, d_sae=d_in * d_sae_multiple, k=k))
    optimizer = SaeOptimizer(sae, "signsgd", default_lr("signsgd", sae.cfg.d_sae), True)
    x = torch.randn(4096, d_in, generator=generator)
    steps, start = 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - start < 3.0:
        out_step = sae.training_step(x, None, 1.0)
        optimizer.zero_grad()
        out_step.loss.backward()
        optimizer.step(default_lr("signsgd", sae.cfg.d_sae))
        steps += 1
        if steps == 1:
            start = time.perf_counter()  # the first step pays for allocations
    train_rate = (steps - 1) * len(x) / (time.perf_counter() - start)
    result = Throughput(
        forward_float32=rates["float32"],
        forward_bfloat16=rates["bfloat16"],
        bfloat16_cosine=cosine,
        train=train_rate,
        cpu_flags=cpu_flags(),
    )
    log.info(
        "throughput: forward %s tok/s float32, %s bfloat16 (cosine %.4f), SAE training %s tok/s "
        "[%s]",
        f"{result.forward_float32:,.0f}",
        f"{result.forward_bfloat16:,.0f}",
        cosine,
        f"{train_rate:,.0f}",
        result.cpu_flags or "CPU flags unknown",
    )
    return result
