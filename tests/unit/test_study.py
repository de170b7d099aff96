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
from saeguard.sae.io import load_sae


def test_study_config_needs_a_baseline() -> None:
    with pytest.raises(ConfigError, match="include 0"):
        MaskingStudyConfig(mask_probs=[0.1, 0.2])
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        MaskingStudyConfig(mask_probs=[0.0, 1.0])


def test_study_hook_follows_the_model_and_archs_are_checked(tmp_path: Path) -> None:
    assert MaskingStudyConfig().hook == "resid_post.15"
    assert MaskingStudyConfig(model="gemma3-270m").hook == "resid_post.9"
    assert MaskingStudyConfig(model="gemma3-270m", hook="resid_post.5").hook == "resid_post.5"
    with pytest.raises(ConfigError, match="no default hook"):  # after the device check
        run_study(MaskingStudyConfig(model="some/other-model", out=str(tmp_path / "never")))
    assert not (tmp_path / "never").exists()
    with pytest.raises(ConfigError, match="--archs"):
        MaskingStudyConfig(archs=["topk", "nope"])
    with pytest.raises(ConfigError, match="--archs"):
        MaskingStudyConfig(archs=["topk", "topk"])
    assert MaskingStudyConfig(evals=["core", "absorption"]).eval.evals == ["core", "absorption"]
    with pytest.raises(ConfigError, match="--evals"):
        MaskingStudyConfig(evals=["effective"])


def test_quick_masking_study_on_a_tiny_model(tiny_llama_dir: Path, tmp_path: Path) -> None:
    cfg = MaskingStudyConfig(
        out=str(tmp_path / "study"), model=str(tiny_llama_dir), hook="resid_post.2",
        archs=["topk", "matryoshka"],
        corpus="wiki-en", mask_probs=[0.0, 0.2], ks=[4], seeds=1, tokens=2048, quick=True,
        batch_tokens=256, ctx_len=32,
        eval=EvalConfig(evals=["core", "ce", "absorption", "probing", "ood_probing"],
                        core=CoreConfig(contexts=8), ce=CEConfig(contexts=2),
                        probing=ProbingConfig(per_class=6, ks=[1, 5]),
                        absorption=AbsorptionConfig(words=60)),
    )  # fmt: skip
    document = run_study(cfg)
    table = document["table"]
    # Each architecture is an arm: its own rows, its own baseline.
    assert set(table) == {f"{a}, p={p}, k=4" for a in cfg.archs for p in ("0", "0.2")}
    for arch in cfg.archs:
        masked, base = table[f"{arch}, p=0.2, k=4"], table[f"{arch}, p=0, k=4"]
        assert (masked["arch"], masked["mask_prob"], masked["k"]) == (arch, 0.2, 4)
        assert all(abs(f - 0.2) < 0.05 for f in masked["masked_fraction"])  # counted
        assert base["masked_fraction"] == [None] or not any(base["masked_fraction"])
        ev = masked["explained_variance"]
        assert len(ev["seeds"]) == 1 and ev["ci95"][0] <= ev["mean"] <= ev["ci95"][1]
        assert "delta" in ev and "delta" not in base["explained_variance"]
        sae, _ = load_sae(tmp_path / "study" / "p0.2" / f"{arch}_k4_x4")
        assert sae.cfg.architecture == arch
    study_md = (tmp_path / "study" / "study.md").read_text()
    assert "mean full absorption" in study_md and "Finding" in study_md
    assert "| matryoshka, p=0.2, k=4 |" in study_md and "topk, matryoshka" in study_md
    assert document["finding"].startswith("topk: ") and " matryoshka: " in document["finding"]
    assert json.loads((tmp_path / "study" / "study.json").read_text())["finding"]
    assert "data:image/png" in (tmp_path / "study" / "study.html").read_text()
    # Re-running resumes: no SAE is retrained, no evaluation redone, the table is the same.
    saes = sorted((tmp_path / "study").glob("p*/*_k4_x4"))
    assert len(saes) == 4

    def stamps() -> list[tuple[str, int, str]]:
        return [(str(d), (d / "sae_weights.safetensors").stat().st_mtime_ns,
                 json.dumps(json.loads((d / "eval.json").read_text())["timings_s"]))
                for d in saes]  # fmt: skip

    before = stamps()
    again = run_study(cfg)
    assert again["table"] == table
    assert stamps() == before
