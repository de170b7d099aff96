"""Resumable work: one helper for "skip this if an earlier run finished it with the same inputs".

Every job records each finished unit of work together with the *signature* of what its result
depends on (settings, input hashes, versions). A re-run reuses a record whose signature equals
the one it would write, and redoes anything else. Records are JSON, written atomically:

- a record of its own: ``{"signature": ..., **payload}`` in one file (a scored text set, a
  measured model, a marker);
- or one of several named records in a shared document: ``document["steps"][name] =
  {"done": true, "signature": ..., **payload}`` (the steps of ``run.json``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from saeguard.errors import CorruptFileError
from saeguard.fileio import atomic_write_json, read_json

log = logging.getLogger(__name__)


def canonical(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, keys strings): signatures are
    compared in that form, so a recorded one equals the one computed now."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def same_signature(recorded: Any, wanted: Any) -> bool:
    """Whether a signature read back from disk equals the one computed now."""
    return recorded is not None and canonical(recorded) == canonical(wanted)


class Step:
    """One resumable unit of work, recorded with the signature of its inputs.

    ``Step(path, signature)`` keeps its record in ``path``; ``Step(path, signature,
    name=..., document=...)`` keeps it as ``document["steps"][name]`` and writes the whole
    ``document`` (which the caller owns and may also change) to ``path``.
    """

    def __init__(
        self,
        path: Path,
        signature: Any,
        *,
        name: str | None = None,
        document: dict[str, Any] | None = None,
    ) -> None:
        if (name is None) != (document is None):
            raise ValueError("a named step needs the document that holds it, and vice versa")
        self.path, self.signature, self.name, self.document = Path(path), signature, name, document

    def saved(self) -> dict[str, Any] | None:
        """The record of an earlier run with this signature, or None (none, another signature,
        or an unreadable file: then the work is done again, with a warning)."""
        if self.document is not None:
            record = self.document.get("steps", {}).get(self.name)
            if not (isinstance(record, dict) and record.get("done")):
                return None
        else:
            record = read_record(self.path)
        if isinstance(record, dict) and same_signature(record.get("signature"), self.signature):
            return record
        return None

    def done(self) -> bool:
        return self.saved() is not None

    def record(self, **payload: Any) -> dict[str, Any]:
        """Write this step's record (atomically) and return it."""
        if self.document is not None:
            entry = {"done": True, "signature": self.signature, **payload}
            self.document.setdefault("steps", {})[self.name] = entry
            atomic_write_json(self.path, self.document)
            return entry
        entry = {"signature": self.signature, **payload}
        atomic_write_json(self.path, entry)
        return entry


def read_record(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path`` for resuming, or None when it is missing or unreadable (a
    torn or edited record is redone, never trusted and never fatal)."""
    if not path.is_file():
        return None
    try:
        value = read_json(path, "step record", "")
    except (CorruptFileError, OSError):
        log.warning("%s is unreadable: doing its work again", path)
        return None
    return value if isinstance(value, dict) else None
