"""Refactoring guards: the outputs of a `run --quick`-scale job on a tiny model, and the CLI's
flags, must stay what they were when these files were recorded (issue 14: behaviour unchanged).

``tests/golden/run_quick_tiny.json`` holds the normalised outputs (timings, dates, temporary
paths and step signatures removed; config echoes flattened to their leaf settings, since configs
became nested). Numbers are compared exactly when the machine has the CPU features of the one
that recorded them, and to 1e-3 otherwise (another instruction set sums in another order).
Re-record only on purpose: ``SAEGUARD_WRITE_GOLDEN=1 pytest tests/unit/test_golden.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

GOLDEN = Path(__file__).parents[1] / "golden"
RUN_GOLDEN = GOLDEN / "run_quick_tiny.json"
FILES = ("run.json", "sae/eval.json", "sae/train_results.json", "ood/ood_benchmark.json",
         "ood/examples.json", "monitor/monitor.json")  # fmt: skip
VOLATILE = {"seconds", "step_seconds_total", "wall_seconds_this_invocation", "created",
            "tokens_per_s", "timings_s", "throughput", "expected_s", "train_rate", "signature",
            "report", "fingerprint"}  # fmt: skip
CONFIG_ECHOES = {"config", "settings"}
RENAMED = {
    "run.json": {"fit_texts": "monitor.fit_texts", "calibration_texts": "monitor.calibration_texts",
                 "target_fpr": "monitor.target_fpr", "shifts": "benchmark.shifts",
                 "id_texts": "benchmark.id_texts", "per_shift": "benchmark.per_shift",
                 "checkpoint_every": "train.checkpoint_every"},
    "sae/eval.json": {"core_contexts": "core.contexts", "ce_contexts": "ce.contexts",
                      "absorption_words": "absorption.words", "probing_ks": "probing.ks",
                      "probing_per_class": "probing.per_class", "probing_sets": "probing.sets",
                      "probing_pooling": "probing.pooling", "ood_k": "ood_probing.k",
                      "ood_shifts": "ood_probing.shifts", "typo_rate": "ood_probing.typo_rate"},
}  # fmt: skip
"""Settings that moved into a sub-config when configs became nested (issue 14): old name ->
dotted path in the new config echo."""
ADDED = {"device"}
"""Keys outputs gained after the recording, accepted where the recording lacks them: the device
a run computed on (issue 15: run.json, eval.json, monitor.json, ood_benchmark.json)."""


def _leaves(value: Any, into: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every scalar or list setting of a (possibly nested) config echo, by its dotted path."""
    for key, item in value.items():
        if isinstance(item, dict):
            _leaves(item, into, f"{prefix}{key}.")
        else:
            into[prefix + key] = item
    return into


def _normalise(value: Any, paths: dict[str, str], key: str = "") -> Any:
    if isinstance(value, dict):
        if key in CONFIG_ECHOES:
            leaves = _leaves(_normalise(dict(value), paths), {})
            return {"__leaves__": dict(sorted(leaves.items()))}
        return {k: _normalise(v, paths, k) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_normalise(v, paths) for v in value]
    if isinstance(value, str):
        for path, name in paths.items():
            value = value.replace(path, name)
    return value


def _run_outputs(model_dir: Path, out: Path) -> dict[str, Any]:
    from saeguard.jobs.ood import OodBenchmarkConfig
    from saeguard.jobs.run import RunConfig, run
    from saeguard.ood import MonitorConfig
    from saeguard.train.trainer import TrainerConfig

    state = run(RunConfig(out=str(out), model=str(model_dir), hook="resid_post.2", quick=True,
                          tokens=10 * 4096, dtype="float32",
                          train=TrainerConfig(checkpoint_every=2),
                          monitor=MonitorConfig(fit_texts=40, calibration_texts=30),
                          benchmark=OodBenchmarkConfig(id_texts=20, per_shift=12,
                                                       shifts=["typos:0.2"])))  # fmt: skip
    paths = {str(out): "<OUT>", str(model_dir): "<MODEL>"}
    outputs = {
        name: _normalise(json.loads((out / name).read_text(encoding="utf-8")), paths)
        for name in FILES
    }
    outputs["cpu_flags"] = state["steps"]["plan"]["throughput"]["cpu_flags"]
    return outputs


