"""Integration: `saeguard run --quick` on the real SmolLM2, wiki-en and every default shift."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from saeguard.data.shifts import DEFAULT_SHIFTS
from saeguard.ood import BASELINES, SAE_SCORES, Monitor
from saeguard.ood.benchmark import SCHEMA
from saeguard.pipeline import RunConfig, run

pytestmark = pytest.mark.integration


def test_quick_run_on_smollm2_benchmarks_every_score_and_explains_alarms(tmp_path: Path) -> None:
    out = tmp_path / "run"
    state = run(RunConfig(out=str(out), quick=True))
    bench = json.loads((out / "ood" / "ood_benchmark.json").read_text())
    jsonschema.validate(bench, json.loads(SCHEMA.read_text()))
    assert set(bench["shifts"]) == set(DEFAULT_SHIFTS)
    for row in bench["shifts"].values():
        assert set(SAE_SCORES) | set(BASELINES) <= set(row["scores"])
        for cell in row["scores"].values():
            assert cell["auroc_ci95"][0] <= cell["auroc"] <= cell["auroc_ci95"][1]
    # Other languages and code are far from English Wikipedia for any reasonable detector.
    for shift in ("wiki-es", "code-python"):
        assert bench["shifts"][shift]["scores"]["mahalanobis"]["auroc"] > 0.8
    masking = state["steps"]["train"]["results"]["masking"]
    assert 0.07 < masking["masked_fraction"] < 0.13  # --mask-prob 0.1
    examples = json.loads((out / "ood" / "examples.json").read_text())
    flagged = [e for e in examples if e["flagged"] and e.get("explanation")]
    assert flagged, "the quick benchmark flags and explains at least one shifted text"
    latent = flagged[0]["explanation"][0]
    assert latent["input_contexts"] and latent["reason"]
    assert any(la["id_contexts"] for e in flagged for la in e["explanation"])
    html = (out / "ood" / "examples.html").read_text()
    assert "<mark>" in html and "top in-distribution contexts" in html
    monitor = Monitor.load(out / "monitor")
    [scored] = monitor.score(["The Nile is a river in Africa."])
    assert scored.error is None and scored.flagged is not None
