"""Robustify core: only the adapters train, and the loss falls on a fixed batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from saeguard.activations.exclusion import ExclusionRules
from saeguard.data.perturb import add_typos
from saeguard.data.tokenize import packing_spec, tokenize_documents
from saeguard.errors import ConfigError
from saeguard.models import load_model
from saeguard.ood import MonitorConfig
from saeguard.robustify import LoraRobustifier, LoraSettings, add_adapters
from saeguard.sae import SAEConfig, create_sae

TEXTS = [
    "the river city and the mountain people",
    "history of music and art in the north",
    "the king and queen made peace after the war",
    "science and theory of light and dark water",
]


def _setup(tiny_llama_dir: Path, settings: LoraSettings):
    torch.manual_seed(0)
    loaded = load_model(str(tiny_llama_dir))
    spec = packing_spec(loaded.tokenizer, 32)
    start = [spec.start_id] if spec.start_id is not None else []
    clean = [start + ids for ids in tokenize_documents(loaded.tokenizer, TEXTS)]
    shifted_texts = [add_typos(t, 0.5, seed=1) for t in TEXTS]
    shifted = [start + ids for ids in tokenize_documents(loaded.tokenizer, shifted_texts)]
    sae = create_sae(SAEConfig(architecture="topk", d_in=32, d_sae=64, k=8))
    model = add_adapters(loaded.model, settings)
    rules = ExclusionRules(special_ids=loaded.special_token_ids())
    pad = loaded.tokenizer.pad_token_id
    robustifier = LoraRobustifier(
        model, sae, loaded.hook_point("resid_post.2"), rules, settings, pad
    )
    return robustifier, model, sae, clean, shifted


def test_only_adapters_change_and_the_loss_falls_on_a_fixed_batch(tiny_llama_dir: Path) -> None:
    settings = LoraSettings(rank=4, alpha=8, lr=1e-2, target_modules=["q_proj", "v_proj", "o_proj"])
    robustifier, model, sae, clean, shifted = _setup(tiny_llama_dir, settings)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    sae_before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    assert adapters and all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad():
        before, consistency_before, _ = robustifier.losses(clean, shifted)
    for _ in range(40):
        robustifier.step(clean, shifted)
    with torch.no_grad():
        after, consistency_after, _ = robustifier.losses(clean, shifted)
    assert float(after) < 0.95 * float(before)
    assert float(consistency_after) < float(consistency_before)
    for name, value in model.named_parameters():
        if "lora_" in name:
            continue
        assert torch.equal(value, frozen[name]), f"base weight {name} changed"
    assert any(
        not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if n in adapters
    )
    for name, value in sae.named_parameters():
        assert torch.equal(value, sae_before[name]) and not value.requires_grad


def test_energy_weighting_puts_the_weight_on_the_most_ood_text(tiny_llama_dir: Path) -> None:
    settings = LoraSettings(rank=2, alpha=4, energy_weighting=True, lm_weight=0.0)
    robustifier, _, _, clean, shifted = _setup(tiny_llama_dir, settings)
    seen: list[int] = []

    def energy_of(rows: list[torch.Tensor]) -> torch.Tensor:
        seen.append(len(rows))
        return torch.tensor([50.0] + [0.0] * (len(rows) - 1))  # text 0 is by far the most OOD

    robustifier.energy_of = energy_of
    with torch.no_grad():
        _, weighted, _ = robustifier.losses(clean, shifted)
        robustifier.settings = LoraSettings(rank=2, alpha=4, lm_weight=0.0)
        _, alone, _ = robustifier.losses(clean[:1], shifted[:1])
    assert seen == [len(clean)]
    assert float(weighted) == pytest.approx(float(alone), rel=1e-4)


def test_energy_weighting_and_bad_settings(tiny_llama_dir: Path) -> None:
    settings = LoraSettings(rank=2, alpha=4, lr=1e-2, energy_weighting=True, lm_weight=0.0)
    robustifier, _, _, clean, shifted = _setup(tiny_llama_dir, settings)
    first = robustifier.step(clean, shifted)
    assert first.lm == 0.0 and first.consistency > 0
    with pytest.raises(ConfigError, match="nothing would be trained"):
        LoraSettings(consistency_weight=0, lm_weight=0)
    with pytest.raises(ConfigError, match="no linear layers named"):
        add_adapters(load_model(str(tiny_llama_dir)).model, LoraSettings(target_modules=["c_attn"]))


# --- the robustify job, adapters on disk, before/after comparison ------------------------------
import json  # noqa: E402

import numpy as np  # noqa: E402

from saeguard.jobs.robustify import RobustifyConfig, run_robustify  # noqa: E402
from saeguard.models.adapters import merge_adapter  # noqa: E402
from saeguard.robustify.measure import QUANTITIES, compare  # noqa: E402
from saeguard.sae.io import save_sae  # noqa: E402


@pytest.fixture(scope="module")
def tiny_sae_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("robust-sae") / "sae"
    sae = create_sae(SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4))
    save_sae(sae, out, {"model": str(tiny_llama_dir), "hook": "resid_post.2",
                        "corpus": "wiki-en", "ctx_len": 32})  # fmt: skip
    return out


def _job(tiny_llama_dir: Path, sae: Path, out: Path, **changes) -> RobustifyConfig:
    settings = dict(model=str(tiny_llama_dir), sae=str(sae), out=str(out), quick=True, lr=5e-3,
                    steps=4, checkpoint_every=2,
                    monitor_fit=MonitorConfig(fit_texts=60, calibration_texts=30),
                    energy_weighting=True)  # fmt: skip
    settings.update(changes)
    return RobustifyConfig(**settings)


@pytest.fixture(scope="module")
def tiny_job(tiny_llama_dir: Path, tiny_sae_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("robustify") / "job"
    cfg = _job(tiny_llama_dir, tiny_sae_dir, out, control=True)
    return cfg, run_robustify(cfg)


def test_robustify_job_writes_a_valid_report_with_both_arms(tiny_job) -> None:
    cfg, document = tiny_job
    out = Path(cfg.out)
    assert set(document["arms"]) == {"robust", "control"}
    assert document["arms"]["control"]["settings"]["consistency_weight"] == 0.0
    for arm in document["arms"].values():
        assert len(arm["losses"]) == 4
        assert (Path(arm["adapter"]) / "adapter_model.safetensors").is_file()
        comparison = arm["comparison"]
        assert {q.key for q in QUANTITIES} <= set(comparison)
        for entry in comparison.values():
            low, high = entry["difference_ci95"]
            assert low <= entry["difference"] + 1e-9 and entry["difference"] <= high + 1e-9
    # Robust against control: the two arms' after values, paired on the same texts.
    versus = document["robust_vs_control"]
    for key in ("fallacious_count_perturbed", "continuation_accuracy_perturbed"):
        robust, control = (document["arms"][a]["comparison"][key]["after"]
                           for a in ("robust", "control"))  # fmt: skip
        assert versus[key]["after"] == pytest.approx(robust)
        assert versus[key]["before"] == pytest.approx(control)
        assert versus[key]["difference"] == pytest.approx(robust - control)
    assert document["held_out"]["continuation_texts"] >= 2
    # The control never trains the consistency term: its losses report it as 0.
    assert all(r["consistency"] == 0.0 for r in document["arms"]["control"]["losses"])
    assert document["held_out"]["texts"] == 3 * len(document["held_out"]["topics"])
    html_page = (out / "robustify.html").read_text()
    assert "before / after / difference" in html_page and "QUICK" in html_page
    saved = json.loads((out / "robustify.json").read_text())
    assert saved["checks"] == document["checks"] and saved["device"] == "cpu"
    assert not list(out.rglob("*.pkl")) and not list(out.rglob("*.bin"))


def test_the_continuation_check_scores_the_clean_continuation_after_the_prefix(tiny_job) -> None:
    from saeguard.ood.monitor import Monitor
    from saeguard.robustify.measure import (
        CONTINUATION_WORDS,
        PREFIX_WORDS,
        continuation_scores,
        cut_continuations,
    )

    cfg, _ = tiny_job
    words = [f"word{i}" for i in range(PREFIX_WORDS + CONTINUATION_WORDS + 5)]
    cut = cut_continuations([" ".join(words), "too short"], 0.5, seed=0)
    assert cut.clean_prefix == [" ".join(words[:PREFIX_WORDS])]  # the short text is left out
    assert cut.continuation == [" ".join(words[PREFIX_WORDS : PREFIX_WORDS + CONTINUATION_WORDS])]
    assert cut.perturbed_prefix[0] != cut.clean_prefix[0]
    monitor = Monitor.load(Path(cfg.out) / "monitor")
    prefixes, continuations = ["The river runs", "Teh rivr rnus"], ["to the sea"] * 2
    accuracy, loss = continuation_scores(monitor, prefixes, continuations)
    tokenizer = monitor.loaded.tokenizer
    for i, prefix in enumerate(prefixes):  # by hand: one sequence, no padding
        pre = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        cont = tokenizer(" to the sea", add_special_tokens=False)["input_ids"]
        ids = [monitor.reader.spec.start_id, *pre, *cont]
        with torch.inference_mode():
            logits = monitor.loaded.model(input_ids=torch.tensor([ids])).logits[0]
        logp = torch.log_softmax(logits[len(ids) - len(cont) - 1 : -1].float(), -1)
        target = torch.tensor(cont)
        assert accuracy[i] == pytest.approx(float((logp.argmax(-1) == target).float().mean()))
        assert loss[i] == pytest.approx(float(-logp.gather(-1, target[:, None]).mean()), rel=1e-4)


def test_rerun_keeps_finished_work_and_more_steps_resume(
    tiny_job, tiny_llama_dir: Path, tiny_sae_dir: Path, tmp_path: Path
) -> None:
    cfg, _ = tiny_job
    out = Path(cfg.out)
    watched = [out / "before.json", out / "after_robust.json",
               out / "robust" / "adapter" / "adapter_model.safetensors"]  # fmt: skip
    stamps = {p: p.stat().st_mtime_ns for p in watched}
    run_robustify(cfg)
    assert all(p.stat().st_mtime_ns == s for p, s in stamps.items()), "finished work was redone"

    # Two steps, then four: the same adapter as four steps straight (batches depend on the step).
    monitor = str(out / "monitor")  # fitted by the first job: reused, not refitted
    run_robustify(_job(tiny_llama_dir, tiny_sae_dir, tmp_path / "split", steps=2, monitor=monitor))
    resumed = run_robustify(
        _job(tiny_llama_dir, tiny_sae_dir, tmp_path / "split", steps=4, monitor=monitor)
    )
    assert not (tmp_path / "split" / "monitor").exists()
    straight = json.loads((out / "robust" / "progress.json").read_text())["losses"]
    assert [r["total"] for r in resumed["arms"]["robust"]["losses"]] == pytest.approx(
        [r["total"] for r in straight], rel=1e-5
    )
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "split" / "robust" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "robust" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_merged_adapter_equals_the_trained_model_and_refuses_another_base(
    tiny_job, tiny_llama_dir: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    cfg, document = tiny_job
    adapter = document["arms"]["robust"]["adapter"]
    base = load_model(str(tiny_llama_dir))
    merged = load_model(str(tiny_llama_dir), adapter=adapter)
    assert merged.adapter == adapter and merged.identity() == base.fingerprint()
    assert merged.fingerprint() != base.fingerprint()
    from peft import PeftModel

    wrapped = PeftModel.from_pretrained(load_model(str(tiny_llama_dir)).model, adapter)
    tokens = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        want = wrapped(input_ids=tokens).logits
        got = merged.model(input_ids=tokens).logits
        plain = base.model(input_ids=tokens).logits
    assert torch.allclose(want, got, atol=1e-4) and not torch.allclose(plain, got, atol=1e-4)
    other = load_model(str(tiny_model_dirs["gpt_neox"]))
    with pytest.raises(Exception, match="trained on"):
        merge_adapter(other, adapter)
    with pytest.raises(Exception, match="not a LoRA adapter directory"):
        merge_adapter(load_model(str(tiny_llama_dir)), cfg.out)


def test_ood_score_and_eval_take_the_adapter(
    tiny_job, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from saeguard.cli import main

    cfg, document = tiny_job
    adapter = document["arms"]["robust"]["adapter"]
    monitor = document["monitor"]
    text = "the river city and the mountain people"
    assert main(["-q", "ood", "score", "--monitor", monitor, text]) == 0
    base_line = json.loads(capsys.readouterr().out.strip())
    assert main(["-q", "ood", "score", "--monitor", monitor, "--adapter", adapter, text]) == 0
    adapted_line = json.loads(capsys.readouterr().out.strip())
    assert base_line["scores"]["recon_error"] != adapted_line["scores"]["recon_error"]
    assert main(["-q", "eval", cfg.sae, "--evals", "core", "--quick", "--adapter", adapter]) == 0
    capsys.readouterr()
    written = json.loads((Path(adapter) / "eval" / "eval.json").read_text())
    assert written["sae"]["adapter"] == adapter
    assert not (Path(cfg.sae) / "eval.json").exists(), "the base SAE's eval.json was touched"


def test_compare_finds_a_planted_change_with_paired_intervals() -> None:
    rng = np.random.default_rng(0)
    n = 200
    base = rng.normal(1.0, 0.3, n)

    def snapshot(shift: float) -> dict[str, dict[str, list[float]]]:
        side = {}
        for name, offset in (("clean", 0.0), ("perturbed", 1.0 - shift)):
            values = base + offset
            side[name] = {
                k: list(values)
                for k in ("fallacious_count", "fallacious_mass", "recon_error", "energy", "nll")
            }
            side[name]["flagged"] = list((values > 1.5).astype(float))
            side[name]["correct"] = list(np.ones(n))
        return side  # fmt: skip

    result = compare(snapshot(0.0), snapshot(0.5), resamples=300)
    count = result["fallacious_count_perturbed"]
    assert count["difference"] == pytest.approx(-0.5)
    assert count["difference_ci95"][1] < 0  # paired: the per-text noise cancels
    assert result["fallacious_count_clean"]["difference"] == pytest.approx(0.0)
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.zeros(n), np.ones(n)]
    want = roc_auc_score(labels, np.r_[base, base + 0.5])
    assert result["auroc_energy"]["after"] == pytest.approx(want)
    with pytest.raises(ConfigError, match="different text sets"):
        short = snapshot(0.0)
        short["clean"]["nll"] = short["clean"]["nll"][:-1]
        compare(snapshot(0.0), short)


def test_robustify_config_refuses_what_cannot_work(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="typos:RATE"):
        RobustifyConfig(shift="wiki-es")
    with pytest.raises(ConfigError, match="--steps"):
        RobustifyConfig(steps=0)
    with pytest.raises(ConfigError, match="loss-tolerance"):
        RobustifyConfig(loss_tolerance=2.0)
    with pytest.raises(ConfigError, match="no sae_weights"):
        run_robustify(_job(tiny_llama_dir, tmp_path / "nothing", tmp_path / "out"))
