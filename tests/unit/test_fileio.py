"""Output rules: atomic files and directories that never delete what saeguard did not write,
never write outside their target, and honour the umask (issue 13, cases 1 and 8)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from saeguard.errors import SaeguardError
from saeguard.fileio import STAGING_PREFIX, atomic_directory, atomic_write_text

OWN = ("weights.bin", "sub", "index.json")


def _write_output(target: Path, version: str) -> None:
    with atomic_directory(target, OWN, index="index.json") as tmp:
        (tmp / "weights.bin").write_text(version)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "inner.txt").write_text(version)
        (tmp / "index.json").write_text(version)


def test_a_directory_with_foreign_files_is_refused_untouched(tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    (target / "important.txt").write_text("precious")
    with pytest.raises(SaeguardError, match=r"important\.txt.*another --out"):
        _write_output(target, "v1")
    assert sorted(p.name for p in target.iterdir()) == ["important.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing beside it either


def test_own_output_is_replaced_and_nothing_is_written_beside_it(tmp_path: Path) -> None:
    target = tmp_path / "m"
    _write_output(target, "v1")
    _write_output(target, "v2")
    assert (target / "weights.bin").read_text() == "v2"
    assert (target / "sub" / "inner.txt").read_text() == "v2"
    assert sorted(p.name for p in target.iterdir()) == sorted(OWN)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_failed_write_keeps_the_previous_output_and_leftovers_are_cleaned(
    tmp_path: Path,
) -> None:
    target = tmp_path / "m"
    _write_output(target, "v1")
    with (
        pytest.raises(RuntimeError, match="disk"),
        atomic_directory(target, OWN, "index.json") as tmp,
    ):
        (tmp / "weights.bin").write_text("half")
        raise RuntimeError("disk full")
    assert (target / "index.json").read_text() == "v1"
    assert (target / "weights.bin").read_text() == "v1"
    (target / f"{STAGING_PREFIX}killed").mkdir()  # what a SIGKILL mid-write leaves
    _write_output(target, "v2")
    assert sorted(p.name for p in target.iterdir()) == sorted(OWN)


@pytest.fixture
def umask_002() -> Iterator[None]:
    old = os.umask(0o002)
    try:
        yield
    finally:
        os.umask(old)


def test_written_files_and_directories_honour_the_umask(tmp_path: Path, umask_002: None) -> None:
    """A team sharing a results directory can read each other's runs (umask 002: 664 / 775)."""
    atomic_write_text(tmp_path / "a.json", "{}")
    _write_output(tmp_path / "m", "v1")
    for path in (tmp_path / "a.json", tmp_path / "m" / "index.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o664, path
    for path in (tmp_path / "m", tmp_path / "m" / "sub"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o775, path


def test_a_command_claims_only_an_empty_folder_or_its_own_output(tmp_path: Path) -> None:
    from saeguard.errors import CorruptFileError
    from saeguard.fileio import OUTPUT_MARKER, claim_output_directory

    fresh = tmp_path / "fresh"
    claim_output_directory(fresh, "train")
    assert (fresh / OUTPUT_MARKER).is_file()
    claim_output_directory(fresh, "train")  # a re-run (resume) of the same command
    with pytest.raises(SaeguardError, match=r"output of `saeguard train`.*another --out"):
        claim_output_directory(fresh, "ood benchmark")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(SaeguardError, match=r"thesis\.tex.*another --out"):
        claim_output_directory(foreign, "run", index=("run.json",))
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]
    legacy = tmp_path / "legacy"  # written by a saeguard without markers: adopted by its index
    legacy.mkdir()
    (legacy / "run.json").write_text("{}")
    claim_output_directory(legacy, "run", index=("run.json",))
    assert (legacy / OUTPUT_MARKER).is_file()
    (legacy / OUTPUT_MARKER).write_text("{not json")
    with pytest.raises(CorruptFileError, match="delete that file"):
        claim_output_directory(legacy, "run")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SaeguardError, match="existing file"):
        claim_output_directory(tmp_path / "file", "run")


def test_train_refuses_a_folder_holding_someone_elses_files(tmp_path: Path) -> None:
    """The rule at a command's entry: `saeguard train --out` into a non-empty foreign folder."""
    from saeguard.train import TrainJobConfig, run_training

    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("precious")
    with pytest.raises(SaeguardError, match=r"todo\.txt"):
        run_training(TrainJobConfig(acts=str(tmp_path / "no-cache"), out=str(out)))
    assert [p.name for p in out.iterdir()] == ["todo.txt"]


def test_claiming_its_own_output_clears_only_its_killed_writes_temporaries(tmp_path: Path) -> None:
    from saeguard.fileio import claim_output_directory

    out = tmp_path / "out"
    claim_output_directory(out, "train")
    (out / "checkpoint").mkdir()
    leftover = out / "checkpoint" / ".state.json.ab12cd34.tmp"  # a SIGKILL between write and rename
    leftover.write_text("half")
    users = out / "notes.tmp"
    users.write_text("mine")
    claim_output_directory(out, "train")
    assert not leftover.exists() and users.read_text() == "mine"
