"""LoRA fine-tuning that keeps a frozen SAE's latents steady under a shift (SPEC section 6).

For each pair (clean text, the same text perturbed) the loss is

    consistency = || pool(f(perturbed)) - pool(f_base(clean)) ||^2 / || pool(f_base(clean)) ||^2
    total       = consistency_weight * consistency + lm_weight * CE(next token | clean ID text)

where ``f`` are the SAE latents at the hook under the adapted model, ``f_base`` those of the
frozen base model (adapters disabled, no gradient), and ``pool`` the mean over a text's kept
tokens: a typo changes the tokenisation, so positions cannot be matched one to one, but the
text's pooled concept profile can. The LM loss on clean text keeps capability. Only the LoRA
adapters train (``peft``); the base weights and the SAE stay frozen. With ``energy_weighting``
each pair's consistency term is weighted by the softmax, across the batch, of the monitor's
energy score of the perturbed text under the current model (of its consistency loss when no
monitor scorer is given), so the most out-of-distribution texts count most.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from saeguard.activations.exclusion import ExclusionRules
from saeguard.activations.reader import pad_contexts
from saeguard.errors import ConfigError, MissingPackageError
from saeguard.models.hooks import HookPoint, run_to_hooks
from saeguard.sae.base import SparseAutoencoder

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class LoraSettings:
    """The adapter and its optimisation."""

    rank: int = 8
    """LoRA rank r."""
    alpha: int = 16
    """LoRA scaling alpha (the update is scaled by alpha / r)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Names of the linear layers that get adapters (only those below the hook can matter)."""
    lr: float = 1e-3
    """Adam learning rate of the adapters."""
    consistency_weight: float = 1.0
    """Weight of the latent-consistency loss on perturbed text."""
    lm_weight: float = 1.0
    """Weight of the next-token loss on clean ID text (keeps capability)."""
    energy_weighting: bool = False
    """Weight pairs by the softmax of the perturbed text's energy score (most OOD count most)."""
    up_to_hook: bool = True
    """Adapt only the blocks up to the hook's layer: the ones that can move the SAE's latents."""

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha < 1:
            raise ConfigError("--lora-rank and --lora-alpha must be at least 1")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.consistency_weight < 0 or self.lm_weight < 0:
            raise ConfigError("loss weights must be >= 0")
        if self.consistency_weight == 0 and self.lm_weight == 0:
            raise ConfigError("both loss weights are 0: nothing would be trained")


def add_adapters(model: nn.Module, settings: LoraSettings, hook_layer: int | None = None) -> Any:
    """Wrap a causal LM with LoRA adapters; every non-adapter weight is frozen. With
    ``settings.up_to_hook`` and a ``hook_layer``, only blocks 0..hook_layer get adapters."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - peft is a declared dependency
        raise MissingPackageError("peft (LoRA adapters)", "peft==0.21.2") from exc
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in settings.target_modules if t not in names]
    if missing:
        raise ConfigError(
            f"the model has no linear layers named {missing}; choose --target-modules among "
            f"{', '.join(sorted(names))}"
        )
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        target_modules=list(settings.target_modules),
        lora_dropout=0.0,
        bias="none",
        layers_to_transform=(
            list(range(hook_layer + 1)) if settings.up_to_hook and hook_layer is not None else None
        ),
    )
    return get_peft_model(model, config)


def _pooled_latents(
    model: nn.Module,
    sae: SparseAutoencoder,
    point: HookPoint,
    tokens: torch.Tensor,
    keep: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean SAE latents per row [B, d_sae], hook activations [B, T, d]); the model runs only
    up to the hook."""
    acts = run_to_hooks(model, tokens, [point], detach=False)[point.name].float()
    latents = sae.encode(acts)  # [B, T, d_sae], differentiable into the model
    weights = keep.float().unsqueeze(-1)
    return (latents * weights).sum(1) / weights.sum(1).clamp_min(1.0), acts


EnergyScorer = Callable[[list[torch.Tensor]], torch.Tensor]
"""Per-text OOD energy [B] of each text's kept activations ([n_i, d] each)."""


@dataclass
class StepLosses:
    total: float
    consistency: float
    lm: float


