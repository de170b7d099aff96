"""Integration: `saeguard eval --quick` on a TopK SAE trained on the real SmolLM2 and wiki-en."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from saeguard.jobs.eval import EVAL_SCHEMA, EvalConfig, run_eval
from saeguard.jobs.train import TrainJobConfig, run_training

pytestmark = pytest.mark.integration


def test_quick_eval_of_a_smollm2_sae(tmp_path: Path) -> None:
    run_training(
        TrainJobConfig(
            out=str(tmp_path / "sae"), tokens=4096 * 8, batch_tokens=4096, buffer_tokens=8192,
            expansion=[4], k=[32], eval_tokens=0, checkpoint_every=0, batch_size=16,
        )
    )  # fmt: skip
    document = run_eval(tmp_path / "sae", EvalConfig(quick=True))
    jsonschema.validate(document, json.loads(EVAL_SCHEMA.read_text()))
    metrics = {name: m["value"] for name, m in document["metrics"].items()}
    assert document["complete"] and document["sae"]["model"] == "smollm2-135m"
    # Loose, honest bounds for a briefly trained SAE: better than nothing, worse than perfect.
    assert 0 < metrics["fvu"] < 0.9 and metrics["l0"] == pytest.approx(32)
    assert 0.3 < metrics["ce_loss_recovered"] <= 1.0
    assert metrics["ce_loss_zero"] > metrics["ce_loss_sae"] > metrics["ce_loss_clean"]
    assert 0 <= metrics["mean_full_absorption"] <= 1
    # Language ID and topics are easy for the raw residual stream of a 135M model.
    assert metrics["raw_probing_accuracy_all"] > 0.75
    assert 0.5 < metrics["ood_probing_auc"] <= 1
    assert 1 < metrics["effective_features"] <= 4 * 576
    html = (tmp_path / "sae" / "eval.html").read_text()
    assert html.count("data:image/png") >= 3  # frequency, probing, absorption plots
