"""What an evaluation (or an OOD monitor's fit) is run on: an SAE, its model, its hook and the
rules it was trained with.

The SAE's ``cfg.json`` names the model, hook, corpus and exclusion rules; evaluation reuses them
(and the training-time outlier thresholds) so that an SAE is scored on the kind of activations it
was trained on, drawn from the corpus's ``test`` split, which training never reads. It lives below
both ``saeguard.evals`` and ``saeguard.ood``, which never import each other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from saeguard.activations.source import ActivationSourceConfig, PreparedSource, prepare
from saeguard.defaults import DEFAULT_CORPUS
from saeguard.errors import ConfigError
from saeguard.models.loading import LoadedModel
from saeguard.sae.base import SparseAutoencoder
from saeguard.sae.io import load_sae

log = logging.getLogger(__name__)


@dataclass
class EvalSubject:
    """A loaded SAE with the model, hook and prepared evaluation text it is measured on."""

    sae: SparseAutoencoder
    metadata: dict[str, Any]
    hook: str
    source: PreparedSource
    memo: dict[Any, Any] = field(default_factory=dict)
    """Model activations already computed (SAE-independent), shared by subjects of one study."""

    def with_sae(self, sae: SparseAutoencoder, metadata: dict[str, Any]) -> EvalSubject:
        """Another SAE on the same model, hook, text and memo (the model runs once for all); it
        moves to the model's device."""
        if sae.cfg.d_in != self.sae.cfg.d_in or metadata.get("hook") != self.hook:
            raise ConfigError("SAEs evaluated together must read the same hook and width")
        return replace(self, sae=sae.to(self.device), metadata=metadata)

    @property
    def loaded(self) -> LoadedModel:
        return self.source.loaded

    @property
    def ctx_len(self) -> int:
        return self.source.spec.ctx_len

    @property
    def device(self) -> torch.device:
        """Where the SAE (and its model) compute."""
        return self.sae.W_dec.device

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The SAE's latents of ``x``, computed (and returned) on the SAE's device."""
        with torch.no_grad():
            return self.sae.encode(x.to(self.device))


def load_subject(
    sae_dir: str | Path,
    model: str = "",
    corpus: str = "",
    split: str = "test",
    loaded: LoadedModel | None = None,
    adapter: str = "",
    device: str | torch.device = "cpu",
) -> EvalSubject:
    """Load an SAE and prepare its model and evaluation corpus (empty arguments: from cfg.json).
    With ``adapter`` the model is the base model with that LoRA adapter merged in. The model is
    loaded on ``device`` (a given ``loaded`` keeps its own) and the SAE moves to the model's."""
    sae, meta = load_sae(sae_dir)
    sae.eval()
    if loaded is not None:
        device = loaded.device
    hook = str(meta.get("hook") or "")
    if not hook:
        raise ConfigError(
            f"{sae_dir}/cfg.json does not name its hook point; it cannot be evaluated"
        )
    model_name = model or str(meta.get("model") or "")
    if not model_name:
        raise ConfigError(f"{sae_dir}/cfg.json does not name its model; pass --model")
    exclusions = meta.get("exclusions") or {}
    cfg = ActivationSourceConfig(
        model=model_name,
        hooks=[hook],
        corpus=corpus or str(meta.get("corpus") or DEFAULT_CORPUS),
        split=split,  # type: ignore[arg-type]
        ctx_len=int(meta.get("ctx_len") or 128),
        prepend_bos=bool(meta.get("prepend_bos", True)),
        exclude_special=bool(exclusions.get("exclude_special", True)),
        outlier_multiple=float(exclusions.get("outlier_multiple", 10.0)),
        repeat=False,
        device=str(device),
    )
    if adapter:
        from saeguard.models.adapters import merge_adapter
        from saeguard.models.loading import load_model

        loaded = merge_adapter(loaded or load_model(model_name, device=device), adapter)
    source = prepare(cfg, loaded)
    sae.to(source.loaded.device)
    if source.loaded.d_model != sae.cfg.d_in and hook.startswith(("resid", "attn", "mlp")):
        raise ConfigError(
            f"the SAE reads {sae.cfg.d_in}-d activations but {model_name} has d_model "
            f"{source.loaded.d_model}: pass the model it was trained on (--model)"
        )
    medians = exclusions.get("median_norms") or {}
    if hook in medians:
        source.rules.median_norms = {hook: float(medians[hook])}
    else:  # an SAE from another tool: measure the median on the evaluation text itself
        contexts = [c for _, c in zip(range(64), source.contexts(), strict=False)]
        from saeguard.activations.source import ActivationHarvester

        harvester = ActivationHarvester(source.loaded, [hook], source.rules)
        harvester.calibrate(contexts, batch_size=16)
        log.info("no training-time median norm in cfg.json: measured %s", source.rules.median_norms)
    return EvalSubject(sae, meta, hook, source)
