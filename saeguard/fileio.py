"""Atomic file writes, checksums and the saeguard cache directory.

Everything saeguard writes goes through a temporary file in the same directory followed by
``os.replace``, so a crash never leaves a half-written file under its final name.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

FAULT_KILL_ENV = "SAEGUARD_FAULT_KILL_AT"
"""Fault injection (tests/faults): SIGKILL the process at its N-th failpoint."""
FAULT_COUNT_ENV = "SAEGUARD_FAULT_COUNT_FILE"
"""Fault injection: keep the numbers of failpoints passed and of atomic writes begun so far in
this file, as JSON ``{"failpoints": n, "writes": m}``."""
FAULT_DISK_FULL_ENV = "SAEGUARD_FAULT_DISK_FULL_AT"
"""Fault injection: the N-th atomic write fails as on a full disk (``OSError`` ENOSPC)."""
FAULT_RANK_ENV = "SAEGUARD_FAULT_RANK"
"""Fault injection under torchrun: only the process of this rank is killed (e.g. one rank of a
data-parallel job dying)."""
_failpoints_passed = 0
_writes_begun = 0


def _record_fault_counts() -> None:
    count_file = os.environ.get(FAULT_COUNT_ENV)
    if count_file:
        counts = {"failpoints": _failpoints_passed, "writes": _writes_begun}
        Path(count_file).write_text(json.dumps(counts), encoding="utf-8")


def failpoint() -> None:
    """A moment where a crash leaves a distinct state on disk (before and after each atomic
    rename, after each training step). Without the two environment variables above this only
    counts; the fault-injection suite uses them to kill a command at seeded random points, as a
    power cut or an out-of-memory kill would, and checks that re-running it repairs everything."""
    global _failpoints_passed
    _failpoints_passed += 1
    _record_fault_counts()
    if os.environ.get(FAULT_KILL_ENV) == str(_failpoints_passed) and _is_fault_rank():
        os.kill(os.getpid(), signal.SIGKILL)


def _is_fault_rank() -> bool:
    wanted = os.environ.get(FAULT_RANK_ENV)
    return wanted is None or wanted == os.environ.get("RANK", "0")


def _disk_full_point(path: Path) -> None:
    """Where a full disk surfaces: at the end of writing a temporary file, before it is
    renamed over anything (the fault-injection suite raises ENOSPC here on demand)."""
    global _writes_begun
    _writes_begun += 1
    _record_fault_counts()
    if os.environ.get(FAULT_DISK_FULL_ENV) == str(_writes_begun):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def cache_root() -> Path:
    """Root of saeguard's cache: ``$SAEGUARD_CACHE`` or ``~/.cache/saeguard``."""
    env = os.environ.get("SAEGUARD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "saeguard"


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is fsynced and renamed onto it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _disk_full_point(tmp)
        # mkstemp makes 0600 and some writers (safetensors) re-create the file: honour the umask
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        failpoint()
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        failpoint()
    finally:
        if tmp.exists():
            tmp.unlink()


def check_output_directory(target: Path, own: Collection[str]) -> None:
    """Refuse, with one clear line, a ``target`` that is a file or holds entries other than
    ``own`` (and our staging leftovers): commands call this before any work."""
    from saeguard.errors import SaeguardError

    target = Path(target)
    if target.exists() and not target.is_dir():
        raise SaeguardError(f"{target} is an existing file; pass a directory (nothing was written)")
    if not target.exists():
        return
    foreign = sorted(
        p.name
        for p in target.iterdir()
        if p.name not in own and p.name != LOCK_FILE and not p.name.startswith(STAGING_PREFIX)
    )
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise SaeguardError(
            f"{target} is not empty and holds files saeguard did not write there "
            f"({', '.join(foreign[:5])}{more}); choose another --out or an empty directory "
            "(nothing was written or deleted)"
        )


_TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")
"""The name ``atomic_path`` gives its temporary files (``.NAME.XXXXXXXX.tmp``, from mkstemp)."""
OUTPUT_MARKER = ".saeguard-output.json"
"""Written first into every command's --out: the folder is that command's own output."""


def claim_output_directory(out: Path, command: str, index: Collection[str] = ()) -> None:
    """Make ``out`` the output folder of ``command``, or refuse it with one clear line.

    A missing or empty folder is claimed (``OUTPUT_MARKER`` is written before anything else). A
    non-empty folder must be this command's: its marker names ``command``, or (outputs of older
    saeguard versions, written before markers) it holds one of the ``index`` files the command
    writes. Anything else is refused before any work: a command never writes into, or deletes
    from, a folder that is not its own.
    """
    from saeguard.errors import CorruptFileError, SaeguardError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SaeguardError(
            f"--out {out} is an existing file; pass a directory (nothing was written)"
        )
    entries = [p for p in out.iterdir()] if out.exists() else []
    marker = out / OUTPUT_MARKER
    if marker.exists():
        try:
            owner = json.loads(marker.read_text(encoding="utf-8"))["command"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CorruptFileError(
                f"{marker} is corrupt ({exc}); if {out} is a saeguard output, delete that file "
                "and run again, otherwise choose another --out"
            ) from exc
        if owner != command:
            raise SaeguardError(
                f"--out {out} is the output of `saeguard {owner}`, not of `saeguard {command}`; "
                "choose another --out (nothing was written)"
            )
        lock_output_directory(out)  # before deleting temporaries: they may be live
        for stale in out.rglob(".*.tmp"):  # our atomic writes' leftovers from a killed run
            if _TEMPORARY.fullmatch(stale.name) and stale.is_file() and not stale.is_symlink():
                stale.unlink()
        return
    leftovers = [p for p in entries if _is_claim_leftover(p)]  # a claim that died half-way
    names = {p.name for p in entries} - {p.name for p in leftovers}
    if names and not names & set(index):
        shown = ", ".join(sorted(names)[:5]) + (
            f" and {len(names) - 5} more" if len(names) > 5 else ""
        )
        raise SaeguardError(
            f"--out {out} is not empty and is not an output of `saeguard {command}` (it holds "
            f"{shown}); choose another --out or an empty directory (nothing was written)"
        )
    out.mkdir(parents=True, exist_ok=True)
    lock_output_directory(out)
    for leftover in leftovers:
        if leftover.name != LOCK_FILE:
            leftover.unlink()
    atomic_write_json(marker, {"format": "saeguard-output", "command": command})


def _is_claim_leftover(path: Path) -> bool:
    """The lock file, or a temporary of the marker: what a claim killed before its marker was
    in place leaves (the folder still counts as empty)."""
    if path.name == LOCK_FILE:
        return path.is_file()
    return (
        path.name.startswith(OUTPUT_MARKER + ".")
        and _TEMPORARY.fullmatch(path.name) is not None
        and path.is_file()
        and not path.is_symlink()
    )


LOCK_FILE = ".saeguard.lock"
"""Locked (``flock``) by the process writing a folder: two commands never write one --out at
once. The operating system releases it when the process ends, killed or not."""
MAX_HELD_LOCKS = 32
"""A long-lived process (a notebook, the test suite) keeps at most this many folder locks, the
oldest released first; one command nests at most a few (run -> train -> eval)."""
_held_locks: dict[str, int] = {}


def lock_output_directory(out: Path) -> None:
    """Lock ``out`` for this process (re-entrant), or refuse with one line when another process
    holds it. No-op where advisory locks do not exist."""
    key = os.path.realpath(out)
    if key in _held_locks:
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no advisory locks on this platform
        return
    from saeguard.errors import SaeguardError

    fd = os.open(os.path.join(key, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise SaeguardError(
            f"another saeguard process is writing to {out}; wait for it to finish (or stop "
            "it), or choose another --out (nothing was written or deleted)"
        ) from exc
    _held_locks[key] = fd
    while len(_held_locks) > MAX_HELD_LOCKS:
        release_output_lock(next(iter(_held_locks)))


def holds_output_lock(out: Path) -> bool:
    """Whether this process holds the lock on ``out``."""
    return os.path.realpath(out) in _held_locks


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the folder lock on ``out`` for a block; released after it unless held before."""
    held = holds_output_lock(out)
    lock_output_directory(out)
    try:
        yield
    finally:
        if not held:
            release_output_lock(out)


def release_output_lock(out: Path | str) -> None:
    """Release this process's lock on ``out`` (if it holds one)."""
    fd = _held_locks.pop(os.path.realpath(out), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def release_output_locks() -> None:
    """Release every folder lock this process holds (the CLI does so when a command ends)."""
    for key in list(_held_locks):
        release_output_lock(key)


STAGING_PREFIX = ".saeguard-staging-"
"""Name prefix of the folder a directory's new contents are built in, inside that directory."""


@contextmanager
def atomic_directory(target: Path, own: Collection[str], index: str) -> Iterator[Path]:
    """Yield a staging folder inside ``target``; on success its entries replace ``target``'s.

    ``own`` names the entries this writer creates; a ``target`` holding anything else is refused
    before any work, so replacing a previous output never deletes a file saeguard did not write,
    and nothing is written outside ``target``. ``index`` (e.g. ``monitor.json``) is removed first
    and moved in last: a directory without it reads as unfinished, never as a mix of old and new
    files, and running the same command again repairs it. A crash leaves only the staging folder,
    which the next write removes.
    """
    target = Path(target)
    check_output_directory(target, own)
    target.mkdir(parents=True, exist_ok=True)
    with output_lock(target):  # another process's live staging folder is not a leftover
        for stale in target.iterdir():
            if stale.name.startswith(STAGING_PREFIX):  # an interrupted earlier write of ours
                _remove(stale)
        with _staged_swap(target, own, index) as staging:
            yield staging


@contextmanager
def _staged_swap(target: Path, own: Collection[str], index: str) -> Iterator[Path]:
    """The staging folder of :func:`atomic_directory` and the swap that follows its block."""
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target))
    try:
        yield staging
        made = {p.name for p in staging.iterdir()}
        if not made <= set(own) or index not in made:
            raise RuntimeError(f"writer made {sorted(made)}, expected {index} among {sorted(own)}")
        (target / index).unlink(missing_ok=True)
        _fsync_dir(target)
        failpoint()
        for name in sorted(set(own) - {index}):  # older outputs' extra entries go too: ours
            if (target / name).exists() or (target / name).is_symlink():
                _remove(target / name)
                failpoint()
            if name in made:
                (staging / name).rename(target / name)
                failpoint()
        (staging / index).rename(target / index)
        _fsync_dir(target)
    finally:
        _remove(staging)


def _remove(path: Path) -> None:
    """Delete a file, link or folder tree (never following a link out of it)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write(target: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``target`` atomically through a binary file handle passed to ``write``."""
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        write(fh)


def atomic_write_text(target: Path, text: str) -> None:
    """Write a text file atomically (UTF-8)."""
    atomic_write(target, lambda fh: fh.write(text.encode("utf-8")))


def atomic_write_json(target: Path, obj: Any) -> None:
    """Write JSON atomically, pretty-printed with sorted keys so files diff cleanly."""
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path, what: str, fix: str, *, kind: type = object) -> Any:
    """The JSON value in ``path`` (a ``what``, e.g. "eval.json"). Invalid JSON or UTF-8, or a
    value that is not a ``kind`` (e.g. ``dict``), is one ``CorruptFileError`` line naming the
    file and ending with ``fix``. The one reader of every JSON file saeguard reads back."""
    from saeguard.errors import CorruptFileError

    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both derive from it
        raise CorruptFileError(
            f"{path} is not valid JSON ({exc}): not a valid {what}. {fix}".rstrip()
        ) from exc
    if not isinstance(value, kind):
        raise CorruptFileError(
            f"{path} must hold a JSON {'object' if kind is dict else kind.__name__}, not "
            f"{type(value).__name__}: not a valid {what}. {fix}".rstrip()
        )
    return value


def check_schema(document: Any, schema_path: Path, source: Path, fix: str) -> None:
    """Raise one clear ``CorruptFileError`` line if ``document`` (read from ``source``) does not
    follow the JSON schema at ``schema_path``: nothing read back from disk is used unchecked."""
    import jsonschema

    from saeguard.errors import CorruptFileError

    validator = _validator(str(schema_path))
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "top level"
        raise CorruptFileError(
            f"{source} is corrupt or was edited ({where}: {error.message}). {fix}"
        )


def validate_document(document: Any, schema_path: Path) -> None:
    """Check a document saeguard is about to write against its schema (a failure is a bug in
    saeguard, so it raises ``jsonschema.ValidationError`` rather than a user-facing error)."""
    _validator(str(schema_path)).validate(document)


@functools.lru_cache(maxsize=16)
def _validator(schema_path: str) -> Any:
    import jsonschema

    schema = json.loads(Path(schema_path).read_text(encoding="utf-8"))
    return jsonschema.validators.validator_for(schema)(schema)


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_temporaries(directory: Path) -> int:
    """Delete temporaries left by a crashed atomic write; returns how many were removed."""
    removed = 0
    if directory.is_dir():
        for tmp in directory.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
