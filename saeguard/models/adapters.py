"""LoRA adapters on disk: save what `saeguard robustify` trained, merge it back into a model.

An adapter directory is peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``,
never a pickle) plus ``saeguard_adapter.json``, which records the base model's fingerprint so an
adapter is never merged into weights it was not trained on. Loading merges the adapter into a
fresh copy of the base weights: the result is a plain model, so hooks, SAEs and monitors work on
it unchanged, and it keeps the base model's identity for the monitor's model check.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from saeguard.errors import CorruptFileError, MissingPackageError, SaeguardError
from saeguard.fileio import atomic_directory, atomic_write_json, read_json
from saeguard.models.loaded import LoadedModel

log = logging.getLogger(__name__)

ADAPTER_INFO = "saeguard_adapter.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (PEFT_CONFIG, PEFT_WEIGHTS, "README.md", ADAPTER_INFO)
"""What an adapter directory holds (peft writes a model card, README.md, beside its weights)."""


def _peft() -> Any:
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - peft is a declared dependency
        raise MissingPackageError("peft (LoRA adapters)", "peft==0.21.2") from exc
    return peft


def save_adapter(peft_model: Any, directory: str | Path, info: dict[str, Any]) -> Path:
    """Write the adapter weights and ``info`` (base fingerprint, hook, shift...): built in a
    staging folder inside ``directory``, moved into place with the info file last; a directory
    holding files of anything else is refused."""
    directory = Path(directory)
    with atomic_directory(directory, ADAPTER_FILES, index=ADAPTER_INFO) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        _sort_peft_config(tmp / PEFT_CONFIG)
        atomic_write_json(tmp / ADAPTER_INFO, info)
    return directory


def _sort_peft_config(path: Path) -> None:
    """peft writes ``target_modules`` from a set, in an order that changes with each process's
    string hashing: sort it, so one adapter is one file, byte for byte."""
    config = read_json(path, PEFT_CONFIG, "", kind=dict)
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    atomic_write_json(path, config)


def read_adapter_info(directory: str | Path) -> dict[str, Any]:
    """The ``saeguard_adapter.json`` of an adapter directory (clear errors when it is not one)."""
    directory = Path(directory)
    if not (directory / PEFT_CONFIG).is_file() or not (directory / PEFT_WEIGHTS).is_file():
        raise SaeguardError(
            f"{directory} is not a LoRA adapter directory (it needs {PEFT_CONFIG} and "
            f"{PEFT_WEIGHTS}); pass the adapter/ folder written by `saeguard robustify`"
        )
    path = directory / ADAPTER_INFO
    if not path.is_file():
        return {}  # an adapter from another tool: no base fingerprint to check
    info: dict[str, Any] = read_json(path, ADAPTER_INFO, "Re-run `saeguard robustify`.", kind=dict)
    return info


def merge_adapter(loaded: LoadedModel, directory: str | Path) -> LoadedModel:
    """Merge the adapter in ``directory`` into ``loaded``'s weights (in place) and return the
    model with its adapter and base fingerprint recorded. Refuses another base model."""
    if loaded.adapter:
        raise SaeguardError(f"{loaded.name} already has the adapter {loaded.adapter} merged in")
    directory = Path(directory)
    info = read_adapter_info(directory)
    base = loaded.fingerprint()
    expected = info.get("base_fingerprint")
    if expected and expected != base:
        raise SaeguardError(
            f"the adapter in {directory} was trained on {info.get('base_model')} (weights "
            f"fingerprint {str(expected)[:12]}), not on {loaded.name} (fingerprint {base[:12]}); "
            "pass the model it was trained on with --model"
        )
    peft = _peft()
    try:
        wrapped = peft.PeftModel.from_pretrained(loaded.model, str(directory))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CorruptFileError(
            f"the adapter in {directory} cannot be loaded onto {loaded.name}: {exc}"
        ) from exc
    merged = wrapped.merge_and_unload()
    merged.eval()
    merged.requires_grad_(False)
    log.info("merged the LoRA adapter %s into %s", directory, loaded.name)
    return LoadedModel(
        name=loaded.name,
        model=merged,
        tokenizer=loaded.tokenizer,
        dtype=loaded.dtype,
        hooks=list(loaded.hooks),
        adapter=str(directory),
        base_fingerprint=base,
    )
