"""Fuzzing every reader of a saeguard file and every text input path (hypothesis).

The property, for each: a correct result or one ``SaeguardError`` whose message is one line;
never another exception (a traceback for the user), never a file written outside the folder
under test. Valid files are made once by the real writers, then mutated: a subtree replaced by a
random JSON value, a key deleted, bytes flipped or cut. Examples are derandomised and bounded, so
CI runs the same ~2,400 cases every time in a couple of minutes.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from saeguard.errors import MissingPackageError, SaeguardError

FUZZ = settings(
    max_examples=200,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON document (the root is the empty path)."""
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node[:6]):
            found += _paths(value, (*prefix, index))
    return found


@st.composite
def mutated(draw: st.DrawFn, document: Any) -> Any:
    """``document`` with one to three subtrees replaced by random values or deleted."""
    doc = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
        if not path:
            doc = draw(json_values)
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
    return doc


def holds(action: Callable[[], Any]) -> None:
    """The fuzz property: success, or one SaeguardError with a one-line message."""
    try:
        action()
    except MissingPackageError:  # its message carries the pip command on a second line
        raise
    except SaeguardError as exc:
        message = str(exc).strip()
        assert message and "\n" not in message, repr(message)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value), encoding="utf-8")


# --- corpus files in each format ---------------------------------------------------------------
@FUZZ
@given(data=st.binary(max_size=400), fmt=st.sampled_from(["txt", "jsonl", "csv"]))
def test_corpus_files_of_random_bytes(tmp_path: Path, data: bytes, fmt: str) -> None:
    from saeguard.data import load_corpus

    path = tmp_path / f"fuzz.{fmt}"
    path.write_bytes(data)
    holds(lambda: load_corpus(str(path)))


@FUZZ
@given(lines=st.lists(json_values, max_size=6))
def test_jsonl_corpora_of_random_json_lines(tmp_path: Path, lines: list[Any]) -> None:
    from saeguard.data import load_corpus

    path = tmp_path / "fuzz.jsonl"
    path.write_text("\n".join(json.dumps(v) for v in lines), encoding="utf-8")
    holds(lambda: load_corpus(str(path)))


@FUZZ
@given(rows=st.lists(st.lists(st.text(max_size=10), max_size=4), max_size=6))
def test_csv_corpora_of_random_cells(tmp_path: Path, rows: list[list[str]]) -> None:
    import csv

    from saeguard.data import load_corpus

    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    path = tmp_path / "fuzz.csv"
    path.write_text(buffer.getvalue(), encoding="utf-8")
    holds(lambda: load_corpus(str(path)))


# --- saeguard's own files ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import make_text_corpus

    from saeguard.jobs.harvest import HarvestConfig, harvest

    root = tmp_path_factory.mktemp("fuzz-cache")
    corpus = make_text_corpus(root / "corpus.txt")
    harvest(HarvestConfig(model=str(tiny_llama_dir), hooks=["resid_post.1"], corpus=str(corpus),
                          split="all", ctx_len=16, batch_size=4, shard_tokens=96, tokens=300,
                          calibration_contexts=4, out=str(root / "cache")))  # fmt: skip
    return root / "cache"


@FUZZ
@given(data=st.data())
def test_cache_manifests_mutated(cache_dir: Path, tmp_path: Path, data: st.DataObject) -> None:
    from saeguard.activations import ActivationCache

    manifest = json.loads((cache_dir / "manifest.json").read_text())
    target = tmp_path / "cache"
    if not target.exists():
        shutil.copytree(cache_dir, target)
    _write_json(target / "manifest.json", data.draw(mutated(manifest)))
    before = sorted(p.name for p in tmp_path.iterdir())

    def read() -> None:
        cache = ActivationCache.open(target)
        for hook in cache.hooks:
            cache.n_tokens(hook)
            cache.d_model(hook)
        cache.verify()

    holds(read)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from saeguard.sae import SAEConfig, create_sae
    from saeguard.sae.io import save_sae

    directory = tmp_path_factory.mktemp("fuzz-sae") / "sae"
    sae = create_sae(SAEConfig(architecture="batchtopk", d_in=8, d_sae=16, k=2))
    save_sae(sae, directory, {"model": "m", "hook": "resid_post.1"})
    return directory


@FUZZ
@given(data=st.data())
def test_sae_cfg_json_mutated(sae_dir: Path, tmp_path: Path, data: st.DataObject) -> None:
    from saeguard.sae.io import load_sae

    target = tmp_path / "sae"
    if not target.exists():
        shutil.copytree(sae_dir, target)
    document = json.loads((sae_dir / "cfg.json").read_text())
    _write_json(target / "cfg.json", data.draw(mutated(document)))
    holds(lambda: load_sae(target))


@FUZZ
@given(
    shapes=st.dictionaries(
        st.sampled_from(["W_enc", "b_enc", "W_dec", "b_dec", "threshold", "other"]),
        st.lists(st.integers(0, 20), min_size=0, max_size=3),
        max_size=6,
    ),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]),
    poison=st.sampled_from([None, float("nan"), float("inf")]),
)
def test_sae_weights_of_random_names_shapes_and_values(
    sae_dir: Path, tmp_path: Path, shapes: dict[str, list[int]], dtype: torch.dtype, poison: Any
) -> None:
    from saeguard.sae.io import load_sae

    target = tmp_path / "sae"
    if not target.exists():
        shutil.copytree(sae_dir, target)
    tensors = {name: torch.zeros(shape, dtype=dtype) for name, shape in shapes.items()}
    if poison is not None and dtype.is_floating_point:
        for tensor in tensors.values():
            if tensor.numel():
                tensor.view(-1)[0] = poison
    save_file(tensors, str(target / "sae_weights.safetensors"))
    holds(lambda: load_sae(target))


