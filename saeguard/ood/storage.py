"""A monitor on disk.

A monitor is a directory: ``monitor.json`` (settings, model identity, thresholds, reference
score statistics), ``id_stats.safetensors`` (the :class:`~saeguard.ood.stats.IDStats` tensors),
``calibration_scores.json`` and ``sae/`` (a copy of the SAE, so the monitor is self-contained).
It is written to a temporary directory first and moved into place, so an interrupted save never
leaves a half-written monitor and never destroys the previous one.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saeguard import __version__
from saeguard.activations.exclusion import ExclusionRules
from saeguard.devices import describe_device
from saeguard.errors import ConfigError, CorruptFileError, SaeguardError
from saeguard.fileio import atomic_directory, atomic_write_json, check_schema, read_json
from saeguard.models.loading import LoadedModel, load_model
from saeguard.ood.config import MonitorConfig
from saeguard.ood.scores import SCORE_VERSIONS
from saeguard.ood.stats import IDStats
from saeguard.sae.base import SparseAutoencoder
from saeguard.sae.io import load_sae, save_sae

FORMAT = "saeguard-monitor"
FORMAT_VERSION = 1
MONITOR_FILE = "monitor.json"
STATS_FILE = "id_stats.safetensors"
CALIBRATION_FILE = "calibration_scores.json"
REFERENCE_FILE = "reference_scores.json"
SAE_SUBDIR = "sae"
SCHEMA = Path(__file__).with_name("monitor.schema.json")
"""JSON schema of ``monitor.json``, checked on every load."""
MONITOR_ENTRIES = (SAE_SUBDIR, STATS_FILE, CALIBRATION_FILE, REFERENCE_FILE, MONITOR_FILE)
"""Everything a monitor directory holds: ``ood fit`` refuses a directory with anything else."""


class MonitorState(Protocol):
    """What a monitor directory records of a monitor (:class:`~saeguard.ood.monitor.Monitor`)."""

    sae: SparseAutoencoder
    sae_metadata: dict[str, Any]
    device: torch.device
    cfg: MonitorConfig
    model_info: dict[str, Any]
    hook: str
    ctx_len: int
    prepend_bos: bool
    rules: ExclusionRules
    stats: IDStats
    reference: dict[str, tuple[float, float]]
    thresholds: dict[str, float]
    calibration: dict[str, Any]
    calibration_scores: dict[str, list[float]]
    reference_scores: dict[str, list[float]]


def save_monitor(monitor: MonitorState, directory: str | Path) -> Path:
    """Write the monitor directory: built in a staging folder inside it, then moved into place
    with ``monitor.json`` last; a directory holding files of anything else is refused."""
    directory = Path(directory)
    with atomic_directory(directory, MONITOR_ENTRIES, index=MONITOR_FILE) as tmp:
        save_sae(monitor.sae, tmp / SAE_SUBDIR, monitor.sae_metadata)
        save_file(  # tensors() are CPU tensors wherever the monitor computes
            {k: v.contiguous() for k, v in monitor.stats.tensors().items()},
            str(tmp / STATS_FILE),
        )
        atomic_write_json(tmp / CALIBRATION_FILE, monitor.calibration_scores)
        atomic_write_json(tmp / REFERENCE_FILE, monitor.reference_scores)
        atomic_write_json(tmp / MONITOR_FILE, monitor_document(monitor))
    return directory


def monitor_document(monitor: MonitorState) -> dict[str, Any]:
    """The contents of ``monitor.json``. Its config shows the false-positive rate the thresholds
    are calibrated for (the config's own until the monitor is calibrated)."""
    config = asdict(monitor.cfg)
    if "target_fpr" in monitor.calibration:
        config["target_fpr"] = monitor.calibration["target_fpr"]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "saeguard_version": __version__,
        "config": config,
        "model": monitor.model_info,
        "hook": monitor.hook,
        "ctx_len": monitor.ctx_len,
        "prepend_bos": monitor.prepend_bos,
        "exclusions": monitor.rules.to_dict(),
        "stats": monitor.stats.scalars(),
        "reference": {k: list(v) for k, v in monitor.reference.items()},
        "fusion": fusion_document(monitor),
        "score_versions": SCORE_VERSIONS,
        "thresholds": monitor.thresholds,
        "calibration": monitor.calibration,
        "device": describe_device(monitor.device),
    }


