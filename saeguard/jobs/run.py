"""`saeguard run`: the main job, end to end, resumable, sized to a time budget.

0. plan: time the model forward (float32 and bfloat16), and an SAE training step, on this
   machine; size every step to ``--time-budget`` (:mod:`saeguard.jobs.planning`); the plan and the
   measurements are recorded in ``run.json`` and reused on every re-run;
1. harvest: masked regularization happens here (input tokens are replaced before the model runs),
   into a sharded, checksummed activation cache that resumes per shard;
2. train a TopK SAE from that cache (several passes), checkpointing every N steps and at least
   every two minutes; a resume reads the cache again instead of running the model;
3. evaluate it (core reconstruction metrics and CE loss recovered);
4. fit the OOD monitor on ID text and calibrate its threshold on held-out ID text;
5. run the OOD benchmark (every score and baseline on every shift);
6. write ``index.html``, which links everything.

Each step leaves its result on disk; running the same command again skips finished steps and
resumes an unfinished one where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from saeguard.configs import validate_literals
from saeguard.defaults import DEFAULT_EXPANSION, DEFAULT_K
from saeguard.devices import describe_device, resolve_device
from saeguard.distributed import join_world, part_ways
from saeguard.errors import ConfigError
from saeguard.fileio import atomic_write_json, claim_output_directory, sha256_file
from saeguard.jobs.ood import OodBenchmarkConfig
from saeguard.jobs.target import TargetConfig
from saeguard.ood.config import MonitorConfig
from saeguard.steps import Step, read_record
from saeguard.train.trainer import TrainerConfig

log = logging.getLogger(__name__)

STEPS = ("plan", "harvest", "train", "eval", "monitor", "benchmark", "report")


@dataclass(kw_only=True)
class RunConfig(TargetConfig):
    """The main job on one model, hook and ID corpus (defaults: the embedded SmolLM2 + wiki-en)."""

    out: str = "runs/default"
    """Directory for every step's output and index.html."""
    time_budget: float = 30.0
    """Minutes for the whole job: the first minute measures this machine and sizes the harvest,
    the training and the text counts to fit (see docs/training.md)."""
    tokens: int = 0
    """SAE training tokens (0: planned from --time-budget); the cache holds half as many."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Model dtype of the harvest (auto: bfloat16 only if the probe finds it faster and within
    cosine 0.99 of float32 on this machine)."""
    mask_prob: float = 0.1
    """Masked regularization: probability that an input token is replaced by the mask token."""
    k: int = DEFAULT_K
    """TopK sparsity."""
    expansion: int = DEFAULT_EXPANSION
    """d_sae / d_model."""
    quick: bool = False
    """Smoke-test scale (minutes): few tokens, texts and a 4x SAE. Not a result."""
    threads: int = 0
    """Torch CPU threads (0: library default)."""
    train: TrainerConfig = field(default_factory=lambda: TrainerConfig(checkpoint_every=50))
    """How the SAE is optimised (its token count and shuffle buffer are planned, not set)."""
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    """How the OOD monitor is fitted and calibrated (text counts are upper bounds: the plan
    may give fewer)."""
    benchmark: OodBenchmarkConfig = field(default_factory=OodBenchmarkConfig)
    """What the OOD benchmark scores (text counts are upper bounds: the plan may give fewer)."""

    PLANNED = ("train.tokens", "train.buffer_tokens")
    """Settings of the sub-configs the plan decides (not options of `saeguard run`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_literals(self)
        if self.quick:
            self.tokens = self.tokens or 24_576
            self.expansion = min(self.expansion, 4)
            self.monitor = replace(
                self.monitor,
                fit_texts=min(self.monitor.fit_texts, 120),
                calibration_texts=min(self.monitor.calibration_texts, 60),
            )
            self.benchmark = replace(
                self.benchmark,
                id_texts=min(self.benchmark.id_texts, 40),
                per_shift=min(self.benchmark.per_shift, 20),
            )
        if self.tokens and self.tokens < 8192:
            raise ConfigError(
                f"--tokens must be 0 (planned) or at least two batches (8192), got {self.tokens}"
            )
        if not 0 <= self.mask_prob < 1:
            raise ConfigError(f"--mask-prob must lie in [0, 1), got {self.mask_prob}")
        if not self.time_budget > 0:
            raise ConfigError(f"--time-budget must be a positive number of minutes, got "
                              f"{self.time_budget}")  # fmt: skip


def run(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) every step; returns the run summary written to ``run.json``."""
    from saeguard.jobs.eval import EvalConfig, run_eval
    from saeguard.jobs.harvest import HarvestConfig, harvest
    from saeguard.jobs.ood import run_benchmark
    from saeguard.jobs.planning import retarget_training
    from saeguard.jobs.train import TrainJobConfig, run_training
    from saeguard.ood import Monitor

    device = resolve_device(cfg.device)  # a missing GPU fails before anything is written
    world = join_world(device)  # under torchrun: harvest and train data-parallel, rank 0 the rest
    out = Path(cfg.out)
    world.on_main(lambda: claim_output_directory(out, "run", index=("run.json",)))
    state_path = out / "run.json"
    state: dict[str, Any] = read_record(state_path) or {}  # unreadable: every step re-checked
    steps = state.get("steps")
    if state and not (isinstance(steps, dict) and all(isinstance(v, dict) for v in steps.values())):
        log.warning("%s has an unexpected form: re-checking every step", state_path)
        state = {}
    state["config"] = asdict(cfg)
    state["device"] = describe_device(device)  # of this invocation; no step's signature has it
    state["world_size"] = world.size
    state.setdefault("steps", {})
    sae_dir, monitor_dir, ood_dir = out / "sae", out / "monitor", out / "ood"
    acts_dir = out / "acts"

    def step(name: str, signature: str) -> Step:
        return Step(state_path, signature, name=name, document=state)

    def record(name: str, signature: str, **payload: Any) -> None:
        if world.is_main:  # rank 0 alone writes run.json
            step(name, signature).record(**payload)

    started = time.perf_counter()
    log.info("step 0/6: measure this machine and plan the job for %.0f minutes", cfg.time_budget)
    plan_signature = json.dumps(
        _plan_inputs(cfg),
        sort_keys=True,
    )
    if step("plan", plan_signature).done():
        plan = state["steps"]["plan"]["plan"]
        log.info("reusing the recorded plan: %s", _describe_plan(plan))
    else:

        def make_plan() -> dict[str, Any]:  # rank 0 measures; every rank follows its plan
            start = time.perf_counter()
            plan = _make_plan(cfg, str(device))
            log.info("plan: %s", _describe_plan(plan))
            if sum(plan["expected_s"].values()) > 1.1 * plan["budget_s"]:
                log.warning(
                    "--time-budget %.0f min cannot pay for the smallest text counts on this "
                    "machine: expect about %.0f min (raise the budget, or lower "
                    "--per-shift/--id-texts)", cfg.time_budget,
                    sum(plan["expected_s"].values()) / 60,
                )  # fmt: skip
            step("plan", plan_signature).record(seconds=time.perf_counter() - start, plan=plan,
                                                throughput=plan.pop("throughput"))  # fmt: skip
            return plan

        plan = world.gather_json(world.on_main(make_plan))[0]
        state["steps"].setdefault("plan", {"plan": plan})

    log.info("step 1/6: harvest %s masked activations (p=%s) into %s",
             f"{plan['harvest_tokens']:,}", cfg.mask_prob, acts_dir)  # fmt: skip
    # What both the harvest and the training read: the same model, hook and documents.
    source: dict[str, Any] = {"model": cfg.model, "hooks": [cfg.hook], "corpus": cfg.corpus,
                              "split": "train", "threads": cfg.threads,
                              "device": str(device)}  # fmt: skip
    harvest_cfg = HarvestConfig(
        out=str(acts_dir),
        tokens=plan["harvest_tokens"],
        mask_prob=cfg.mask_prob,
        dtype=plan["dtype"],
        **source,
    )
    harvest_signature = json.dumps(harvest_cfg.identity(), sort_keys=True)
    if not step("harvest", harvest_signature).done():
        start = time.perf_counter()
        harvest(harvest_cfg)
        record("harvest", harvest_signature, seconds=time.perf_counter() - start)

    if "train_tokens_final" not in plan:  # decided once, recorded, reused by every resume
        spent = sum(
            state["steps"].get(step, {}).get("seconds", 0.0) for step in ("plan", "harvest")
        )
        # Timing-dependent: rank 0 decides, every rank trains on its number.
        plan["train_tokens_final"] = world.gather_json(
            plan["train_tokens"] if cfg.tokens else retarget_training(plan, spent)
        )[0]
        state["steps"]["plan"]["plan"] = plan
        if world.is_main:
            atomic_write_json(state_path, state)
        log.info("the harvest took %.1f min: training on %s tokens (planned %s)", spent / 60,
                 f"{plan['train_tokens_final']:,}", f"{plan['train_tokens']:,}")  # fmt: skip

    trainer = asdict(cfg.train) | {
        "tokens": plan["train_tokens_final"],
        # the pool needs no more than the cache: it would hold copies of it
        "buffer_tokens": max(8192, min(262_144, plan["harvest_tokens"])),
    }
    job = TrainJobConfig(
        out=str(sae_dir),
        acts=str(acts_dir),
        architectures=["topk"],
        k=[cfg.k],
        expansion=[cfg.expansion],
        **source,
        **trainer,
    )
    eval_cfg = EvalConfig(
        evals=["core", "ce"], quick=cfg.quick, threads=cfg.threads, device=str(device)
    )
    monitor_cfg = replace(
        cfg.monitor, fit_texts=plan["fit_texts"], calibration_texts=plan["calibration_texts"]
    )
    bench_cfg = replace(cfg.benchmark, id_texts=plan["id_texts"], per_shift=plan["per_shift"])
    signatures = {  # the device is left out (as "cpu", where runs before it recorded it):
        # a run started on a GPU resumes on the CPU and the other way round
        "train": json.dumps(asdict(job) | {"device": "cpu"}, sort_keys=True, default=str),
        "monitor": json.dumps(asdict(monitor_cfg), sort_keys=True),
        "benchmark": json.dumps(asdict(bench_cfg), sort_keys=True),
    }

    log.info("step 2/6: train a TopK SAE on %s tokens of the cache",
             f"{plan['train_tokens_final']:,}")  # fmt: skip
    if not step("train", signatures["train"]).done():
        start = time.perf_counter()
        results = run_training(job)  # ends the ranks' shared work: rank 0 goes on alone
        record("train", signatures["train"], seconds=time.perf_counter() - start,
               results=results)  # fmt: skip
    world = part_ways(world)
    if not world.is_main:
        return state
    weights = sha256_file(sae_dir / "sae_weights.safetensors")

    log.info("step 3/6: evaluate the SAE (core metrics, CE loss recovered)")
    start = time.perf_counter()
    evaluation = run_eval(sae_dir, eval_cfg)  # resumes per eval by itself
    step("eval", weights).record(seconds=time.perf_counter() - start)

    log.info("step 4/6: fit the OOD monitor and calibrate it on held-out ID text")
    monitor_sig = signatures["monitor"] + weights
    if not (step("monitor", monitor_sig).done() and (monitor_dir / "monitor.json").is_file()):
        start = time.perf_counter()
        monitor = Monitor.fit(sae_dir, monitor_cfg, device=device)
        monitor.calibrate()
        monitor.save(monitor_dir)
        step("monitor", monitor_sig).record(seconds=time.perf_counter() - start)

    log.info("step 5/6: OOD benchmark (%d shifts)", len(bench_cfg.shifts))
    start = time.perf_counter()
    document = run_benchmark(monitor_dir, ood_dir, bench_cfg, device)  # resumes per text set
    bench_sig = signatures["benchmark"] + monitor_sig
    step("benchmark", bench_sig).record(seconds=time.perf_counter() - start)

    log.info("step 6/6: write the report")
    state["wall_seconds_this_invocation"] = round(time.perf_counter() - started, 1)
    state["step_seconds_total"] = round(
        sum(state["steps"].get(step, {}).get("seconds", 0.0) for step in STEPS), 1
    )
    from saeguard.report.run_report import write_run_report

    curve = training_curve(sae_dir / "metrics.jsonl")
    index = write_run_report(out, state, document, evaluation, curve)
    state["report"] = str(index)
    atomic_write_json(state_path, state)
    log.info("done: open %s", index)
    return state


