"""AbsTopK SAE: keep the k largest |pre-activations| with their signs (no ReLU).

Latents can be negative, so every consumer must treat "active" as ``f != 0``.
"""

from __future__ import annotations

from saeguard.sae.registry import register
from saeguard.sae.topk import TopKSAE


@register("abstopk", k_bounds_l0=True)
class AbsTopKSAE(TopKSAE):
    """``f = sign-preserving TopK_k by magnitude of W_enc (x - b_dec) + b_enc``."""

    signed = True
