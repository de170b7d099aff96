"""`saeguard run`: the main job, end to end, resumable.

1. harvest + train: a masked TopK SAE, streaming activations from the model (masked
   regularization replaces input tokens before the model runs, so activations cannot come from
   an unmasked cache); checkpoints let an interrupted run resume bit-identically;
2. evaluate it (core reconstruction metrics and CE loss recovered);
3. fit the OOD monitor on ID text and calibrate its threshold on held-out ID text;
4. run the OOD benchmark (every score and baseline on every shift);
5. write ``index.html``, which links everything.

Each step leaves its result on disk; running the same command again skips finished steps and
resumes an unfinished one where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from saeguard.configs import validate_literals
from saeguard.data.shifts import DEFAULT_SHIFTS
from saeguard.errors import ConfigError
from saeguard.fileio import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

STEPS = ("train", "eval", "monitor", "benchmark", "report")


@dataclass
class RunConfig:
    """The main job on one model, hook and ID corpus (defaults: the embedded SmolLM2 + wiki-en)."""

    out: str = "runs/default"
    """Directory for every step's output and index.html."""
    model: str = "smollm2-135m"
    """Model: an embedded name, a Hugging Face id or a local directory."""
    hook: str = "resid_post.15"
    """Hook point the SAE reads."""
    corpus: str = "wiki-en"
    """ID corpus (train split: SAE and monitor; validation: calibration; test: evaluation)."""
    tokens: int = 400_000
    """Training activations for the SAE (after masked positions are dropped)."""
    mask_prob: float = 0.1
    """Masked regularization: probability that an input token is replaced by the mask token."""
    k: int = 32
    """TopK sparsity."""
    expansion: int = 16
    """d_sae / d_model."""
    fit_texts: int = 1500
    """ID texts the monitor's statistics are fitted on."""
    calibration_texts: int = 500
    """Held-out ID texts the monitor's threshold is calibrated on."""
    target_fpr: float = 0.05
    """False-positive rate the monitor is calibrated for."""
    shifts: list[str] = field(default_factory=lambda: list(DEFAULT_SHIFTS))
    """Shifts the OOD benchmark scores (see `saeguard ood benchmark --help`)."""
    id_texts: int = 400
    """In-distribution negatives of the OOD benchmark."""
    per_shift: int = 200
    """OOD texts per shift."""
    quick: bool = False
    """Smoke-test scale (minutes): few tokens, texts and a 4x SAE. Not a result."""
    threads: int = 0
    """Torch CPU threads (0: library default)."""

    def __post_init__(self) -> None:
        validate_literals(self)
        if self.quick:
            self.tokens = min(self.tokens, 24_576)
            self.expansion = min(self.expansion, 4)
            self.fit_texts = min(self.fit_texts, 120)
            self.calibration_texts = min(self.calibration_texts, 60)
            self.id_texts = min(self.id_texts, 40)
            self.per_shift = min(self.per_shift, 20)
        if self.tokens < 4096:
            raise ConfigError(f"--tokens must be at least one batch (4096), got {self.tokens}")
        if not 0 <= self.mask_prob < 1:
            raise ConfigError(f"--mask-prob must lie in [0, 1), got {self.mask_prob}")


def _step_done(state: dict[str, Any], step: str, signature: str) -> bool:
    entry = state.get("steps", {}).get(step, {})
    return bool(entry.get("done")) and entry.get("signature") == signature


def run(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) every step; returns the run summary written to ``run.json``."""
    from saeguard.evals import EvalConfig, run_eval
    from saeguard.ood import Monitor, MonitorConfig, OodBenchmarkConfig, run_benchmark
    from saeguard.train import TrainJobConfig, run_training

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "run.json"
    state: dict[str, Any] = {}
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            log.warning("%s is unreadable: re-checking every step", state_path)
    state["config"] = asdict(cfg)
    state.setdefault("steps", {})
    sae_dir, monitor_dir, ood_dir = out / "sae", out / "monitor", out / "ood"

    def mark(step: str, signature: str, seconds: float, **extra: Any) -> None:
        state["steps"][step] = {"done": True, "signature": signature, "seconds": seconds, **extra}
        atomic_write_json(state_path, state)

    job = TrainJobConfig(
        out=str(sae_dir),
        model=cfg.model,
        hooks=[cfg.hook],
        corpus=cfg.corpus,
        split="train",
        mask_prob=cfg.mask_prob,
        tokens=cfg.tokens,
        architectures=["topk"],
        k=[cfg.k],
        expansion=[cfg.expansion],
        threads=cfg.threads,
        # The stream comes from the model, so every activation the shuffle pool holds back at
        # the end is a wasted forward pass: 64k tokens (~500 contexts) still mix well.
        buffer_tokens=max(8192, min(65_536, cfg.tokens)),
    )
    eval_cfg = EvalConfig(evals=["core", "ce"], quick=cfg.quick, threads=cfg.threads)
    monitor_cfg = MonitorConfig(
        fit_texts=cfg.fit_texts,
        calibration_texts=cfg.calibration_texts,
        target_fpr=cfg.target_fpr,
    )
    bench_cfg = OodBenchmarkConfig(
        shifts=list(cfg.shifts), id_texts=cfg.id_texts, per_shift=cfg.per_shift
    )
    signatures = {
        "train": json.dumps(asdict(job), sort_keys=True, default=str),
        "monitor": json.dumps(asdict(monitor_cfg), sort_keys=True),
        "benchmark": json.dumps(asdict(bench_cfg), sort_keys=True),
    }

    log.info(
        "step 1/5: harvest activations and train a masked TopK SAE (%s tokens)", f"{cfg.tokens:,}"
    )
    if not _step_done(state, "train", signatures["train"]):
        start = time.perf_counter()
        results = run_training(job)
        mark("train", signatures["train"], time.perf_counter() - start, results=results)
    weights = sha256_file(sae_dir / "sae_weights.safetensors")

    log.info("step 2/5: evaluate the SAE (core metrics, CE loss recovered)")
    start = time.perf_counter()
    run_eval(sae_dir, eval_cfg)  # resumes per eval by itself
    mark("eval", weights, time.perf_counter() - start)

    log.info("step 3/5: fit the OOD monitor and calibrate it on held-out ID text")
    monitor_sig = signatures["monitor"] + weights
    if not (_step_done(state, "monitor", monitor_sig) and (monitor_dir / "monitor.json").is_file()):
        start = time.perf_counter()
        monitor = Monitor.fit(sae_dir, monitor_cfg)
        monitor.calibrate()
        monitor.save(monitor_dir)
        mark("monitor", monitor_sig, time.perf_counter() - start)

    log.info("step 4/5: OOD benchmark (%d shifts)", len(cfg.shifts))
    start = time.perf_counter()
    document = run_benchmark(monitor_dir, ood_dir, bench_cfg)  # resumes per text set
    mark("benchmark", signatures["benchmark"] + monitor_sig, time.perf_counter() - start)

    log.info("step 5/5: write the report")
    from saeguard.report.run_report import write_run_report

    index = write_run_report(out, state, document)
    state["report"] = str(index)
    atomic_write_json(state_path, state)
    log.info("done: open %s", index)
    return state
