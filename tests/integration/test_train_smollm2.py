"""Integration: SAE training and masked regularization on the real SmolLM2 and wiki-en."""

from __future__ import annotations

from pathlib import Path

import pytest

from saeguard.activations import ActivationSourceConfig, ModelActivationSource
from saeguard.jobs.train import TrainJobConfig, run_training
from saeguard.sae.io import load_sae

pytestmark = pytest.mark.integration


def test_masking_on_smollm2_uses_a_rare_special_token() -> None:
    source = ModelActivationSource(
        ActivationSourceConfig(mask_prob=0.15, calibration_contexts=4, batch_size=8)
    )
    chunks = iter(source)
    for _ in range(4):
        next(chunks)
    info = source.describe()["masking"]
    assert info["mask_token"] == "<empty_output>" and info["mask_token_id"] == 16
    assert 0.13 < info["masked_fraction"] < 0.17


def test_topk_trains_on_smollm2_and_round_trips(tmp_path: Path) -> None:
    job = TrainJobConfig(
        out=str(tmp_path / "sae"), tokens=4096 * 6, batch_tokens=4096, buffer_tokens=8192,
        expansion=[4], k=[32], eval_tokens=4096, checkpoint_every=3, batch_size=16,
    )  # fmt: skip
    results = run_training(job)
    held = results["saes"]["topk_k32_x4"]["held_out"]
    assert held["fvu"] < 0.9 and held["l0"] == 32
    sae, meta = load_sae(tmp_path / "sae")
    assert sae.cfg.d_in == 576 and sae.cfg.d_sae == 2304
    assert meta["model"] == "smollm2-135m" and meta["hook"] == "resid_post.15"
    assert meta["exclusions"]["outlier_multiple"] == 10.0
    assert meta["training_tokens"] == 4096 * 6
