"""The command line: generated options, tables and clean errors."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from saeguard.cli import build_parser, main
from saeguard.configs import add_config_arguments, config_from_args, field_docs, option_specs
from saeguard.jobs.eval import EvalConfig
from saeguard.jobs.harvest import HarvestConfig


def test_every_config_field_has_a_docstring_and_a_help_line(capsys: pytest.CaptureFixture):
    docs = field_docs(HarvestConfig)
    fields = [f.name for f in dataclasses.fields(HarvestConfig)]
    assert set(fields) <= set(docs), set(fields) - set(docs)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["harvest", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in fields:
        assert "--" + name.replace("_", "-") in text
        assert " ".join(docs[name].split()[:4]) in text


def test_hook_flag_accepts_repeats_and_commas() -> None:
    args = build_parser().parse_args(
        ["harvest", "--out", "x", "--hook", "resid_post.1,mlp_out.2", "--hook", "attn_out.0"]
    )
    assert args.hooks == ["resid_post.1", "mlp_out.2", "attn_out.0"]
    defaults = build_parser().parse_args(["harvest", "--out", "x"])
    assert config_from_args(HarvestConfig, defaults).hooks == ["resid_post.15"]


def test_harvest_command_end_to_end(
    tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = [
        "harvest", "--model", str(tiny_llama_dir), "--hook", "resid_post.3",
        "--corpus", str(text_corpus), "--split", "all", "--ctx-len", "16", "--tokens", "200",
        "--shard-tokens", "64", "--calibration-contexts", "4", "--out", str(tmp_path / "c"),
    ]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["hooks"] == {"resid_post.3": 200} and summary["complete"] is True


def test_errors_are_one_line_messages_with_status_2(
    tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rc = main(["harvest", "--model", str(tiny_llama_dir), "--hook", "resid_post.99",
               "--corpus", str(text_corpus), "--out", str(tmp_path / "c")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "unknown hook point 'resid_post.99'" in err and "Traceback" not in err
    rc = main(["harvest", "--corpus", "no-such-corpus", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown corpus 'no-such-corpus'" in err and "wiki-en" in err
    rc = main(["harvest", "--tokens", "-5", "--out", str(tmp_path / "e")])
    assert rc == 2 and "--tokens must be positive" in capsys.readouterr().err


def test_cache_command_summarises_and_verifies(
    tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "c"
    argv = [
        "harvest", "--model", str(tiny_llama_dir), "--hook", "resid_post.3", "--corpus",
        str(text_corpus), "--split", "all", "--ctx-len", "16", "--tokens", "200",
        "--shard-tokens", "64", "--calibration-contexts", "4", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["cache", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["hooks"] == {"resid_post.3": 200} and summary["verified"] is True
    shard = out / "shard_00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3] + b"xyz")
    assert main(["cache", str(out)]) == 2
    err = capsys.readouterr().err
    assert "shard_00000.safetensors" in err and "SHA-256 mismatch" in err


def test_hooks_command_lists_shapes(tiny_llama_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["hooks", str(tiny_llama_dir), "--json"]) == 0
    shapes = json.loads(capsys.readouterr().out)
    assert len(shapes) == 16 and shapes["resid_post.3"] == [32] and shapes["attn_out.0"] == [32]
    assert main(["hooks", str(tiny_llama_dir)]) == 0
    out = capsys.readouterr().out
    assert "4 layers, d_model=32" in out and "mlp_out.2" in out and "[batch, seq, 32]" in out


def test_config_types_map_to_options() -> None:
    @dataclass(kw_only=True)
    class Demo:
        rates: list[float] = field(default_factory=lambda: [0.05])
        """Typo rates, e.g. 5% and 10% of words."""
        k: Literal[1, 2, 5] = 2
        """Probe size."""
        limit: int | None = 3
        """Optional cap."""
        flag: bool = False
        """A switch."""

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Demo)
    assert "5% and 10%" in parser.format_help()
    cfg = config_from_args(
        Demo, parser.parse_args(["--rates", "0.1,0.2", "--k", "5", "--limit", "none", "--flag"])
    )
    assert cfg == Demo(rates=[0.1, 0.2], k=5, limit=None, flag=True)
    assert config_from_args(Demo, parser.parse_args([])) == Demo()
    with pytest.raises(SystemExit):
        parser.parse_args(["--k", "3"])

    @dataclass
    class Unsupported:
        pair: tuple[int, int] = (1, 2)
        """Not expressible as one option."""

    with pytest.raises(TypeError, match="no command-line form"):
        add_config_arguments(argparse.ArgumentParser(), Unsupported)


def test_train_command_end_to_end(
    tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = [
        "train", "--model", str(tiny_llama_dir), "--hook", "resid_post.2", "--corpus",
        str(text_corpus), "--split", "all", "--ctx-len", "16", "--calibration-contexts", "4",
        "--arch", "topk", "--k", "4", "--expansion", "2", "--tokens", "1024",
        "--batch-tokens", "128", "--buffer-tokens", "256", "--eval-tokens", "128",
        "--mask-prob", "0.1", "--out", str(tmp_path / "sae"),
    ]  # fmt: skip
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["training_tokens"] == 1024
    assert 0.05 < results["masking"]["masked_fraction"] < 0.15
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["d_sae"] == 64
    assert cfg["saeguard"]["masking"]["mask_token"] == "<mask>"
    assert main(["train", "--out", str(tmp_path / "x"), "--k", "0"]) == 2
    assert "--k must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "config"),
    [
        (["ood", "fit", "--help"], "saeguard.jobs.ood.OodFitConfig"),
        (["ood", "benchmark", "--help"], "saeguard.jobs.ood.OodBenchmarkJobConfig"),
        (["train", "--help"], "saeguard.jobs.train.TrainJobConfig"),
        (["eval", "--help"], "saeguard.jobs.eval.EvalJobConfig"),
        (["run", "--help"], "saeguard.jobs.run.RunConfig"),
    ],
)
def test_ood_and_run_help_explains_every_option(
    argv: list[str], config: str, capsys: pytest.CaptureFixture
) -> None:
    import importlib

    module, _, name = config.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    docs = field_docs(cls)
    assert {f.name for f in dataclasses.fields(cls)} <= set(docs)
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    text = " ".join(capsys.readouterr().out.split())
    excluded = (*getattr(cls, "PLANNED", ()), *(f"eval.{k}" for k in EvalConfig.FOLLOWED))
    for spec in option_specs(cls, exclude=excluded):  # nested ones included
        assert "--" + spec.dest.replace("_", "-") in text or spec.dest == "sae_dir"
        assert " ".join(spec.doc.split()[:3]) in text


def _random_sae(model: Path, directory: Path) -> None:
    """A random TopK SAE for the tiny model's resid_post.2, saved in ``directory``."""
    import torch

    from saeguard.sae import SAEConfig, create_sae
    from saeguard.sae.io import save_sae

    torch.manual_seed(0)
    sae = create_sae(SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4))
    save_sae(sae, directory, {"model": str(model), "hook": "resid_post.2", "corpus": "wiki-en",
                              "ctx_len": 16})  # fmt: skip