def training_curve(metrics_path: Path) -> list[tuple[int, float]]:
    """(activations seen, training FVU) of each line of a training's metrics.jsonl (a torn
    last line, written when a kill interrupted it, is skipped)."""
    if not metrics_path.is_file():
        return []
    curve = []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        value = next((v for k, v in row.items() if k.endswith("/fvu")), None)
        if value is not None:
            curve.append((int(row["tokens"]), float(value)))
    return curve


def _plan_inputs(cfg: RunConfig) -> dict[str, Any]:
    """The settings the plan depends on (the same keys as before configs were nested, so a run
    recorded by an older saeguard keeps its plan)."""
    return {
        "calibration_texts": cfg.monitor.calibration_texts,
        "corpus": cfg.corpus,
        "dtype": cfg.dtype,
        "expansion": cfg.expansion,
        "fit_texts": cfg.monitor.fit_texts,
        "hook": cfg.hook,
        "id_texts": cfg.benchmark.id_texts,
        "k": cfg.k,
        "mask_prob": cfg.mask_prob,
        "model": cfg.model,
        "per_shift": cfg.benchmark.per_shift,
        "quick": cfg.quick,
        "shifts": cfg.benchmark.shifts,
        "target_fpr": cfg.monitor.target_fpr,
        "time_budget": cfg.time_budget,
        "tokens": cfg.tokens,
    }


