"""Matching-pursuit SAE (MP-SAE): latents are chosen greedily, one at a time, by projecting the
residual on the decoder atoms, so later atoms explain what earlier ones left (no encoder matrix).

The coefficient rule ``<r, w> / |w|^2`` works for atoms of any norm, so folding an input scale
into the decoder keeps encoding exact.

Speed: the choice of atoms is not differentiable, so it runs without autograd. For large batches
it never recomputes ``r @ W_dec.T``: with the Gram matrix ``G = W_dec W_dec^T`` the projections
update as ``p -= c * G[j]`` (one gathered row per token per step instead of a dense matmul). The
coefficients are then recomputed with autograd on the k chosen atoms only, which costs
``k * d_in`` per token instead of ``k * d_in * d_sae``.
"""

from __future__ import annotations

import torch

from saeguard.sae.base import SparseAutoencoder, StepOutput, normalized_mse
from saeguard.sae.registry import register


@register("mp", k_bounds_l0=True)
class MatchingPursuitSAE(SparseAutoencoder):
    """k greedy steps: ``j = argmax <r, w_j>/|w_j|``; ``f_j += <r, w_j>/|w_j|^2``; ``r -= ...``."""

    @torch.no_grad()
    def select_atoms(self, x: torch.Tensor) -> torch.Tensor:
        """Indices [N, k] of the atoms chosen at each greedy step (no autograd)."""
        w = self.W_dec
        norms = w.pow(2).sum(-1).clamp_min(1e-12).sqrt()
        n, k = x.shape[0], self.cfg.k
        chosen = torch.empty(n, k, dtype=torch.long, device=x.device)
        # Scores are normalised projections q_i = <r, w_i>/|w_i|. The Gram matrix costs
        # d_sae^2 * d_in once; recomputing the projections costs N * d_sae * d_in per step, so the
        # Gram path wins as soon as N * (k - 1) exceeds d_sae.
        if n * (k - 1) <= self.cfg.d_sae:
            residual = x - self.b_dec
            rows = torch.arange(n, device=x.device)
            for step in range(k):
                scores = (residual @ w.t()) / norms
                j = scores.argmax(-1)
                chosen[:, step] = j
                coef = scores[rows, j] / norms[j]
                residual = residual - coef.unsqueeze(-1) * w[j]
            return chosen
        # q_i -= c * <w_j, w_i>/|w_i| with c = q_j/|w_j|: one gathered row of
        # ``gram_scaled[j, i] = <w_j, w_i>/|w_i|`` per token and step. Tokens are processed in
        # chunks so each chunk's scores stay in cache while the k steps update them.
        gram_scaled = (w @ w.t()) / norms
        scores_all = ((x - self.b_dec) @ w.t()) / norms
        chunk = 128
        for start in range(0, n, chunk):
            scores = scores_all[start : start + chunk]
            rows = torch.arange(scores.shape[0], device=x.device)
            for step in range(k):
                j = scores.argmax(-1)
                chosen[start : start + chunk, step] = j
                if step < k - 1:
                    coef = scores[rows, j] / norms[j]
                    scores.sub_(coef.unsqueeze(-1) * gram_scaled[j])
        return chosen

    def pursue_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(coefficients [N, k], atom indices [N, k]) of the greedy decomposition, differentiable
        in ``W_dec`` and ``b_dec`` given the chosen atoms. An index may repeat across steps."""
        chosen = self.select_atoms(x)
        # Step-major [k, N, d_in], unbound once: slicing a [N, k, d_in] tensor per step would make
        # autograd materialise a full-size zero gradient for every step.
        atoms = torch.nn.functional.embedding(chosen.t(), self.W_dec).unbind(0)
        residual = x - self.b_dec
        coefs = []
        for atom in atoms:
            coef = (residual * atom).sum(-1) / atom.pow(2).sum(-1).clamp_min(1e-12)
            residual = residual - coef.unsqueeze(-1) * atom
            coefs.append(coef)
        return torch.stack(coefs, dim=1), chosen

    def pursue(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents [N, d_sae] (repeated atoms accumulate)."""
        coefs, chosen = self.pursue_sparse(x)
        f = x.new_zeros(x.shape[0], self.cfg.d_sae)
        return f.scatter_add(1, chosen, coefs.to(f.dtype))

    def encode_flat(self, x: torch.Tensor) -> torch.Tensor:
        return self.pursue(x)

    def training_step(
        self, x: torch.Tensor, dead_mask: torch.Tensor | None, sparsity_scale: float
    ) -> StepOutput:
        coefs, chosen = self.pursue_sparse(x)
        x_hat = torch.einsum("nk,nkd->nd", coefs, torch.nn.functional.embedding(chosen, self.W_dec))
        x_hat = x_hat + self.b_dec
        mse = normalized_mse(x, x_hat)
        with torch.no_grad():
            fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=x.device)
            fired[chosen[coefs != 0]] = True
            ordered = chosen.sort(-1).values  # an atom chosen twice is one active latent
            distinct = 1 + (ordered.diff(dim=-1) != 0).sum(-1)
            l0 = distinct.float().mean() if x.shape[0] else x.new_zeros(())
        return StepOutput(mse, x_hat, fired, l0, {"mse": mse.detach()})

    @torch.no_grad()
    def after_step_(self) -> None:
        self.W_enc.copy_(self.W_dec.t())  # kept for SAELens-format tools that read W_enc

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        super().fold_input_scale_(scale)
        self.W_enc.copy_(self.W_dec.t())