class LoraRobustifier:
    """One optimiser over the adapters of ``model``; :meth:`step` takes one batch of pairs."""

    def __init__(
        self,
        model: Any,
        sae: SparseAutoencoder,
        point: HookPoint,
        rules: ExclusionRules,
        settings: LoraSettings,
        pad_id: int,
        energy_of: EnergyScorer | None = None,
    ) -> None:
        self.model = model
        self.sae = sae.eval().requires_grad_(False)
        self.point = point
        self.rules = rules
        self.settings = settings
        self.pad_id = pad_id
        self.energy_of = energy_of
        self.params = [p for n, p in model.named_parameters() if p.requires_grad]
        if not self.params or any(
            "lora_" not in n for n, p in model.named_parameters() if p.requires_grad
        ):
            raise ConfigError(
                "only LoRA adapter weights may train; wrap the model with add_adapters"
            )
        self.optimizer = torch.optim.Adam(self.params, lr=settings.lr)

    @property
    def device(self) -> torch.device:
        """Where the model (and the SAE with it) trains."""
        return next(self.model.parameters()).device

    def _batch(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, real = pad_contexts(rows, self.pad_id)
        keep = real & ~self.rules.special_mask(tokens)
        return tokens.to(self.device), keep.to(self.device)

    def losses(
        self, clean: Sequence[list[int]], perturbed: Sequence[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, consistency, lm) for pairs of token lists (start token included)."""
        clean_tokens, clean_keep = self._batch(clean)
        shifted_tokens, shifted_keep = self._batch(perturbed)
        with torch.no_grad(), self.model.disable_adapter():
            target, _ = _pooled_latents(self.model, self.sae, self.point, clean_tokens, clean_keep)
        zero = torch.zeros((), device=clean_tokens.device)
        consistency, lm = zero, zero
        if self.settings.consistency_weight > 0:
            pooled, acts = _pooled_latents(
                self.model, self.sae, self.point, shifted_tokens, shifted_keep
            )
            per_pair = (pooled - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-8)
            if self.settings.energy_weighting:
                if self.energy_of is not None:
                    rows = [a[k].detach() for a, k in zip(acts, shifted_keep, strict=True)]
                    heat = self.energy_of(rows).float().to(per_pair.device)
                else:
                    heat = per_pair.detach()
                weights = torch.softmax(heat, dim=0) * len(per_pair)
                per_pair = per_pair * weights
            consistency = per_pair.mean()
        if self.settings.lm_weight > 0:
            logits = self.model(input_ids=clean_tokens, use_cache=False).logits
            real = clean_keep | (clean_tokens != self.pad_id)
            labels = clean_tokens[:, 1:].masked_fill(~real[:, 1:], -100)
            lm = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
            )
        total = self.settings.consistency_weight * consistency + self.settings.lm_weight * lm
        return total, consistency, lm

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Adapter weights and Adam moments as named CPU tensors (checkpoints are safetensors,
        read back onto whichever device the resumed run trains on)."""
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        out: dict[str, torch.Tensor] = {}
        for name, param in zip(names, self.params, strict=True):
            out[f"param/{name}"] = param.detach().cpu().clone()
            state = self.optimizer.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in state:
                    value = torch.as_tensor(state[key]).detach()
                    out[f"adam/{key}/{name}"] = value.cpu().clone()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_tensors` (resuming continues exactly where it stopped)."""
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        missing = [n for n in names if f"param/{n}" not in tensors]
        if missing:
            raise ConfigError(
                f"the checkpoint lacks adapter weights {missing[:3]}: it was written with other "
                "LoRA settings; delete the output directory's checkpoint/ to start over"
            )
        with torch.no_grad():
            for name, param in zip(names, self.params, strict=True):
                param.copy_(tensors[f"param/{name}"])
                if f"adam/step/{name}" in tensors:
                    self.optimizer.state[param] = {  # Adam keeps its step count on the CPU
                        "step": tensors[f"adam/step/{name}"].clone(),
                        "exp_avg": tensors[f"adam/exp_avg/{name}"].to(param.device).clone(),
                        "exp_avg_sq": tensors[f"adam/exp_avg_sq/{name}"].to(param.device).clone(),
                    }

    def step(self, clean: Sequence[list[int]], perturbed: Sequence[list[int]]) -> StepLosses:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total, consistency, lm = self.losses(clean, perturbed)
        total.backward()
        self.optimizer.step()
        self.model.eval()
        return StepLosses(float(total.detach()), float(consistency.detach()), float(lm.detach()))
