"""Which token positions are excluded from SAE training and evaluation (SPEC section 1).

Two rules, both on by default and both recorded with every cache and SAE:

- special tokens (BOS, separators, pad, chat markers) are dropped;
- activations whose L2 norm exceeds ``outlier_multiple`` x the median norm are dropped. In SmolLM2
  the first position of every context is an attention sink with a norm ~100x the median that
  carries almost all of the raw variance; left in, it dominates MSE and FVU.

The median is estimated once, on the first contexts of a run, and then held fixed, so the rule
is the same for every batch and a resumed run applies exactly the same threshold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class ExclusionRules:
    """The exclusion settings and the per-hook norm thresholds they imply."""

    exclude_special: bool = True
    """Drop positions holding special tokens."""
    special_ids: list[int] = field(default_factory=list)
    """Token ids treated as special."""
    outlier_multiple: float = 10.0
    """Drop activations with norm > this x the median norm (0 turns the rule off)."""
    median_norms: dict[str, float] = field(default_factory=dict)
    """Median activation norm per hook, measured on non-special positions."""

    def threshold(self, hook: str) -> float | None:
        if self.outlier_multiple <= 0:
            return None
        return self.outlier_multiple * self.median_norms[hook]

    def is_special(self, tokens: torch.Tensor) -> torch.Tensor:
        """True where a position holds a special token, whether or not the rule is on."""
        if not self.special_ids:
            return torch.zeros_like(tokens, dtype=torch.bool)
        ids = torch.tensor(self.special_ids, device=tokens.device, dtype=tokens.dtype)
        return torch.isin(tokens, ids)

    def special_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """True where a position holds a special token and the rule excludes it."""
        if not self.exclude_special:
            return torch.zeros_like(tokens, dtype=torch.bool)
        return self.is_special(tokens)

    def keep_mask(self, tokens: torch.Tensor, acts: torch.Tensor, hook: str) -> torch.Tensor:
        """Boolean [batch, seq] mask of the positions to keep for one hook."""
        keep = ~self.special_mask(tokens)
        limit = self.threshold(hook)
        if limit is not None:
            keep &= acts.float().norm(dim=-1) <= limit
        return keep

    def to_dict(self) -> dict[str, object]:
        return {
            "exclude_special": self.exclude_special,
            "special_ids": list(self.special_ids),
            "outlier_multiple": self.outlier_multiple,
            "median_norms": dict(self.median_norms),
        }


def median_norms(
    acts_by_hook: Mapping[str, Sequence[torch.Tensor]],
    special_masks: Sequence[torch.Tensor],
) -> dict[str, float]:
    """Median L2 norm of non-special positions, per hook, over a list of batches."""
    out = {}
    for hook, batches in acts_by_hook.items():
        norms = [a.float().norm(dim=-1)[~m] for a, m in zip(batches, special_masks, strict=True)]
        flat = torch.cat(norms)
        if flat.numel() == 0:
            raise ValueError("no non-special positions to estimate the median norm from")
        out[hook] = float(flat.median())
    return out
