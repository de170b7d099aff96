"""Issue 15: every command takes ``--device``, a missing GPU is one line before any work, and
`ood score` runs data-parallel under torchrun with the output of one process."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from saeguard.cli import build_parser, commands, main
from saeguard.configs import config_from_args
from saeguard.devices import DEVICE_HELP
from tests.conftest import fit_tiny_monitor
from tests.conftest import random_texts as _texts

REPO = Path(__file__).parents[2]

# The smallest arguments of each command; the inputs do not exist, so a command that resolved
# its device after reading them would fail on them instead of on the device.
COMMANDS: dict[str, list[str]] = {
    "run": ["run", "--out", "{out}", "--model", "{missing}"],
    "harvest": ["harvest", "--out", "{out}", "--model", "{missing}"],
    "train": ["train", "--out", "{out}", "--model", "{missing}"],
    "eval": ["eval", "{missing}", "--out", "{out}"],
    "study masking": ["study", "masking", "--out", "{out}", "--model", "{missing}"],
    "study probing": ["study", "probing", "{missing}", "--out", "{out}"],
    "ood fit": ["ood", "fit", "{missing}", "--out", "{out}"],
    "ood score": ["ood", "score", "--monitor", "{missing}", "a text to score"],
    "ood benchmark": ["ood", "benchmark", "--monitor", "{missing}", "--out", "{out}"],
    "robustify": ["robustify", "--out", "{out}", "--sae", "{missing}", "--model", "{missing}"],
    "hooks": ["hooks", "{missing}"],
    "serve": ["serve", "--monitor", "{missing}"],
    "browse": ["browse", "{missing}", "--out", "{out}"],
}


def _argv(command: str, tmp_path: Path, device: str) -> list[str]:
    words = [w.format(out=tmp_path / "out", missing=tmp_path / "missing")
             for w in COMMANDS[command]]  # fmt: skip
    return [*words, "--device", device]


def _subparser(path: list[str]) -> argparse.ArgumentParser:
    parser = build_parser()
    for word in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[word]
    return parser


def _device_of(config: Any) -> str:
    return str(config.eval.device if hasattr(config, "eval") and not hasattr(config, "device")
               else config.device)  # fmt: skip


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_one_device_flag_and_parses_it(command: str, tmp_path: Path) -> None:
    parser = _subparser(command.split())
    flagged = [a for a in parser._actions if "--device" in a.option_strings]
    assert len(flagged) == 1, f"`{command}` has {len(flagged)} --device options"
    assert " ".join(flagged[0].help.split()).startswith(DEVICE_HELP)  # type: ignore[union-attr]
    config = next(c.config for c in commands() if c.path == tuple(command.split()))
    args = build_parser().parse_args(_argv(command, tmp_path, "cpu"))
    assert _device_of(config_from_args(config, args)) == "cpu"
    default = build_parser().parse_args(_argv(command, tmp_path, "auto")[:-2])
    assert _device_of(config_from_args(config, default)) == "auto"
    rc = main(_argv(command, tmp_path, "gpu"))  # not a device word: refused in one line
    assert rc == 2 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_missing_gpu_is_one_line_before_any_work(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    capsys.readouterr()
    assert main(_argv(command, tmp_path, "cuda")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("saeguard: error") and "CUDA" in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_missing_gpu_is_one_stderr_line_in_a_real_process(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "saeguard", *_argv("eval", tmp_path, "cuda")],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "CUDA" in done.stderr
    assert not (tmp_path / "out").exists()


# --- data-parallel `ood score` ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_monitor(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit_tiny_monitor(tiny_llama_dir, tmp_path_factory.mktemp("device_ood"), 40, 30)


def test_a_monitor_records_its_device_and_saves_cpu_tensors(tiny_monitor: Path) -> None:
    from safetensors.torch import load_file

    from saeguard.ood import Monitor

    assert json.loads((tiny_monitor / "monitor.json").read_text())["device"] == "cpu"
    monitor = Monitor.load(tiny_monitor, device="cpu")
    assert monitor.device == torch.device("cpu") and monitor.sae.W_dec.device.type == "cpu"
    stored = load_file(str(tiny_monitor / "id_stats.safetensors"))
    assert {t.device.type for t in stored.values()} == {"cpu"}


def _score(argv_tail: list[str], launcher: list[str]) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, *launcher, "-m", "saeguard", "-q", "ood", "score", *argv_tail],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def test_ood_score_under_torchrun_prints_what_one_process_prints(
    tiny_monitor: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Two ranks (gloo, CPU) split 70 texts, two chunks of SCORE_CHUNK (one empty text in each,
    one of several windows, one flagged for its odd words) and rank 0 prints every result in
    input order: the very lines one process prints, every number bit for bit (whole chunks
    keep every batch of the model and the SAE what it is in one process)."""
    from saeguard.ood.monitor import SCORE_CHUNK

    assert SCORE_CHUNK == 64
    texts = _texts(70, 2)
    texts[3] = texts[66] = ""
    texts[67] = " ".join(["the river city"] * 30)
    texts[68] = "zebra quilt xylophone umbrella velvet kettle " * 3
    source = tmp_path / "texts.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    # --monitor-dir: torchrun's parser would take --monitor for its --monitor-interval
    tail = ["--monitor-dir", str(tiny_monitor), "--file", str(source), "--input-format",
            "jsonl", "--explain-all", "--device", "cpu"]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process (thread counts change rounding)
    try:
        capsys.readouterr()
        assert main(["-q", "ood", "score", *tail]) == 0
        single = capsys.readouterr().out.splitlines()
    finally:
        torch.set_num_threads(threads)
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    parallel = _score(tail, launcher)
    assert len(single) == len(texts)
    rows = [json.loads(line) for line in parallel]
    assert [r["index"] for r in rows] == list(range(len(texts)))
    assert rows[3]["error"] and rows[66]["error"] and rows[67]["n_windows"] > 1
    assert rows[68]["explanation"] and rows[0]["scores"]
    assert parallel == single


def test_ood_score_refuses_to_mix_with_torchrun_only_where_it_must() -> None:
    """`ood score` is data-parallel; the commands that are not refuse torchrun."""
    parallel = {" ".join(c.path) for c in commands() if c.distributed}
    assert "ood score" in parallel and "ood benchmark" not in parallel
