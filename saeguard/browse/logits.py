"""What each latent's decoder direction does to the next-token logits, and its nearest latents.

**Logit effect.** Latent ``i`` adds ``f_i * W_dec[i]`` to the residual stream. Its direct effect
on the logits (ignoring every layer between the SAE's hook and the output) is that direction
read through the final norm and the unembedding: ``effect_i = N(W_dec[i]) @ W_U^T``, where ``N``
is the linear part of the final norm, taken at unit scale:

- RMSNorm (Llama, Qwen, Gemma, ...): ``N(v) = g * v``, the norm's per-dimension gain ``g``.
  Normalising divides by the RMS of the *whole* residual stream, a positive factor shared by
  every token's logit at that position, so it scales a direction's effect but never reorders
  the tokens it promotes; it is left out. ``g`` is read as the norm's output on the all-ones
  vector (RMS 1) times ``sqrt(1 + eps)``, so Gemma's ``(1 + weight)`` gain is covered as well.
- LayerNorm (GPT-2, GPT-NeoX): ``N(v) = weight * (v - mean(v))``: the centring is linear and
  kept; the 1/std factor is left out as above, and the bias is a constant of every position,
  not of the direction.

No norm found: ``N(v) = v``. The unembedding's bias (if any) and Gemma's final logit soft-cap (a
monotone squashing) are left out too. Values are in logit units per unit of activation.

**Nearest latents**: cosine similarity of decoder rows, computed block by block (a 9,216-latent
SAE never holds the full 9,216 x 9,216 matrix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from saeguard.errors import SaeguardError
from saeguard.models.hooks import unwrap_adapters

_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")


@dataclass
class LogitEffects:
    """Top promoted and suppressed tokens of every latent's decoder direction."""

    pos_ids: torch.Tensor
    """[d_sae, top] token ids with the largest effects, largest first."""
    pos_values: torch.Tensor
    """[d_sae, top] their effects."""
    neg_ids: torch.Tensor
    """[d_sae, top] token ids with the most negative effects, most negative first."""
    neg_values: torch.Tensor
    """[d_sae, top] their effects."""
    how: str
    """How the final norm was applied (for the pages and browse.json)."""


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied to the residual stream before the unembedding (None when not found)."""
    base = getattr(unwrap_adapters(model), "base_model", None)
    for name in _NORM_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


@torch.no_grad()
def norm_map(model: nn.Module, d_model: int) -> tuple[torch.Tensor | None, bool, str]:
    """(gain [d_model] or None, centre?, description) of the final norm's linear part."""
    norm = final_norm(model)
    if norm is None:
        return None, False, "no final norm found: decoder rows projected on W_U as they are"
    kind = type(norm).__name__
    if isinstance(norm, nn.LayerNorm):
        weight = norm.weight
        gain = weight.detach().float().cpu() if weight is not None else torch.ones(d_model)
        return (
            gain,
            True,
            (
                f"{kind}: decoder row centred, times the norm's weight, projected on W_U "
                "(1/std and bias left out)"
            ),
        )
    param = next(norm.parameters(), None)
    ones = torch.ones(1, d_model, dtype=param.dtype if param is not None else torch.float32,
                      device=param.device if param is not None else "cpu")  # fmt: skip
    gain = norm(ones).float().cpu().reshape(-1)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0))
    eps = float(eps) if isinstance(eps, int | float) else 0.0
    gain = gain * math.sqrt(1.0 + eps)
    return (
        gain,
        False,
        (
            f"{kind}: decoder row times the norm's gain (its output on the all-ones vector), "
            "projected on W_U (the 1/RMS factor left out)"
        ),
    )


@torch.no_grad()
def logit_effects(
    W_dec: torch.Tensor, model: nn.Module, vocab_size: int, top: int = 10, block: int = 256
) -> LogitEffects:
    """The ``top`` promoted and suppressed tokens of each decoder row (see the module's text),
    over the first ``vocab_size`` rows of the unembedding (the tokenizer's tokens)."""
    getter = getattr(model, "get_output_embeddings", None)
    weight = getattr(getter() if callable(getter) else None, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise SaeguardError("the model has no output embedding to read logit effects from")
    W_U = weight.detach()
    device = W_U.device
    vocab = min(vocab_size, W_U.shape[0])
    W_U = W_U[:vocab].float()
    d_sae, d_model = W_dec.shape
    gain, centre, how = norm_map(model, d_model)
    top = min(top, vocab)
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, d_sae, block):
        rows = W_dec[start : start + block].detach().float().to(device)
        if centre:
            rows = rows - rows.mean(-1, keepdim=True)
        if gain is not None:
            rows = rows * gain.to(device)
        effect = rows @ W_U.T
        pos = effect.topk(top, dim=-1)
        neg = (-effect).topk(top, dim=-1)
        parts.append((pos.indices.cpu(), pos.values.cpu(), neg.indices.cpu(), -neg.values.cpu()))
    pos_ids, pos_values, neg_ids, neg_values = (torch.cat([p[k] for p in parts]) for k in range(4))
    return LogitEffects(pos_ids, pos_values, neg_ids, neg_values, how)


@torch.no_grad()
def decoder_neighbours(
    W_dec: torch.Tensor, top: int = 5, block: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [d_sae, top], cosines [d_sae, top]) of each latent's nearest other latents by the
    cosine of their decoder rows, nearest first."""
    unit = W_dec.detach().float()
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    d_sae = len(unit)
    top = min(top, d_sae - 1)
    ids, cosines = [], []
    for start in range(0, d_sae, block):
        sim = unit[start : start + block] @ unit.T
        own = torch.arange(start, min(start + block, d_sae), device=sim.device)
        sim[torch.arange(len(own), device=sim.device), own] = -math.inf
        best = sim.topk(top, dim=-1)
        ids.append(best.indices.cpu())
        cosines.append(best.values.cpu())
    return torch.cat(ids), torch.cat(cosines)