def _make_plan(cfg: RunConfig, device: str = "cpu") -> dict[str, Any]:
    """Measure this machine (on ``device``), then size the job to the budget (``throughput``
    included)."""
    from saeguard.jobs.planning import measure, plan_run

    rates = measure(
        cfg.model, cfg.hook, cfg.corpus, cfg.expansion, cfg.k, device=device,
        contexts=8 if cfg.quick else 32,
    )  # fmt: skip
    plan = plan_run(
        60 * cfg.time_budget,
        rates,
        n_shifts=len(cfg.benchmark.shifts),
        fit_texts=cfg.monitor.fit_texts,
        calibration_texts=cfg.monitor.calibration_texts,
        id_texts=cfg.benchmark.id_texts,
        per_shift=cfg.benchmark.per_shift,
        tokens=cfg.tokens,
        dtype=cfg.dtype,
    ).to_dict()
    plan["throughput"] = rates.to_dict()
    return plan


def _describe_plan(plan: dict[str, Any]) -> str:
    expected = plan.get("expected_s", {})
    return (
        f"harvest {plan['harvest_tokens']:,} activations ({plan['dtype']}), train on "
        f"{plan['train_tokens']:,} tokens, monitor {plan['fit_texts']}+{plan['calibration_texts']}"
        f" texts, benchmark {plan['id_texts']} ID + {plan['per_shift']} per shift; expected "
        f"{sum(expected.values()) / 60:.1f} of {plan['budget_s'] / 60:.0f} minutes ("
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in expected.items())
        + ")"
    )