def fusion_document(monitor: MonitorState) -> dict[str, Any] | None:
    """The fused score as ``monitor.json`` records it (None without reference scores)."""
    if not monitor.reference_scores:
        return None
    return {
        "components": monitor.cfg.fusion_components,
        "rule": monitor.cfg.fusion_rule,
        "tail": monitor.cfg.fusion_tail,
        "reference_texts": len(next(iter(monitor.reference_scores.values()))),
        "reference_source": "fit texts held back from the ID statistics",
    }


def load_monitor(
    directory: str | Path,
    loaded: LoadedModel | None = None,
    model: str = "",
    adapter: str = "",
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Read a monitor directory and load (or take) its model, loading it onto ``device``; a
    model other than the one it was fitted for is refused. With ``adapter`` the model is the
    base model with it merged in. The tensors are read onto the CPU (the monitor moves what it
    computes with to its model's device).
    Returns the monitor's attributes by name (as :class:`MonitorState` lists them, with
    ``loaded``)."""
    directory = Path(directory)
    path = directory / MONITOR_FILE
    doc = read_monitor_document(directory)
    reference_scores = _read_reference_scores(directory, doc.get("fusion"))
    stats = read_id_stats(directory, doc)
    sae, meta = load_sae(directory / SAE_SUBDIR)
    info = doc["model"]
    if loaded is None:
        loaded = load_model(model or info["name"], device=device, adapter=adapter)
    elif adapter:
        from saeguard.models.adapters import merge_adapter

        loaded = merge_adapter(loaded, adapter)
    check_model(loaded, info, doc["hook"], directory)
    known = {f for f in MonitorConfig.__dataclass_fields__}
    try:
        cfg = MonitorConfig(**{k: v for k, v in doc["config"].items() if k in known})
    except ConfigError as exc:
        raise CorruptFileError(f"{path}: its config cannot work ({exc})") from exc
    if stats.firing_count.shape[0] != sae.cfg.d_sae:
        raise CorruptFileError(
            f"{directory}: the statistics cover {stats.firing_count.shape[0]} latents but the "
            f"SAE has {sae.cfg.d_sae}; the files come from different monitors"
        )
    stored: dict[str, Any] = dict(
        sae=sae,
        sae_metadata=meta,
        loaded=loaded,
        cfg=cfg,
        stats=stats,
        rules=ExclusionRules(**doc["exclusions"]),
        ctx_len=int(doc["ctx_len"]),
        prepend_bos=bool(doc["prepend_bos"]),
        reference={k: (float(v[0]), float(v[1])) for k, v in doc["reference"].items()},
        model_info=info,
        thresholds={k: float(v) for k, v in doc["thresholds"].items()},
        calibration=dict(doc.get("calibration") or {}),
    )
    calib = directory / CALIBRATION_FILE
    stored["calibration_scores"] = _read_score_lists(calib) if calib.is_file() else {}
    stored["reference_scores"] = reference_scores
    return stored


def _read_reference_scores(directory: Path, fusion: Any) -> dict[str, list[float]]:
    """``reference_scores.json``: absent in monitors saved before the fused score; a monitor
    whose ``monitor.json`` records a fused score must have it whole (else its flag would never
    fire)."""
    path = directory / REFERENCE_FILE
    if not isinstance(fusion, dict):
        return _read_score_lists(path) if path.is_file() else {}
    if not path.is_file():
        raise CorruptFileError(
            f"{path} is missing but {directory / MONITOR_FILE} records a fused score fitted on "
            "it; restore the file or re-run `saeguard ood fit`"
        )
    scores = _read_score_lists(path)
    expected = fusion.get("reference_texts")
    missing = [c for c in fusion.get("components") or [] if c not in scores]
    short = [c for c, v in scores.items() if len(v) != expected]
    if missing or short:
        problem = (
            f"lacks {', '.join(missing)}"
            if missing
            else f"holds {len(scores[short[0]])} values of {short[0]}, not {expected}"
        )
        raise CorruptFileError(
            f"{path} {problem} as {MONITOR_FILE} records; restore it or re-run `saeguard ood fit`"
        )
    return scores


def read_id_stats(directory: Path, doc: dict[str, Any]) -> IDStats:
    """The monitor's ID statistics, on the CPU (one clear line for a missing or torn file);
    ``doc`` is its ``monitor.json``."""
    try:
        tensors = load_file(str(directory / STATS_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptFileError(
            f"{directory / STATS_FILE} is missing or corrupt ({exc}); re-run `saeguard ood fit`"
        ) from exc
    return IDStats.from_parts(doc["stats"], tensors)


def read_monitor_document(directory: Path) -> dict[str, Any]:
    """``monitor.json`` of a monitor directory, checked against its schema (one clear line for a
    missing, torn or edited file)."""
    path = directory / MONITOR_FILE
    if not path.is_file():
        raise SaeguardError(
            f"{directory} holds no {MONITOR_FILE}: not a monitor directory (create one with "
            "`saeguard ood fit`)"
        )
    doc = read_json(path, MONITOR_FILE, "Re-run `saeguard ood fit`.")
    if (
        not isinstance(doc, dict)
        or doc.get("format") != FORMAT
        or doc.get("format_version") != FORMAT_VERSION
    ):
        raise CorruptFileError(
            f"{path} is not a saeguard monitor of format version {FORMAT_VERSION}"
        )
    check_schema(doc, SCHEMA, path, "Re-run `saeguard ood fit` to write it again.")
    return dict(doc)


def _read_score_lists(path: Path) -> dict[str, list[float]]:
    """``calibration_scores.json`` or ``reference_scores.json``: each score's values on the
    calibration (or reference) texts."""
    doc = read_json(path, "score file", "Re-run `saeguard ood fit`.")
    ok = isinstance(doc, dict) and all(
        isinstance(v, list) and all(isinstance(x, int | float) for x in v) for v in doc.values()
    )
    if not ok or any(not math.isfinite(float(x)) for v in doc.values() for x in v):
        raise CorruptFileError(
            f"{path} must map each score to a list of finite numbers; re-run `saeguard ood fit`"
        )
    return {str(k): [float(x) for x in v] for k, v in doc.items()}


def model_identity(loaded: LoadedModel) -> dict[str, Any]:
    """The identity of the model a monitor is fitted for, as ``monitor.json`` records it."""
    return {
        "name": loaded.name,
        "fingerprint": loaded.identity(),
        "adapter": loaded.adapter,
        "d_model": loaded.d_model,
        "n_layers": loaded.n_layers,
        "family": loaded.family,
    }


def check_model(loaded: LoadedModel, info: dict[str, Any], hook: str, directory: Path) -> None:
    """Refuse a model (or hook) other than the one the monitor was fitted for."""
    if loaded.d_model != info.get("d_model") or loaded.n_layers != info.get("n_layers"):
        raise ConfigError(
            f"the monitor in {directory} was fitted for {info.get('name')} "
            f"(d_model {info.get('d_model')}, {info.get('n_layers')} layers) at {hook}, but the "
            f"model given is {loaded.name} (d_model {loaded.d_model}, {loaded.n_layers} layers). "
            "Fit a monitor for this model with `saeguard ood fit`."
        )
    loaded.hook_point(hook)
    fingerprint = loaded.identity()  # a merged adapter keeps its base model's identity
    if fingerprint != info.get("fingerprint"):
        raise ConfigError(
            f"the monitor in {directory} was fitted for {info.get('name')} (weights fingerprint "
            f"{str(info.get('fingerprint'))[:12]}) but the model given is {loaded.name} "
            f"(fingerprint {fingerprint[:12]}): its statistics do not describe this model. "
            "Fit a monitor for this model with `saeguard ood fit`."
        )
