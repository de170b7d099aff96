"""The loaded-model record every layer passes around: a causal LM, its tokenizer and its hook
points (kept apart from the loaders so that adapters and loaders need not import each other)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from saeguard.models.hooks import HookPoint, all_hook_names, decoder_blocks, parse_hook


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and uniform hook points."""

    name: str
    """Embedded name, Hugging Face id or directory the model was loaded from."""
    model: nn.Module
    """The transformers causal LM, in eval mode with gradients off."""
    tokenizer: Any
    """Its Hugging Face tokenizer."""
    dtype: str = "float32"
    """Dtype of the weights."""
    hooks: list[str] = field(default_factory=list)
    """Every hook-point name of the model."""
    adapter: str = ""
    """Directory of the LoRA adapter merged into the weights (empty: the base model)."""
    base_fingerprint: str = ""
    """Fingerprint of the base weights before an adapter was merged (empty: no adapter)."""

    @property
    def config(self) -> object:
        return self.model.config  # type: ignore[no-any-return]

    @property
    def n_layers(self) -> int:
        return len(decoder_blocks(self.model))

    @property
    def d_model(self) -> int:
        return int(getattr(self.model.config, "hidden_size"))  # noqa: B009

    @property
    def family(self) -> str:
        return str(getattr(self.model.config, "model_type", "unknown"))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def hook_point(self, name: str) -> HookPoint:
        """Parse a hook name against this model (error lists the valid names)."""
        return parse_hook(name, self.n_layers, self.name)

    def hook_names(self) -> list[str]:
        return all_hook_names(self.n_layers)

    def fingerprint(self) -> str:
        """SHA-256 over the config and a sample of every weight tensor (cheap, content-based)."""
        config: Any = self.model.config
        digest = hashlib.sha256(config.to_json_string(use_diff=False).encode())
        for name, param in self.model.state_dict().items():
            flat = param.detach().reshape(-1)
            sample = torch.cat([flat[:512], flat[-512:]]).float().cpu().contiguous()
            digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
            digest.update(sample.numpy().tobytes())
        return digest.hexdigest()

    def identity(self) -> str:
        """The base model's fingerprint: what monitors and SAEs fitted on the base model match.
        A merged adapter changes the weights but not which model the statistics describe."""
        return self.base_fingerprint or self.fingerprint()

    def special_token_ids(self) -> list[int]:
        """Ids of BOS/EOS/pad and every other special token."""
        ids = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        return sorted(i for i in ids if i is not None)