def _compare(new: Any, old: Any, exact: bool, where: str = "") -> list[str]:
    if isinstance(old, dict) and "__leaves__" in old:
        leaves = new.get("__leaves__", {}) if isinstance(new, dict) else {}
        renamed = next((r for file, r in RENAMED.items() if where.startswith(f"/{file}/")), {})
        moved = {renamed.get(k, k): v for k, v in old["__leaves__"].items()}
        return [
            f"{where}: setting {k} = {leaves.get(k, '<missing>')!r}, was {v!r}"
            for k, v in moved.items()
            if k not in leaves or _compare(leaves[k], v, exact)
        ]
    if isinstance(old, dict):
        if isinstance(new, dict):
            new = {k: v for k, v in new.items() if k in old or k not in ADDED}
        if not isinstance(new, dict) or set(new) != set(old):
            added = set(new) - set(old) if isinstance(new, dict) else set()
            missing = set(old) - set(new) if isinstance(new, dict) else set(old)
            return [f"{where}: keys differ (new {sorted(added)}, missing {sorted(missing)})"]
        return [p for k in old for p in _compare(new[k], old[k], exact, f"{where}/{k}")]
    if isinstance(old, list):
        if not isinstance(new, list) or len(new) != len(old):
            return [f"{where}: {new!r} != {old!r}"]
        return [p for i, (n, o) in enumerate(zip(new, old, strict=True))
                for p in _compare(n, o, exact, f"{where}[{i}]")]  # fmt: skip
    if isinstance(old, float) and isinstance(new, int | float) and not isinstance(new, bool):
        same = new == old if exact else math.isclose(new, old, rel_tol=1e-3, abs_tol=1e-6)
        return [] if same else [f"{where}: {new!r} != {old!r}"]
    return [] if new == old and type(new) is type(old) else [f"{where}: {new!r} != {old!r}"]


def test_run_quick_outputs_are_unchanged(tiny_llama_dir: Path, tmp_path: Path) -> None:
    outputs = _run_outputs(tiny_llama_dir, tmp_path / "run")
    if os.environ.get("SAEGUARD_WRITE_GOLDEN") == "1":
        RUN_GOLDEN.write_text(json.dumps(outputs, indent=1, sort_keys=True) + "\n")
    golden = json.loads(RUN_GOLDEN.read_text(encoding="utf-8"))
    exact = outputs["cpu_flags"] == golden["cpu_flags"]
    problems = _compare(outputs, golden, exact)
    assert not problems, "\n".join(problems[:30])


def test_compare_finds_a_changed_number_and_a_lost_setting() -> None:
    """The comparison above can fail: a moved number, a missing key or setting is reported."""
    old = {"a": {"x": 1.0, "config": {"__leaves__": {"k": 32, "shifts": ["typos"]}}}}
    assert not _compare(old, old, exact=True)
    assert _compare({"a": {"x": 1.0 + 1e-12, "config": old["a"]["config"]}}, old, exact=True)
    moved = {"a": {"x": 1.0, "config": {"__leaves__": {"k": 32}}}}
    assert "setting shifts" in _compare(moved, old, exact=True)[0]
    nested = _normalise({"config": {"k": 32, "benchmark": {"shifts": ["typos"]}}}, {})
    renamed = {"run.json": {"a": {"x": 1.0, "config": nested["config"]}}}
    assert not _compare(renamed, {"run.json": old}, exact=True)
    assert _compare({"a": {"x": 1.0, "config": nested["config"]}}, old, exact=True)
    device = {"a": {"x": 1.0, "config": old["a"]["config"], "device": "cpu"}}
    assert not _compare(device, old, exact=True)  # a key added since the recording
    assert _compare({"a": {"x": 1.0, "config": old["a"]["config"], "other": 1}}, old, exact=True)


def _option_strings(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                for key, flags in _option_strings(sub, f"{prefix} {name}".strip()).items():
                    found.setdefault(key, set()).update(flags)
        elif action.option_strings:
            found.setdefault(prefix or "(top)", set()).update(action.option_strings)
        elif action.dest != "help":
            found.setdefault(prefix or "(top)", set()).add(f"<{action.dest}>")
    return found


def test_every_recorded_cli_flag_still_exists() -> None:
    from saeguard.cli import build_parser

    recorded = json.loads((GOLDEN / "cli_flags.json").read_text(encoding="utf-8"))
    now = _option_strings(build_parser())
    lost = {cmd: sorted(set(flags) - now.get(cmd, set())) for cmd, flags in recorded.items()}
    assert not {cmd: flags for cmd, flags in lost.items() if flags}