@FUZZ
@given(cut=st.integers(0, 4000), flips=st.lists(st.integers(0, 4000), max_size=4))
def test_sae_weights_torn_or_flipped(
    sae_dir: Path, tmp_path: Path, cut: int, flips: list[int]
) -> None:
    from saeguard.sae.io import load_sae

    target = tmp_path / "sae"
    if not target.exists():
        shutil.copytree(sae_dir, target)
    data = bytearray((sae_dir / "sae_weights.safetensors").read_bytes())
    for position in flips:
        data[position % len(data)] ^= 0xA5
    (target / "sae_weights.safetensors").write_bytes(bytes(data[: max(cut, 1)]))
    holds(lambda: load_sae(target))


@pytest.fixture(scope="module")
def monitor_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from saeguard.ood import Monitor, MonitorConfig
    from saeguard.sae import SAEConfig, create_sae
    from saeguard.sae.io import save_sae

    root = tmp_path_factory.mktemp("fuzz-monitor")
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4))
    save_sae(sae, root / "sae", {"model": str(tiny_llama_dir), "hook": "resid_post.2",
                                 "corpus": "wiki-en", "ctx_len": 16})  # fmt: skip
    texts = [f"the river city number {i} and the dark stone of history" for i in range(60)]
    monitor = Monitor.fit(root / "sae", MonitorConfig(fit_texts=40, calibration_texts=20),
                          texts=texts[:40])  # fmt: skip
    monitor.calibrate(texts[40:])
    monitor.save(root / "monitor")
    return root / "monitor"


@FUZZ
@given(data=st.data())
def test_monitor_json_mutated(monitor_dir: Path, tmp_path: Path, data: st.DataObject) -> None:
    from saeguard.ood.storage import read_monitor_document

    target = tmp_path / "monitor"
    target.mkdir(exist_ok=True)
    document = json.loads((monitor_dir / "monitor.json").read_text())
    _write_json(target / "monitor.json", data.draw(mutated(document)))
    holds(lambda: read_monitor_document(target))


@pytest.fixture(scope="module")
def loaded_monitor(monitor_dir: Path) -> Any:
    from saeguard.ood import Monitor

    return Monitor.load(monitor_dir)


@settings(FUZZ, max_examples=100)
@given(
    texts=st.lists(
        st.one_of(
            st.text(max_size=80),
            st.binary(max_size=80),
            st.text(alphabet=st.characters(codec="utf-8"), max_size=400),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_ood_score_inputs_random_text_and_bytes(loaded_monitor: Any, texts: list[Any]) -> None:
    """What `ood score` hands the monitor (stdin, files, arguments): each text gets scores or a
    per-text error, never an exception."""
    results = loaded_monitor.score(texts, explain=False)
    assert len(results) == len(texts)
    for result in results:
        assert (result.error is None) == bool(result.scores), result


@settings(FUZZ, max_examples=30)  # each example loads the monitor and its model
@given(data=st.binary(max_size=300), fmt=st.sampled_from(["lines", "jsonl", "whole"]))
def test_ood_score_cli_reads_any_stdin(
    monitor_dir: Path, data: bytes, fmt: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from saeguard.cli import main

    class Stdin:
        buffer = io.BytesIO(data)

    monkeypatch.setattr("sys.stdin", Stdin())
    rc = main(["-q", "ood", "score", "--monitor", str(monitor_dir), "--input-format", fmt])
    out, err = capsys.readouterr()
    assert rc in (0, 2) and "Traceback" not in err
    if rc == 2:  # one error line (progress bars and warnings may precede it on stderr)
        assert len([line for line in err.splitlines() if "error" in line.lower()]) == 1, err


@FUZZ
@given(content=st.binary(max_size=80) | json_values.map(lambda v: json.dumps(v).encode()))
def test_output_markers_of_any_content(tmp_path: Path, content: bytes) -> None:
    from saeguard.fileio import OUTPUT_MARKER, claim_output_directory

    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / OUTPUT_MARKER).write_bytes(content)
    holds(lambda: claim_output_directory(out, "train"))


@FUZZ
@given(data=st.data())
def test_eval_json_mutated(sae_dir: Path, tmp_path: Path, data: st.DataObject) -> None:
    from saeguard.jobs.eval import _load_previous, load_eval

    document = {"format": "saeguard-eval", "format_version": 1, "saeguard_version": "0.1.0",
                "sae": {"path": str(sae_dir)}, "settings": {}, "metrics": {}, "details": {},
                "timings_s": {}, "eval_settings": {}, "complete": False}  # fmt: skip
    path = tmp_path / "eval.json"
    _write_json(path, data.draw(mutated(document)))
    holds(lambda: _load_previous(path, str(sae_dir)))
    holds(lambda: load_eval(path))
