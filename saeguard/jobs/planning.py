"""Plan the main job from a time budget: measure this machine, then size every step to fit.

Machines differ by 2x or more (an AVX2-only 2-core CPU runs the model forward and the GEMMs at
about half the speed of an AVX-512 one), so a fixed token count is minutes on one machine and most
of an hour on another. :func:`measure` times what the job's steps are made of, on the machine at
hand and the job's own corpus, in under a minute: the model forward up to the hook in float32 and
bfloat16 (and whether the bfloat16 activations stay within cosine 0.99 of float32's) and the SAE
training step. :func:`plan_run` is a pure function of those rates and the budget, so the
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
HARVEST_EFFICIENCY = 0.79
"""A harvest runs at this fraction of the probe's forward rate (masking draws, exclusions,
shard writes and checksums): 3.83k vs 4.87k tokens/s in bfloat16 on the make-run machine."""
TRAIN_EFFICIENCY = 0.62
"""Training from the cache runs at this fraction of the probe's bare step (shard reads, the
shuffle buffer, AuxK, metrics): 7.3k vs 11.8k tokens/s on the make-run machine."""
FIXED_SECONDS = 75.0
"""Model loads, the probe itself, the held-out FVU pass and the report: measured ~60-70 s."""
MIN_HARVEST = 65_536
MAX_HARVEST = 4_000_000

# Forward-token equivalents per text (or for the whole evaluation), measured from `saeguard run`
# on the embedded SmolLM2 + wiki-en: seconds a step took x the probe's float32 forward rate
# (1,296 tokens/s), / texts. Monitor fit + calibration: 190.6 s for 2,000 texts before the fused
# score; with it the 300 reference and 500 calibration texts also run the LM head (full forward,
# half batches): ~350 s (7.0 min measured beside a niced second job, ~20% slower).
MONITOR_TOKENS_PER_TEXT = 225.0
# OOD benchmark: the full model (LM baselines), longer texts (jailbreaks), k-NN and bootstrap.
BENCHMARK_TOKENS_PER_TEXT = 330.0
# Evaluation (core + CE): a fixed set of contexts; CE runs three full forwards per context
# (73.6 s).
EVAL_TOKENS = 95_000.0

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
    train_rate: float
    """Expected training tokens/s (the probe's rate x TRAIN_EFFICIENCY)."""
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

    def text_seconds(fit: int, calibration: int, negatives: int, shifted: int) -> dict[str, float]:
        return {
            "monitor": MONITOR_TOKENS_PER_TEXT * (fit + calibration) / text_rate,
            "benchmark": BENCHMARK_TOKENS_PER_TEXT * (negatives + shifted * n_shifts) / text_rate,
        }

    eval_s = EVAL_TOKENS / text_rate
    text_cost = sum(text_seconds(fit_texts, calibration_texts, id_texts, per_shift).values())
    # Per harvested activation: its forward plus EPOCHS training steps on it.
    harvest_rate = forward * HARVEST_EFFICIENCY
    train_rate = rates.train * TRAIN_EFFICIENCY
    per_activation = 1 / harvest_rate + EPOCHS / train_rate
    if tokens > 0:
        harvest = max(int(tokens / EPOCHS), 1)
        train_tokens = tokens
        sae_s = harvest / harvest_rate + train_tokens / train_rate
    else:
        sae_s = SAE_SHARE * usable
    left = max(usable - sae_s - eval_s, 0.0)
    if tokens <= 0:
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
        "harvest": harvest / harvest_rate,
        "train": train_tokens / train_rate,
        "eval": eval_s,
        **text_seconds(
            counts["fit_texts"],
            counts["calibration_texts"],
            counts["id_texts"],
            counts["per_shift"],
        ),  # fmt: skip
    }
    return RunPlan(
        dtype=chosen,
        harvest_tokens=harvest,
        train_tokens=train_tokens,
        train_rate=round(train_rate, 1),
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
    corpus: str,
    d_sae_multiple: int,
    k: int,
    device: str = "cpu",
    contexts: int = 32,
) -> Throughput:
    """Time the forward to ``hook`` in float32 and bfloat16 on the first ``contexts`` packed
    contexts of ``corpus`` (train split), compare the two dtypes' activations there (special
    tokens and attention sinks excluded, as in training), and time an SAE training step.
    Takes ~20-40 s on a 2-core CPU.
    """
    import itertools

    from saeguard.activations.source import ActivationSourceConfig, prepare
    from saeguard.models import load_model, run_to_hooks
    from saeguard.sae import SAEConfig, create_sae
    from saeguard.train.optim import SaeOptimizer, default_lr

    rates: dict[str, float] = {}
    acts: dict[str, torch.Tensor] = {}
    tokens = keep = torch.empty(0)
    for dtype in ("float32", "bfloat16"):
        loaded = load_model(model, dtype=dtype, device=device)
        if dtype == "float32":  # the same contexts for both dtypes, packed once
            source_cfg = ActivationSourceConfig(model=model, hooks=[hook], corpus=corpus)
            prepared = prepare(source_cfg, loaded)
            tokens = torch.tensor(list(itertools.islice(prepared.contexts(), contexts)))
            keep = ~prepared.rules.is_special(tokens)
        point = loaded.hook_point(hook)
        with torch.inference_mode():
            run_to_hooks(loaded.model, tokens[:2].to(loaded.device), [point])  # warm-up
            _synchronize(loaded.device)
            start = time.perf_counter()
            out = run_to_hooks(loaded.model, tokens.to(loaded.device), [point])[point.name]
            _synchronize(loaded.device)
            rates[dtype] = tokens.numel() / (time.perf_counter() - start)
        acts[dtype] = out.float().cpu()
        d_in = loaded.d_model
        del loaded
    norms = acts["float32"].norm(dim=-1)
    keep &= norms < 10 * norms[keep].median()  # attention sinks, as the harvest's default rule
    cosine = float(
        torch.nn.functional.cosine_similarity(acts["float32"][keep], acts["bfloat16"][keep]).mean()
    )
    generator = torch.Generator().manual_seed(0)

    sae = create_sae(SAEConfig(architecture="topk", d_in=d_in, d_sae=d_in * d_sae_multiple, k=k))
    sae.to(device)  # created (and seeded) on the CPU, timed where the job trains
    optimizer = SaeOptimizer(sae, "signsgd", default_lr("signsgd", sae.cfg.d_sae), True)
    x = torch.randn(4096, d_in, generator=generator).to(device)
    steps, start = 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - start < 3.0:
        out_step = sae.training_step(x, None, 1.0)
        optimizer.zero_grad()
        out_step.loss.backward()
        optimizer.step(default_lr("signsgd", sae.cfg.d_sae))
        _synchronize(x.device)
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


def _synchronize(device: torch.device) -> None:
    """Wait for a GPU's queued kernels, so that a timer measures them (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def retarget_training(plan: dict[str, Any], spent_s: float, batch_tokens: int = 4096) -> int:
    """Training tokens that fit what is left of the budget once the harvest is done.

    The probe's rates are estimates; the harvest's real cost is known when it ends. Training
    takes what remains after the steps still to come (their expected costs and half the fixed
    allowance), between one pass over the cache and twice the planned tokens.
    """
    expected = plan["expected_s"]
    later = expected["eval"] + expected["monitor"] + expected["benchmark"] + expected["fixed"] / 2
    available = max(plan["budget_s"] - spent_s - later, 0.0)
    tokens = int(available * plan["train_rate"]) // batch_tokens * batch_tokens
    low = -(-plan["harvest_tokens"] // batch_tokens) * batch_tokens
    return int(min(max(tokens, low), 2 * plan["train_tokens"]))
