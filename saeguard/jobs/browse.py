"""`saeguard browse`: a static feature browser for an SAE (docs/browse.md).

One pass over held-out text (the test split of the SAE's corpus, or ``--corpus``) through the
SAE's own reader collects every latent's rate, histogram, top contexts and quantile samples
(:mod:`saeguard.browse`); the logit effects and decoder neighbours come from the weights; the
site (:mod:`saeguard.report.browser_site`) is written into ``--out`` in one atomic swap, with
``browse.json`` (the summary) moved in last. A folder that is not an earlier `saeguard browse`
output is refused before any work; files saeguard did not write there are never deleted.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from saeguard.activations.source import DType
from saeguard.browse.collect import CollectConfig
from saeguard.configs import validate_literals
from saeguard.devices import check_device_name, describe_device, resolve_device
from saeguard.errors import ConfigError
from saeguard.fileio import (
    OUTPUT_MARKER,
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    check_output_directory,
    claim_output_directory,
)

log = logging.getLogger(__name__)

COMMAND = "browse"
SUMMARY_FILE = "browse.json"


@dataclass(kw_only=True)
class BrowseConfig:
    """`saeguard browse`: which SAE, on which held-out text, and where the site goes."""

    sae_dir: str
    """SAE directory (cfg.json + sae_weights.safetensors)."""
    out: str
    """Folder the site is written to (open OUT/index.html in a browser)."""
    corpus: str = ""
    """Held-out text: the test split of this corpus (empty: the SAE's training corpus, else
    wiki-en); a registered name, a .txt/.jsonl/.csv file or hf:DATASET."""
    model: str = ""
    """Model (empty: the one in the SAE's cfg.json)."""
    monitor: str = ""
    """OOD monitor directory (`saeguard ood fit`) of this SAE: adds each latent's ID firing
    rate, ID p99.9 and whether it is rare on ID text."""
    dtype: DType = "float32"
    """Dtype of the model forward pass (bfloat16 is faster on recent CPUs)."""
    neuronpedia: bool = False
    """Also write OUT/neuronpedia/batch-N.json, the latents in the batch layout SAEDashboard
    writes for Neuronpedia."""
    device: str = "auto"
    """Torch device: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps; under
    torchrun each process takes the GPU of its local rank."""
    collect: CollectConfig = field(default_factory=CollectConfig)
    """What is read and kept of every latent."""

    def __post_init__(self) -> None:
        validate_literals(self)
        check_device_name(self.device)
        if not self.out.strip():
            raise ConfigError("--out is empty; name the folder the site goes to")
        if not self.sae_dir.strip():
            raise ConfigError("give the SAE directory to browse (saeguard browse SAE_DIR --out D)")


def site_entries() -> tuple[str, ...]:
    """Everything a browse output folder may hold (an earlier run's ``neuronpedia/`` included:
    it is this command's to replace)."""
    from saeguard.report.browser_site import NEURONPEDIA_DIR, SITE_ENTRIES

    return (*SITE_ENTRIES, SUMMARY_FILE, OUTPUT_MARKER, NEURONPEDIA_DIR)


def run_browse(cfg: BrowseConfig) -> dict[str, Any]:
    """Build the site for ``cfg.sae_dir`` into ``cfg.out``; returns the summary (browse.json)."""
    import torch

    from saeguard.activations.reader import ActivationReader
    from saeguard.activations.subject import load_subject
    from saeguard.browse import build_document
    from saeguard.models.loading import load_model
    from saeguard.report.browser_site import neuronpedia_batches, render_site
    from saeguard.sae.io import load_sae

    started = time.perf_counter()
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    own = site_entries()
    check_output_directory(out, own)  # a foreign --out is refused before any work
    sae, meta = load_sae(cfg.sae_dir)  # a bad SAE directory fails in one line, nothing written
    hook = str(meta.get("hook") or "")
    monitor = _monitor_columns(Path(cfg.monitor), sae, hook) if cfg.monitor else None
    loaded = None
    if cfg.dtype != "float32":
        loaded = load_model(cfg.model or str(meta.get("model") or ""), dtype=cfg.dtype,
                            device=device)  # fmt: skip
    subject = load_subject(cfg.sae_dir, cfg.model, cfg.corpus, "test", loaded=loaded,
                           device=device)  # fmt: skip
    claim_output_directory(out, COMMAND, index=(SUMMARY_FILE, "latent.html"))
    texts = [d.text for d in subject.source.documents]
    random.Random(f"{cfg.collect.seed}:browse").shuffle(texts)
    reader = ActivationReader(
        subject.loaded, subject.hook, subject.source.rules, subject.ctx_len,
        bool(subject.metadata.get("prepend_bos", True)), cfg.collect.batch_size,
    )  # fmt: skip
    sae_cfg = subject.sae.cfg
    about = {
        "sae": {
            "path": str(cfg.sae_dir),
            "name": str(subject.metadata.get("name") or Path(cfg.sae_dir).name),
            "architecture": sae_cfg.architecture,
            "d_in": sae_cfg.d_in,
            "d_sae": sae_cfg.d_sae,
            "k": sae_cfg.k,
            "model": subject.loaded.name,
            "hook": subject.hook,
        },
        "corpus": subject.source.cfg.corpus,
        "split": "test",
        "ctx_len": subject.ctx_len,
        "dtype": cfg.dtype,
        "device": describe_device(device),
    }
    with torch.inference_mode():
        document = build_document(reader, subject.sae, subject.loaded, texts, cfg.collect,
                                  monitor, progress=True, about=about)  # fmt: skip
    clock = time.perf_counter()
    files = render_site(document)
    if cfg.neuronpedia:
        files.update(neuronpedia_batches(document))
    summary = document["summary"]
    summary["files"] = len(files)
    summary["site_bytes"] = sum(len(t.encode("utf-8")) for t in files.values())
    summary["index_bytes"] = len(files["index.html"].encode()) + len(
        files["data/index.js"].encode()
    )
    summary["neuronpedia"] = cfg.neuronpedia
    with atomic_directory(out, own, index=SUMMARY_FILE) as staging:
        for relative, text in files.items():
            atomic_write_text(staging / relative, text)
        atomic_write_json(staging / OUTPUT_MARKER, {"format": "saeguard-output",
                                                    "command": COMMAND})  # fmt: skip
        summary["timings_s"]["write"] = round(time.perf_counter() - clock, 2)
        summary["timings_s"]["wall"] = round(time.perf_counter() - started, 2)
        summary["created"] = datetime.now(UTC).isoformat(timespec="seconds")
        summary["settings"] = {**summary["settings"], "monitor": cfg.monitor,
                               "neuronpedia": cfg.neuronpedia}  # fmt: skip
        atomic_write_json(staging / SUMMARY_FILE, summary)
    return dict(summary)


def _monitor_columns(directory: Path, sae: Any, hook: str) -> Any:
    """The ID statistics of a monitor fitted on this very SAE (refused in one line otherwise)."""
    import torch

    from saeguard.browse import MonitorColumns
    from saeguard.ood.storage import SAE_SUBDIR, read_id_stats, read_monitor_document
    from saeguard.sae.io import load_sae

    doc = read_monitor_document(directory)
    stats = read_id_stats(directory, doc)
    monitor_sae, _ = load_sae(directory / SAE_SUBDIR)
    ours = sae.W_dec.detach().float().cpu()
    same = (
        doc.get("hook") == hook
        and monitor_sae.W_dec.shape == ours.shape
        and torch.allclose(monitor_sae.W_dec.detach().float(), ours, atol=1e-6)
        and stats.firing_count.shape[0] == ours.shape[0]
    )
    if not same:
        raise ConfigError(
            f"the monitor in {directory} was fitted on another SAE or hook than "
            f"{hook} of this SAE; pass a monitor of this SAE (`saeguard ood fit "
            "SAE_DIR`) or drop --monitor"
        )
    tau = float((doc.get("config") or {}).get("tau_rate", 1e-4))
    return MonitorColumns(
        rate=stats.rate.float(), p999=stats.p999.float().cpu(), tau_rate=tau,
        n_tokens=stats.n_tokens, source=str(directory),
    )  # fmt: skip


__all__ = ["BrowseConfig", "run_browse", "site_entries"]
