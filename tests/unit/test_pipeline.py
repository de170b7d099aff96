"""The main job's planner and its cache-first, resumable training step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from saeguard.jobs.planning import FLOORS, Throughput, plan_run

DEFAULTS = {"n_shifts": 9, "fit_texts": 1500, "calibration_texts": 500, "id_texts": 400,
            "per_shift": 200}  # fmt: skip


def _rates(scale: float, bf16: float = 0.0, cosine: float = 0.0) -> Throughput:
    return Throughput(
        forward_float32=1500 * scale,
        forward_bfloat16=bf16 * scale,
        bfloat16_cosine=cosine,
        train=9000 * scale,
    )


def test_half_speed_plans_about_half_the_work_in_the_same_time() -> None:
    fast = plan_run(1800, _rates(1.0), **DEFAULTS)
    slow = plan_run(1800, _rates(0.5), **DEFAULTS)
    assert slow.harvest_tokens == pytest.approx(fast.harvest_tokens / 2, rel=0.15)
    assert slow.train_tokens == pytest.approx(fast.train_tokens / 2, rel=0.15)
    for plan in (fast, slow):
        # the whole plan fits the budget, and uses most of it
        assert 0.9 * 1800 <= sum(plan.expected_s.values()) <= 1800 * 1.001
    # the slow machine cannot pay for every default text: they shrink, never below the floors
    assert slow.per_shift < fast.per_shift and slow.per_shift >= FLOORS["per_shift"]
    assert fast.fit_texts == 1500 or fast.fit_texts > slow.fit_texts


def test_bfloat16_only_when_faster_and_faithful() -> None:
    assert plan_run(1800, _rates(1.0, bf16=2200, cosine=0.995), **DEFAULTS).dtype == "bfloat16"
    assert plan_run(1800, _rates(1.0, bf16=2200, cosine=0.98), **DEFAULTS).dtype == "float32"
    assert plan_run(1800, _rates(1.0, bf16=500, cosine=0.999), **DEFAULTS).dtype == "float32"
    forced = plan_run(1800, _rates(1.0, bf16=500, cosine=0.9), dtype="bfloat16", **DEFAULTS)
    assert forced.dtype == "bfloat16"


def test_tokens_override_the_plan() -> None:
    plan = plan_run(1800, _rates(1.0), tokens=100_000, **DEFAULTS)
    assert plan.train_tokens == 100_000 and plan.harvest_tokens == 50_000


def test_killed_training_resumes_from_the_cache_to_identical_weights(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill at ~70% of training, then the same command: no activation is recomputed while
    training resumes, and the SAE is bit-identical to an uninterrupted run's."""
    from saeguard.activations.source import ActivationHarvester
    from saeguard.jobs.ood import OodBenchmarkConfig
    from saeguard.jobs.run import RunConfig, run
    from saeguard.ood import MonitorConfig
    from saeguard.train.trainer import Trainer, TrainerConfig

    def config(out: Path) -> RunConfig:
        return RunConfig(out=str(out), model=str(tiny_llama_dir), hook="resid_post.2",
                         quick=True, tokens=10 * 4096, dtype="float32",
                         train=TrainerConfig(checkpoint_every=2),
                         monitor=MonitorConfig(fit_texts=40, calibration_texts=30),
                         benchmark=OodBenchmarkConfig(id_texts=20, per_shift=12,
                                                      shifts=["typos:0.2"]))  # fmt: skip

    run(config(tmp_path / "reference"))

    forwards = {"during_training": 0}
    in_training = {"now": False}
    original_forward, original_fit = ActivationHarvester.forward, Trainer.fit
    original_step = Trainer._train_step

    def counting_forward(self, tokens):  # type: ignore[no-untyped-def]
        if in_training["now"]:
            forwards["during_training"] += 1
        return original_forward(self, tokens)

    def tracked_fit(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        in_training["now"] = True
        try:
            return original_fit(self, *args, **kwargs)
        finally:
            in_training["now"] = False

    def killed_at_step_7(self, x):  # type: ignore[no-untyped-def]
        if self.step == 7:
            raise KeyboardInterrupt  # a kill after the checkpoint of step 6
        return original_step(self, x)

    monkeypatch.setattr(ActivationHarvester, "forward", counting_forward)
    monkeypatch.setattr(Trainer, "fit", tracked_fit)
    monkeypatch.setattr(Trainer, "_train_step", killed_at_step_7)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run(config(out))
    state = json.loads((out / "run.json").read_text())
    assert state["steps"]["harvest"]["done"] and "train" not in state["steps"]
    assert json.loads((out / "sae/checkpoint/state.json").read_text())["step"] == 6

    monkeypatch.setattr(Trainer, "_train_step", original_step)
    run(config(out))
    assert forwards["during_training"] == 0, "training ran the model instead of the cache"
    reference = (tmp_path / "reference/sae/sae_weights.safetensors").read_bytes()
    assert (out / "sae/sae_weights.safetensors").read_bytes() == reference
    lines = (out / "sae/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines][-1] == 10


def test_training_is_retargeted_to_what_the_harvest_left() -> None:
    from saeguard.jobs.planning import retarget_training

    plan = plan_run(1800, _rates(1.0), **DEFAULTS).to_dict()
    on_time = retarget_training(plan, plan["expected_s"]["harvest"] + 30)
    assert on_time == pytest.approx(plan["train_tokens"], rel=0.05)
    late = retarget_training(plan, plan["expected_s"]["harvest"] + 30 + 120)
    assert late < on_time  # two minutes late: fewer training tokens, not a longer job
    assert late == pytest.approx(on_time - 120 * plan["train_rate"], rel=0.02)
    assert retarget_training(plan, 10_000) >= plan["harvest_tokens"]  # at least one pass
    assert retarget_training(plan, 0) <= 2 * plan["train_tokens"]
