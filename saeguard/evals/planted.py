"""Planted feature absorption: an SAE whose absorption is known, to check the metric against.

:func:`plant_absorption` wraps a trained SAE. For a chosen set of words (activations), it adds one
token latent per word that fires on that word alone, and, depending on ``mode``:

- ``"absorb"``: the letter's main latents are switched off on the word and the token latent's
  decoder row carries the letter's probe direction (cosine ``cos`` with it) and supplies ``share``
  of the word's probe projection: full absorption by the SPEC §4 definition, planted.
- ``"takeover"``: the main latents are switched off and the token latent takes over exactly what
  they contributed (decoder row along their summed contribution, activation its norm), so the
  reconstruction is unchanged: absorption as an SAE would learn it, as strong as the main latents
  were.
- ``"control"``: the token latent fires with the same activation but its decoder row is orthogonal
  to the probe direction, and the main latents stay on: no absorption.
- ``"suppress"``: the main latents are switched off and nothing absorbs (the letter is lost).

Only the two absorbing modes should raise ``mean_full_absorption``; the metric is checked by how
far above the controls it scores them (``benchmarks/absorption_check.py`` on a real SAE,
``tests/unit/test_evals.py`` on a synthetic one).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from saeguard.sae.base import SparseAutoencoder

PlantMode = Literal["absorb", "takeover", "control", "suppress"]


class PlantedAbsorption:
    """What the absorption metric reads of an SAE (``encode`` and ``W_dec``), with token latents
    planted on chosen words. Words are recognised by their exact activation vector."""

    def __init__(
        self,
        base: SparseAutoencoder,
        words: torch.Tensor,
        rows: torch.Tensor,
        activations: torch.Tensor,
        off: list[list[int]],
    ) -> None:
        self.base = base
        self._index = {_key(w): i for i, w in enumerate(words)}
        self.W_dec = torch.cat([base.W_dec.detach(), rows.to(base.W_dec.dtype)])
        self.b_dec = base.b_dec.detach()
        self._activations = activations
        self._off = off
        self.planted = len(words)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            f = self.base.encode(x)
        extra = torch.zeros(len(x), self.planted, dtype=f.dtype)
        for r, row in enumerate(x):
            i = self._index.get(_key(row))
            if i is None:
                continue
            f[r, self._off[i]] = 0
            extra[r, i] = self._activations[i]
        return torch.cat([f, extra], dim=1)


def _key(row: torch.Tensor) -> bytes:
    return row.detach().to(torch.float32).cpu().numpy().tobytes()


def plant_absorption(
    sae: SparseAutoencoder,
    x: torch.Tensor,
    directions: dict[int, np.ndarray],
    mains: dict[int, list[int]],
    letters: np.ndarray,
    words: np.ndarray,
    mode: PlantMode,
    share: float = 0.6,
    cos: float = 0.5,
    seed: int = 0,
) -> PlantedAbsorption:
    """Plant token latents on the rows ``words`` (indices into ``x``) whose letter
    (``letters[row]``) has a probe direction in ``directions`` and main latents in ``mains``."""
    rng = np.random.default_rng(seed)
    x64 = x.double()
    with torch.no_grad():
        f = sae.encode(x).double()
    w_dec = sae.W_dec.detach().double()
    rows, acts, off, planted = [], [], [], []
    for row in words:
        letter = int(letters[row])
        if letter not in directions:
            continue
        direction = np.asarray(directions[letter], dtype=np.float64)
        d = torch.from_numpy(direction / np.linalg.norm(direction))
        main = mains.get(letter, [])
        # A token-specific direction orthogonal to the probe direction.
        u = torch.from_numpy(rng.standard_normal(len(d)))
        u = u - (u @ d) * d
        u = u / u.norm()
        total = float(x64[row] @ d)
        if mode == "absorb":
            row_dir = cos * d + (1 - cos**2) ** 0.5 * u
            act = share * max(total, 0.0) / cos
        elif mode == "takeover":
            contribution = f[row, main] @ w_dec[main] if main else torch.zeros_like(d)
            act = float(contribution.norm())
            row_dir = contribution / act if act > 0 else u
        else:  # control and suppress: a token latent with nothing of the letter
            row_dir = u
            act = share * abs(total) if mode == "control" else 0.0
        rows.append(row_dir)
        acts.append(act)
        off.append(main if mode != "control" else [])
        planted.append(int(row))
    return PlantedAbsorption(
        sae,
        x[planted],
        torch.stack(rows) if rows else torch.zeros(0, x.shape[1], dtype=torch.float64),
        torch.tensor(acts, dtype=torch.float32),
        off,
    )
