"""Robustify core: only the adapters train, and the loss falls on a fixed batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from saeguard.activations.exclusion import ExclusionRules
from saeguard.data.perturb import add_typos
from saeguard.data.tokenize import packing_spec, tokenize_documents
from saeguard.errors import ConfigError
from saeguard.models import load_model
from saeguard.robustify import LoraRobustifier, LoraSettings, add_adapters
from saeguard.sae import SAEConfig, create_sae

TEXTS = [
    "the river city and the mountain people",
    "history of music and art in the north",
    "the king and queen made peace after the war",
    "science and theory of light and dark water",
]


def _setup(tiny_llama_dir: Path, settings: LoraSettings):
    torch.manual_seed(0)
    loaded = load_model(str(tiny_llama_dir))
    spec = packing_spec(loaded.tokenizer, 32)
    start = [spec.start_id] if spec.start_id is not None else []
    clean = [start + ids for ids in tokenize_documents(loaded.tokenizer, TEXTS)]
    shifted_texts = [add_typos(t, 0.5, seed=1) for t in TEXTS]
    shifted = [start + ids for ids in tokenize_documents(loaded.tokenizer, shifted_texts)]
    sae = create_sae(SAEConfig(architecture="topk", d_in=32, d_sae=64, k=8))
    model = add_adapters(loaded.model, settings)
    rules = ExclusionRules(special_ids=loaded.special_token_ids())
    pad = loaded.tokenizer.pad_token_id
    robustifier = LoraRobustifier(
        model, sae, loaded.hook_point("resid_post.2"), rules, settings, pad
    )
    return robustifier, model, sae, clean, shifted


def test_only_adapters_change_and_the_loss_falls_on_a_fixed_batch(tiny_llama_dir: Path) -> None:
    settings = LoraSettings(rank=4, alpha=8, lr=1e-2, target_modules=["q_proj", "v_proj", "o_proj"])
    robustifier, model, sae, clean, shifted = _setup(tiny_llama_dir, settings)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    sae_before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    assert adapters and all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad():
        before, consistency_before, _ = robustifier.losses(clean, shifted)
    for _ in range(40):
        robustifier.step(clean, shifted)
    with torch.no_grad():
        after, consistency_after, _ = robustifier.losses(clean, shifted)
    assert float(after) < 0.95 * float(before)
    assert float(consistency_after) < float(consistency_before)
    for name, value in model.named_parameters():
        if "lora_" in name:
            continue
        assert torch.equal(value, frozen[name]), f"base weight {name} changed"
    assert any(
        not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if n in adapters
    )
    for name, value in sae.named_parameters():
        assert torch.equal(value, sae_before[name]) and not value.requires_grad


def test_energy_weighting_and_bad_settings(tiny_llama_dir: Path) -> None:
    settings = LoraSettings(rank=2, alpha=4, lr=1e-2, energy_weighting=True, lm_weight=0.0)
    robustifier, _, _, clean, shifted = _setup(tiny_llama_dir, settings)
    first = robustifier.step(clean, shifted)
    assert first.lm == 0.0 and first.consistency > 0
    with pytest.raises(ConfigError, match="nothing would be trained"):
        LoraSettings(consistency_weight=0, lm_weight=0)
    with pytest.raises(ConfigError, match="no linear layers named"):
        add_adapters(load_model(str(tiny_llama_dir)).model, LoraSettings(target_modules=["c_attn"]))
