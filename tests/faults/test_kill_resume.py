"""Fault injection: SIGKILL every long command at seeded random moments, run it again, and demand
the outputs of an uninterrupted run.

The moments are drawn among the command's failpoints (``saeguard.fileio.failpoint``: before and
after every atomic rename, after every training step), which are exactly the moments where a
crash leaves a distinct state on disk; the process kills itself there with SIGKILL, as a power
cut or the out-of-memory killer would. Each command runs on a tiny random model built here.

Outputs are compared file by file: byte for byte, except that JSON documents are compared
without the fields that measure time (seconds, rates, dates), and HTML/markdown reports, which
print those timings, are compared with every number-with-a-unit of time masked.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from saeguard.fileio import FAULT_COUNT_ENV, FAULT_DISK_FULL_ENV, FAULT_KILL_ENV

KILLS_PER_COMMAND = 4
"""Seeded kill moments per command (each a killed run and a resumed one): four keep the suite
inside CI's 25-minute budget (five did before issue 19's tests were added)."""
TIMING_KEY = re.compile(
    r"(^|_)(seconds|secs|time|times|timings?|elapsed|duration|date|created|started|finished|tok_s|"
    r"tokens_per_s|per_s|rate|wall|hours|minutes|throughput)($|_)|_s$"
)
TIMING_TEXT = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)?"  # a timestamp
    r"|\d[\d,.]*\s*(s|ms|min|minutes|seconds|tok/s|tokens/s)\b"
)


@dataclass(frozen=True)
class Setup:
    """What the commands run on: built once per module."""

    model: Path
    corpus: Path
    cache: Path
    sae: Path
    monitor: Path
    env: dict[str, str]


def _cli(args: list[str], env: dict[str, str], **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "saeguard", "-q", *args],
        env={**env, **extra},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def setup(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    from conftest import make_text_corpus

    root = tmp_path_factory.mktemp("faults")
    faults = (FAULT_KILL_ENV, FAULT_COUNT_ENV, FAULT_DISK_FULL_ENV)
    env = {k: v for k, v in os.environ.items() if k not in faults}
    env.update(HF_HUB_OFFLINE="1", SAEGUARD_CACHE=str(root / "cache-root"))
    corpus = make_text_corpus(root / "corpus.txt", n_docs=80)
    cache, sae, monitor = root / "acts", root / "sae", root / "monitor"
    for args in (
        _harvest_args(tiny_llama_dir, "wiki-en", cache),  # labelled: robustify probes topics
        ["train", "--acts", str(cache), "--arch", "topk", "--k", "4", "--expansion", "2",
         "--tokens", "1024", "--batch-tokens", "128", "--buffer-tokens", "256",
         "--eval-tokens", "128", "--out", str(sae)],
        ["ood", "fit", str(sae), "--corpus", "wiki-en", "--out", str(monitor), "--fit-texts", "40",
         "--calibration-texts", "30", "--no-fused-with-lm"],
    ):  # fmt: skip
        done = _cli(args, env)
        assert done.returncode == 0, done.stderr
    return Setup(tiny_llama_dir, corpus, cache, sae, monitor, env)


def _harvest_args(model: Path, corpus: Path | str, out: Path) -> list[str]:
    return ["harvest", "--model", str(model), "--hook", "resid_post.2", "--corpus", str(corpus),
            "--split", "all", "--ctx-len", "16", "--batch-size", "4", "--shard-tokens", "96",
            "--tokens", "600", "--calibration-contexts", "4", "--out", str(out)]  # fmt: skip


COMMANDS: dict[str, Callable[[Setup, Path], list[str]]] = {
    "harvest": lambda s, out: _harvest_args(s.model, s.corpus, out),
    "train from a cache": lambda s, out: [
        "train", "--acts", str(s.cache), "--arch", "topk", "--k", "4", "--expansion", "2",
        "--tokens", "2048", "--batch-tokens", "128", "--buffer-tokens", "256",
        "--eval-tokens", "128", "--checkpoint-every", "5", "--out", str(out),
    ],
    "train from the model": lambda s, out: [
        "train", "--model", str(s.model), "--hook", "resid_post.2", "--corpus", str(s.corpus),
        "--split", "all", "--ctx-len", "16", "--calibration-contexts", "4", "--arch", "topk",
        "--k", "4", "--expansion", "2", "--tokens", "1024", "--batch-tokens", "128",
        "--buffer-tokens", "256", "--eval-tokens", "128", "--mask-prob", "0.1",
        "--checkpoint-every", "3", "--out", str(out),
    ],
    "run --quick": lambda s, out: [
        "run", "--model", str(s.model), "--hook", "resid_post.2", "--quick", "--tokens", "8192",
        "--dtype", "float32",
        "--fit-texts", "40", "--calibration-texts", "30", "--id-texts", "16", "--per-shift",
        "10", "--shifts", "typos:0.2,wiki-es", "--checkpoint-every", "4", "--out", str(out),
    ],
    "ood benchmark": lambda s, out: [
        "ood", "benchmark", "--monitor", str(s.monitor), "--shifts", "typos:0.2,wiki-fr",
        "--id-texts", "12", "--per-shift", "10", "--no-lm-baselines", "--resamples", "100",
        "--out", str(out),
    ],
    "robustify --quick": lambda s, out: [
        "robustify", "--model", str(s.model), "--sae", str(s.sae), "--monitor", str(s.monitor),
        "--quick", "--steps", "4", "--checkpoint-every", "2", "--fit-texts", "60",
        "--calibration-texts", "30", "--out", str(out),
    ],
    "study masking --quick": lambda s, out: [
        "study", "masking", "--model", str(s.model), "--hook", "resid_post.2", "--corpus",
        "wiki-en", "--mask-probs", "0,0.2", "--ks", "4", "--seeds", "1", "--tokens", "1024",
        "--quick", "--batch-tokens", "256", "--ctx-len", "32", "--probing-per-class", "6",
        "--absorption-words", "60", "--core-contexts", "8", "--ce-contexts", "2",
        "--out", str(out),
    ],
}  # fmt: skip


def _normalised(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items() if not TIMING_KEY.search(str(k))}
    if isinstance(value, list):
        return [_normalised(v) for v in value]
    return value


def snapshot(out: Path) -> dict[str, str]:
    """Every output file under ``out`` -> a digest of its content, with timings left out and the
    output folder's own path written as OUT (a killed run and the reference differ in both)."""
    from safetensors import safe_open

    here = str(out).encode()
    digests = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        name = str(path.relative_to(out))
        data = path.read_bytes()
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as handle:
                metadata = _normalised(
                    {
                        k: _maybe_json(v.replace(str(out), "OUT"))
                        for k, v in (handle.metadata() or {}).items()
                    }  # fmt: skip
                )
                # The saved global RNG state is left out: it differs between two uninterrupted
                # runs as well (the weights and optimiser state it accompanies do not).
                tensors = {k: hashlib.sha256(handle.get_tensor(k).numpy().tobytes()).hexdigest()
                           for k in sorted(handle.keys()) if k != "rng/torch"}  # fmt: skip
            data = json.dumps([metadata, tensors], sort_keys=True).encode()
        data = data.replace(here, b"OUT")
        if path.suffix == ".json":
            data = json.dumps(_normalised(json.loads(data)), sort_keys=True).encode()
        elif path.suffix == ".jsonl":
            rows = [_normalised(json.loads(line)) for line in data.splitlines() if line.strip()]
            data = json.dumps(rows, sort_keys=True).encode()
        elif path.suffix in (".html", ".md"):
            data = TIMING_TEXT.sub("T", data.decode("utf-8")).encode()
        digests[name] = hashlib.sha256(data).hexdigest()
    return digests