def test_ood_fit_and_benchmark_commands_end_to_end(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _random_sae(tiny_llama_dir, tmp_path / "sae")
    mon = str(tmp_path / "mon")
    argv = ["-q", "ood", "fit", str(tmp_path / "sae"), "--out", mon, "--fit-texts", "40",
            "--calibration-texts", "30", "--no-fused-with-lm"]  # fmt: skip
    assert main(argv) == 0
    fitted = json.loads(capsys.readouterr().out)
    assert fitted["threshold"] is not None and fitted["calibration"]["n_texts"] == 30
    assert fitted["device"] == "cpu"  # --device auto on a machine without a GPU
    assert json.loads((tmp_path / "mon" / "monitor.json").read_text())["device"] == "cpu"
    argv = ["-q", "ood", "benchmark", "--monitor", mon, "--out", str(tmp_path / "b"),
            "--shifts", "typos:0.2,wiki-fr", "--id-texts", "12", "--per-shift", "10",
            "--no-lm-baselines", "--resamples", "100"]  # fmt: skip
    assert main(argv) == 0
    assert "measured FPR" in capsys.readouterr().out
    bench = json.loads((tmp_path / "b" / "ood_benchmark.json").read_text())
    assert set(bench["shifts"]) == {"typos:0.2", "wiki-fr"} and "msp" not in bench["scores"]
    # The fused score (here without the LM baselines) is the flag, with its summary per shift.
    assert bench["calibration"]["flag_score"] == "fused" and "fused" in bench["scores"]
    assert set(bench["summary"]["per_shift"]) == {"typos:0.2", "wiki-fr"}
    assert "wins" in (tmp_path / "b" / "ood_benchmark.md").read_text()
    assert bench["device"] == "cpu" and bench["config"].get("device") is None
    out = tmp_path / "x"
    rc = main(["-q", "ood", "benchmark", "--monitor", str(tmp_path / "nothing"), "--out", str(out)])
    assert rc == 2 and "not a monitor directory" in capsys.readouterr().err
    assert not out.exists()  # a bad input creates nothing


def test_ood_fit_never_deletes_files_it_did_not_write(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Issue 13, case 1: `ood fit --out m` into a folder with a user's file used to delete it."""
    _random_sae(tiny_llama_dir, tmp_path / "sae")
    mon = tmp_path / "m"
    mon.mkdir()
    (mon / "important.txt").write_text("precious")
    argv = ["-q", "ood", "fit", str(tmp_path / "sae"), "--out", str(mon), "--fit-texts", "40",
            "--calibration-texts", "30"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "important.txt" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in mon.iterdir()] == ["important.txt"]
    (mon / "important.txt").unlink()
    assert main(argv) == 0  # an empty folder is fine, and so is refitting over its own monitor
    first = (mon / "monitor.json").read_bytes()
    assert main(argv) == 0
    assert (mon / "monitor.json").read_bytes() == first


@pytest.mark.parametrize("name", ["no-such-model", "bad id!"])
def test_an_unknown_model_fails_before_transformers_searches_for_it(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Issue 13, case 7: an unknown name took ~30 s to fail offline (transformers searched the
    hub and its cache); now the id is checked first, with one line and nothing written."""
    import transformers

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("transformers was asked to load an unknown model")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", never)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "x"
    rc = main(["harvest", "--model", name, "--hook", "resid_post.1", "--corpus", "wiki-en",
               "--tokens", "100", "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and f"unknown model {name!r}" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_every_architecture_setting_is_a_train_option() -> None:
    """jumprelu bandwidth and initial threshold, matryoshka prefixes and the BatchTopK threshold
    momentum are `saeguard train` flags that reach the SAE configs (and old flags still work)."""
    from saeguard.jobs.train import TrainJobConfig

    argv = ["train", "--out", "x", "--arch", "jumprelu,matryoshka,batchtopk,topk",
            "--jumprelu-bandwidth", "0.2", "--jumprelu-init-threshold", "0.3", "--l0-target", "5",
            "--matryoshka-prefixes", "4,16", "--threshold-momentum", "0.5", "--aux-coef", "0.1",
            "--k", "4", "--expansion", "8"]  # fmt: skip
    job = config_from_args(TrainJobConfig, build_parser().parse_args(argv))
    configs = {c.architecture: c for c in job.sae_configs(d_in=8).values()}
    assert (configs["jumprelu"].jumprelu_bandwidth, configs["jumprelu"].jumprelu_init_threshold,
            configs["jumprelu"].l0_target) == (0.2, 0.3, 5.0)  # fmt: skip
    assert configs["matryoshka"].matryoshka_prefixes == [4, 16]
    assert (
        configs["matryoshka"].threshold_momentum == configs["batchtopk"].threshold_momentum == 0.5
    )
    assert all(c.aux_coef == 0.1 for c in configs.values())
    assert not hasattr(configs["topk"], "jumprelu_bandwidth")
    defaults = config_from_args(TrainJobConfig, build_parser().parse_args(["train", "--out", "x"]))
    assert defaults.architecture_options == {} and defaults.sae.aux_coef == 1 / 32
    from saeguard.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown architecture setting"):
        TrainJobConfig(out="x", architecture_options={"bandwidth": 1.0})


def test_flags_of_before_nesting_reach_the_nested_settings() -> None:
    """`run`, `robustify` and `ood fit` keep their flat flags; each lands in its sub-config, and
    a sub-config's unset settings keep the one default they have."""
    from saeguard.jobs.ood import OodFitConfig
    from saeguard.jobs.robustify import RobustifyConfig
    from saeguard.jobs.run import RunConfig
    from saeguard.ood import MonitorConfig

    run = config_from_args(RunConfig, build_parser().parse_args(
        ["run", "--fit-texts", "700", "--calibration-texts", "90", "--target-fpr", "0.1",
         "--shifts", "typos:0.2,bbc", "--id-texts", "50", "--per-shift", "30",
         "--checkpoint-every", "7", "--k", "16"]))  # fmt: skip
    assert (run.monitor.fit_texts, run.monitor.calibration_texts, run.monitor.target_fpr) == (
        700, 90, 0.1)  # fmt: skip
    assert (run.benchmark.shifts, run.benchmark.id_texts, run.benchmark.per_shift) == (
        ["typos:0.2", "bbc"], 50, 30)  # fmt: skip
    assert run.train.checkpoint_every == 7 and run.k == 16
    assert run.monitor.flag_score == MonitorConfig().flag_score
    default_run = config_from_args(RunConfig, build_parser().parse_args(["run"]))
    assert default_run == RunConfig() and default_run.train.checkpoint_every == 50
    argv = ["robustify", "--fit-texts", "200", "--calibration-texts", "40", "--seed", "3"]
    robust = config_from_args(RobustifyConfig, build_parser().parse_args(argv))
    assert (robust.monitor_fit.fit_texts, robust.monitor_fit.calibration_texts) == (200, 40)
    assert robust.seed == 3
    fit = config_from_args(OodFitConfig, build_parser().parse_args(
        ["ood", "fit", "sae", "--out", "m", "--fit-texts", "300", "--no-calibrate",
         "--flag-score", "recon_error"]))  # fmt: skip
    assert (fit.sae_dir, fit.out, fit.calibrate) == ("sae", "m", False)
    assert (fit.monitor.fit_texts, fit.monitor.flag_score) == (300, "recon_error")
