"""Integration: `saeguard run --quick` on the real SmolLM2, wiki-en and every default shift,
then `saeguard robustify --quick` on the SAE and monitor it made."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from saeguard.data.shifts import DEFAULT_SHIFTS
from saeguard.jobs.ood import SCHEMA
from saeguard.jobs.run import RunConfig, run
from saeguard.ood import BASELINES, SAE_SCORES, Monitor

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("smollm2") / "run"
    return out, run(RunConfig(out=str(out), quick=True))


def test_quick_run_on_smollm2_benchmarks_every_score_and_explains_alarms(
    quick_run: tuple[Path, dict],
) -> None:
    out, state = quick_run
    bench = json.loads((out / "ood" / "ood_benchmark.json").read_text())
    jsonschema.validate(bench, json.loads(SCHEMA.read_text()))
    assert set(bench["shifts"]) == set(DEFAULT_SHIFTS)
    assert bench["calibration"]["flag_score"] == "fused"  # the default flag: the fused score
    assert set(bench["summary"]["per_shift"]) == set(DEFAULT_SHIFTS)
    for row in bench["shifts"].values():
        assert set(SAE_SCORES) | set(BASELINES) | {"fused"} <= set(row["scores"])
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
    assert "class='heat'" in html  # the per-token heat-maps of the explained texts
    assert all(len(e["tokens"]) == e["n_tokens"] for e in examples)
    monitor = Monitor.load(out / "monitor")
    [scored] = monitor.score(["The Nile is a river in Africa."])
    assert scored.error is None and scored.flagged is not None


def test_quick_robustify_on_smollm2_measures_before_and_after(
    quick_run: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from saeguard.cli import main
    from saeguard.jobs.robustify import SCHEMA as ROBUSTIFY_SCHEMA

    out, _ = quick_run
    target = tmp_path / "robustify"
    argv = ["-q", "robustify", "--quick", "--sae", str(out / "sae"), "--shift", "typos:0.2",
            "--monitor", str(out / "monitor"), "--out", str(target)]  # fmt: skip
    assert main(argv) == 0
    assert "fallacious count" in capsys.readouterr().out
    document = json.loads((target / "robustify.json").read_text())
    jsonschema.validate(document, json.loads(ROBUSTIFY_SCHEMA.read_text()))
    assert len(document["held_out"]["topics"]) == 11  # wiki-en's topic labels
    comparison = document["arms"]["robust"]["comparison"]
    # The probe is trained on clean base-model activations: it must beat chance (1/11) there.
    assert comparison["probe_accuracy_clean"]["before"] > 0.2
    # Typos make the text harder to predict for the base model.
    assert comparison["nll_perturbed"]["before"] > comparison["nll_clean"]["before"]
    assert document["held_out"]["capability_corpus"] == "bbc"
    adapter = document["arms"]["robust"]["adapter"]
    monitor = Monitor.load(out / "monitor", adapter=adapter)
    assert monitor.loaded.adapter == adapter
    [scored] = monitor.score(["The Nile is a river in Africa."])
    assert scored.error is None
