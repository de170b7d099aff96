"""Published SAEs from the Hugging Face Hub: ``hf:ORG/REPO[:PATH]`` wherever an SAE directory is
accepted.

The repo is resolved through ``huggingface_hub`` into its local cache: downloaded when online
(only ``PATH``'s files when a path is given, e.g. one hook of a repo holding one SAE per hook),
read from that cache alone when offline (``HF_HUB_OFFLINE=1``). The folder it names is then read
like any local SAE directory (saeguard, SAELens or sparsify layout, see :mod:`saeguard.sae.io`).
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from saeguard.errors import SaeguardError

HUB_PREFIX = "hf:"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_hub_sae(spec: str | Path) -> bool:
    """Whether ``spec`` names an SAE on the Hub rather than a local directory."""
    return str(spec).startswith(HUB_PREFIX)


def parse_hub_sae(spec: str) -> tuple[str, str]:
    """(repo id, path inside the repo) of ``hf:ORG/REPO[:PATH]``; a malformed one is one line."""
    repo, _, path = spec[len(HUB_PREFIX) :].partition(":")
    if not _REPO_ID.match(repo):
        raise SaeguardError(
            f"{spec!r} is not a Hub SAE name; write hf:ORG/REPO or hf:ORG/REPO:PATH/TO/SAE"
        )
    parts = PurePosixPath(path).parts if path else ()
    if path.startswith("/") or any(part in ("..", ".") for part in parts):
        raise SaeguardError(f"{spec!r}: the path inside the repo must be relative, without '..'")
    return repo, "/".join(parts)


def resolve_sae_dir(spec: str | Path) -> Path:
    """The local directory of an SAE: ``spec`` itself, or the cached folder of a Hub SAE."""
    if not is_hub_sae(spec):
        return Path(spec)
    repo, path = parse_hub_sae(str(spec))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        root = Path(snapshot_download(repo, allow_patterns=[f"{path}/*"] if path else None))
    except LocalEntryNotFoundError as exc:
        raise SaeguardError(
            f"{spec}: not in the local Hugging Face cache and the Hub cannot be reached (offline "
            f"or HF_HUB_OFFLINE=1); download it once online (`hf download {repo}`) or pass a "
            "local SAE directory"
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise SaeguardError(f"{spec}: the Hub could not provide it ({exc})") from exc
    directory = root / path if path else root
    if not directory.is_dir():
        found = sorted(str(p.parent.relative_to(root)) for p in root.rglob("cfg.json"))
        hint = f"; SAEs in this repo: {', '.join(found[:10])}" if found else ""
        raise SaeguardError(f"{spec}: the repo has no folder {path!r}{hint}")
    return directory