def _maybe_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


PROVEN = list(COMMANDS)
"""Every long command runs in CI: harvest, train (from a cache and from the model), `run
--quick`, `ood benchmark`, `robustify --quick` and `study masking --quick`."""


@pytest.mark.parametrize("command", PROVEN)
def test_killed_at_random_moments_then_rerun_gives_the_uninterrupted_outputs(
    setup: Setup, tmp_path: Path, command: str
) -> None:
    reference = tmp_path / "reference"
    count_file = tmp_path / "failpoints"
    done = _cli(COMMANDS[command](setup, reference), setup.env,
                **{FAULT_COUNT_ENV: str(count_file)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    n_points = json.loads(count_file.read_text())["failpoints"]
    expected = snapshot(reference)
    assert expected, "the command wrote nothing"
    rng = random.Random(f"{command}:{n_points}")
    moments = sorted(rng.sample(range(1, n_points + 1), min(KILLS_PER_COMMAND, n_points)))
    for moment in moments:
        out = tmp_path / f"killed-at-{moment}"
        killed = _cli(COMMANDS[command](setup, out), setup.env, **{FAULT_KILL_ENV: str(moment)})
        assert killed.returncode == -signal.SIGKILL, (moment, n_points, killed.stderr[-2000:])
        resumed = _cli(COMMANDS[command](setup, out), setup.env)
        assert resumed.returncode == 0, (moment, resumed.stderr[-2000:])
        got = snapshot(out)
        differing = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
        assert not differing, f"killed at failpoint {moment} of {n_points}: {differing}"


DISK_FULL_PER_COMMAND = 3


def _one_clear_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("saeguard: error:")]
    assert "Traceback" not in stderr and len(lines) == 1, stderr[-2000:]
    return lines[0]


def test_full_disk_mid_training_is_one_line_and_a_rerun_completes(
    setup: Setup, tmp_path: Path
) -> None:
    """ENOSPC on a seeded choice of the training's atomic writes (checkpoints, results): one
    error line naming the fix, no half-written file, and the same command run again (space
    freed) gives the uninterrupted outputs."""
    command = COMMANDS["train from a cache"]
    reference, count_file = tmp_path / "reference", tmp_path / "counts"
    done = _cli(command(setup, reference), setup.env, **{FAULT_COUNT_ENV: str(count_file)})
    assert done.returncode == 0, done.stderr
    n_writes = json.loads(count_file.read_text())["writes"]
    expected = snapshot(reference)
    rng = random.Random(f"disk-full:{n_writes}")
    for write in sorted(rng.sample(range(1, n_writes + 1), min(DISK_FULL_PER_COMMAND, n_writes))):
        out = tmp_path / f"full-at-{write}"
        failed = _cli(command(setup, out), setup.env, **{FAULT_DISK_FULL_ENV: str(write)})
        assert failed.returncode == 2, (write, failed.stderr[-2000:])
        assert "no space left on the device" in _one_clear_line(failed.stderr)
        assert not [p for p in out.rglob("*.tmp")], "a temporary file was left behind"
        resumed = _cli(command(setup, out), setup.env)
        assert resumed.returncode == 0, (write, resumed.stderr[-2000:])
        assert snapshot(out) == expected, f"disk full at write {write} of {n_writes}"


def test_full_disk_while_replacing_a_monitor_keeps_the_previous_one(
    setup: Setup, tmp_path: Path
) -> None:
    """Re-fitting a monitor into its own folder on a full disk, at each of its writes: the
    previous monitor is left byte for byte as it was (the new one is built aside and swapped in
    only once complete)."""
    import shutil

    def refit(monitor: Path, **faults: str) -> subprocess.CompletedProcess[str]:
        args = ["ood", "fit", str(setup.sae), "--corpus", "wiki-en", "--out", str(monitor),
                "--fit-texts", "30", "--calibration-texts", "20"]  # fmt: skip
        return _cli(args, setup.env, **faults)

    counted, count_file = tmp_path / "counted", tmp_path / "counts"
    shutil.copytree(setup.monitor, counted)
    done = refit(counted, **{FAULT_COUNT_ENV: str(count_file)})
    assert done.returncode == 0, done.stderr
    assert snapshot(counted) != snapshot(setup.monitor), "the re-fit should change the monitor"
    n_writes = json.loads(count_file.read_text())["writes"]
    monitor = tmp_path / "monitor"
    shutil.copytree(setup.monitor, monitor)
    before = snapshot(monitor)
    for write in range(1, n_writes + 1):
        failed = refit(monitor, **{FAULT_DISK_FULL_ENV: str(write)})
        assert failed.returncode == 2, (write, failed.stderr[-2000:])
        assert "no space left on the device" in _one_clear_line(failed.stderr)
        assert snapshot(monitor) == before, f"disk full at write {write} of {n_writes}"
        assert not [p for p in monitor.iterdir() if p.name.startswith(".saeguard-staging-")]
