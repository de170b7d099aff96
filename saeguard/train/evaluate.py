"""Held-out reconstruction quality of a trained SAE (the numbers `saeguard train` reports)."""

from __future__ import annotations

import dataclasses

import torch

from saeguard.activations import ActivationSourceConfig, ModelActivationSource
from saeguard.sae import SparseAutoencoder
from saeguard.sae.base import normalized_mse


def held_out_activations(
    job: ActivationSourceConfig,
    hook: str,
    tokens: int,
    median_norms: dict[str, float] | None = None,
) -> torch.Tensor | None:
    """``tokens`` activations of the validation split, unmasked, with the job's source rules
    (and, when given, the outlier thresholds recorded at training time)."""
    if tokens <= 0:
        return None
    cfg = ActivationSourceConfig(
        **{
            **{f.name: getattr(job, f.name) for f in dataclasses.fields(ActivationSourceConfig)},
            "split": "validation",
            "mask_prob": 0.0,
            "hooks": [hook],
        }
    )
    chunks, total = [], 0
    for chunk in ModelActivationSource(cfg, hook=hook, median_norms=median_norms):
        chunks.append(chunk)
        total += len(chunk)
        if total >= tokens:
            break
    return torch.cat(chunks)[:tokens]


@torch.no_grad()
def evaluate_reconstruction(sae: SparseAutoencoder, x: torch.Tensor) -> dict[str, float]:
    """FVU over the whole set, mean L0 and the fraction of latents never active on it."""
    f = torch.cat([sae.encode(chunk) for chunk in x.split(4096)])
    x_hat = torch.cat([sae.decode(chunk) for chunk in f.split(4096)])
    fvu = float(normalized_mse(x, x_hat))
    active = f != 0
    return {
        "fvu": fvu,
        "explained_variance": 1 - fvu,
        "l0": float(active.sum(-1).float().mean()),
        "dead_frac": float((~active.any(0)).float().mean()),
        "tokens": len(x),
    }
