"""The masking study end to end on a tiny model (``--quick`` scale, CI-sized)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from saeguard.errors import ConfigError
from saeguard.evals.absorption import AbsorptionConfig
from saeguard.evals.ce import CEConfig
from saeguard.evals.core import CoreConfig
from saeguard.evals.probing import ProbingConfig
from saeguard.jobs.eval import EvalConfig
from saeguard.jobs.studies import MaskingStudyConfig, run_study


def test_study_config_needs_a_baseline() -> None:
    with pytest.raises(ConfigError, match="include 0"):
        MaskingStudyConfig(mask_probs=[0.1, 0.2])
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        MaskingStudyConfig(mask_probs=[0.0, 1.0])


def test_quick_masking_study_on_a_tiny_model(tiny_llama_dir: Path, tmp_path: Path) -> None:
    cfg = MaskingStudyConfig(
        out=str(tmp_path / "study"), model=str(tiny_llama_dir), hook="resid_post.2",
        corpus="wiki-en", mask_probs=[0.0, 0.2], ks=[4], seeds=2, tokens=2048, quick=True,
        batch_tokens=256, ctx_len=32,
        eval=EvalConfig(evals=["core", "ce", "absorption", "probing", "ood_probing"],
                        core=CoreConfig(contexts=8), ce=CEConfig(contexts=2),
                        probing=ProbingConfig(per_class=6, ks=[1, 5]),
                        absorption=AbsorptionConfig(words=60)),
    )  # fmt: skip
    document = run_study(cfg)
    table = document["table"]
    assert set(table) == {"p=0, k=4", "p=0.2, k=4"}
    masked = table["p=0.2, k=4"]
    assert all(abs(f - 0.2) < 0.05 for f in masked["masked_fraction"])  # counted, not assumed
    assert table["p=0, k=4"]["masked_fraction"] == [None, None] or all(
        not f for f in table["p=0, k=4"]["masked_fraction"]
    )
    ev = masked["explained_variance"]
    assert len(ev["seeds"]) == 2 and ev["ci95"][0] <= ev["mean"] <= ev["ci95"][1]
    assert "delta" in ev and "delta" not in table["p=0, k=4"]["explained_variance"]
    study_md = (tmp_path / "study" / "study.md").read_text()
    assert "mean full absorption" in study_md and "Finding" in study_md
    assert json.loads((tmp_path / "study" / "study.json").read_text())["finding"]
    assert "data:image/png" in (tmp_path / "study" / "study.html").read_text()
    # Re-running resumes: SAEs and evaluations are kept, the table is the same.
    before = (tmp_path / "study" / "p0.2" / "topk_k4_x4_s0" / "eval.json").read_text()
    again = run_study(cfg)
    assert again["table"] == table
    after = (tmp_path / "study" / "p0.2" / "topk_k4_x4_s0" / "eval.json").read_text()
    assert json.loads(after)["timings_s"] == json.loads(before)["timings_s"]
