"""Output rules: atomic files and directories that never delete what saeguard did not write,
never write outside their target, and honour the umask (issue 13, cases 1 and 8)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from saeguard.errors import SaeguardError
from saeguard.fileio import LOCK_FILE, STAGING_PREFIX, atomic_directory, atomic_write_text

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
    assert sorted(p.name for p in target.iterdir()) == sorted({*OWN, LOCK_FILE})
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
    assert sorted(p.name for p in target.iterdir()) == sorted({*OWN, LOCK_FILE})


@pytest.fixture
def umask_002() -> Iterator[None]:
    old = os.umask(0o002)
    try:
        yield
    finally:
        os.umask(old)


def test_written_files_and_directories_honour_the_umask(tmp_path: Path, umask_002: None) -> None:
    """A team sharing a results directory can read each other's runs (umask 002: 664 / 775)."""
    import torch
    from safetensors.torch import save_file

    from saeguard.fileio import atomic_path

    atomic_write_text(tmp_path / "a.json", "{}")
    _write_output(tmp_path / "m", "v1")
    with atomic_path(tmp_path / "w.safetensors") as tmp:  # safetensors re-creates the file
        save_file({"w": torch.zeros(2)}, str(tmp))
    for path in (tmp_path / "a.json", tmp_path / "m" / "index.json", tmp_path / "w.safetensors"):
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
    half = tmp_path / "half"  # a claim killed (or out of space) before its marker was in place
    half.mkdir()
    (half / LOCK_FILE).touch()
    (half / f"{OUTPUT_MARKER}.ab12cd34.tmp").write_text('{"format"')
    claim_output_directory(half, "train")
    assert sorted(p.name for p in half.iterdir()) == sorted([LOCK_FILE, OUTPUT_MARKER])


def test_train_refuses_a_folder_holding_someone_elses_files(tmp_path: Path) -> None:
    """The rule at a command's entry: `saeguard train --out` into a non-empty foreign folder."""
    from saeguard.jobs.train import TrainJobConfig, run_training

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


def test_a_folder_another_process_is_writing_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Concurrent runs: while one process holds an output folder, a second command on it is
    refused before it deletes or writes anything (not even a killed run's temporaries, which may
    be the live process's); the lock goes away with its process, even a killed one."""
    import fcntl
    import signal
    import subprocess
    import sys

    from saeguard.cli import main
    from saeguard.fileio import claim_output_directory, release_output_lock

    out = tmp_path / "out"
    claim_output_directory(out, "train")
    release_output_lock(out)  # as if that command had finished
    live_temporary = out / ".state.json.ab12cd34.tmp"
    live_temporary.write_text("being written")
    with open(out / LOCK_FILE, "a+b") as other:  # another process's hold, as flock sees it
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SaeguardError, match=r"another saeguard process is writing to .*out"):
            claim_output_directory(out, "train")
        assert live_temporary.exists()
        code = main(["train", "--acts", str(tmp_path / "none"), "--out", str(out)])
        assert code == 2 and live_temporary.exists()
        assert "another saeguard process is writing" in capsys.readouterr().err
    script = (
        "import os, signal, sys; from saeguard.fileio import claim_output_directory; "
        "claim_output_directory(sys.argv[1], 'train'); os.kill(os.getpid(), signal.SIGKILL)"
    )
    killed = subprocess.run([sys.executable, "-c", script, str(out)], check=False)
    assert killed.returncode == -signal.SIGKILL
    claim_output_directory(out, "train")  # the killed holder's lock went with it
    assert not live_temporary.exists()  # now a leftover of a dead run: cleared
    release_output_lock(out)
