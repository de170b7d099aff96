"""Gated SAE (Rajamanoharan et al. 2024, "Improving dictionary learning with gated sparse
autoencoders"): one path decides which latents are active, another how large they are.

- gate: ``pi_gate = W_gate (x - b_dec) + b_gate``; a latent is active where ``pi_gate > 0``;
- magnitude: ``pi_mag = W_mag (x - b_dec) + b_mag`` with ``W_mag = exp(r_mag) * W_gate`` (each
  latent's magnitude row is its gate row rescaled: weight sharing, d_sae extra numbers), so
  ``pi_mag = exp(r_mag) * (pi_gate - b_gate) + b_mag`` costs no second matmul;
- ``f = 1[pi_gate > 0] * ReLU(pi_mag)``, ``x_hat = f W_dec + b_dec``.

Loss (the paper's eq. 8, with the decoder-norm weighting of the April 2024 update):
``|x - x_hat|^2 + lambda sum_i ReLU(pi_gate)_i |W_dec,i| + |x - (ReLU(pi_gate) W_dec' + b_dec')|^2``
where ``'`` marks a frozen (detached) copy, each term a mean over tokens. The Heaviside gate has
no gradient: the gate weights learn through the sparsity penalty, the auxiliary reconstruction
and the shared magnitude weights. Decoder norms are left free (as for ``relu``): weighting the
penalty by them makes the loss invariant to moving a latent's scale between its encoder and
decoder rows, which is the paper's unit-norm decoder up to that reparametrisation.

Saved in SAELens's ``gated`` layout: ``W_enc`` (= ``W_gate``) [d_in, d_sae], ``b_gate``,
``r_mag``, ``b_mag`` [d_sae], ``W_dec``, ``b_dec`` (no ``b_enc``: here the gate bias is the
base class's ``b_enc``, saved under SAELens's name).
"""

from __future__ import annotations

import torch
from torch import nn

from saeguard.sae.base import (
    SparseAutoencoder,
    StepOutput,
    dense_step_stats,
    mse_sum,
    saved_tensor,
    token_mean,
)
from saeguard.sae.config import SAEConfig
from saeguard.sae.kernels import decode_latents
from saeguard.sae.registry import register

DEFAULT_L1 = 5.0
"""lambda when ``--l1-coef`` is not given: relu's, so the two penalties start on one scale."""


@register("gated")
class GatedSAE(SparseAutoencoder):
    """Gated SAE; lambda is the shared ``l1_coef`` (default :data:`DEFAULT_L1`), warmed up like
    relu's. Per-token loss terms: trains data-parallel exactly."""

    unit_norm_decoder = False
    file_names = {"b_enc": "b_gate"}

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        # Log of each latent's magnitude-path scale (W_mag = exp(r_mag) * W_gate), and its bias.
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Base initialisation (decoder rows of norm 0.1, encoder tied to them); r_mag = 0
        (W_mag = W_gate) and b_mag = 0."""
        super().reset_parameters(generator)
        if hasattr(self, "r_mag"):  # not yet while the base constructor runs
            with torch.no_grad():
                self.r_mag.zero_()
                self.b_mag.zero_()

    @property
    def b_gate(self) -> torch.Tensor:
        """The gate bias (stored as ``b_enc``)."""
        return self.b_enc

    def paths(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pi_gate, pi_mag) [N, d_sae] of a flat batch, from one encoder product. It is
        ``x W - b_dec W``: b_dec's gradient is then a matrix-vector product, not the dense
        gradient of ``x - b_dec``."""
        projection = torch.addmm(-(self.b_dec @ self.W_enc), x, self.W_enc)
        return projection + self.b_enc, torch.addcmul(self.b_mag, projection, self.r_mag.exp())

    def encode_flat(self, x: torch.Tensor) -> torch.Tensor:
        gate, magnitude = self.paths(x)
        return torch.relu(magnitude) * (gate > 0)

    def training_step(
        self, x: torch.Tensor, dead_mask: torch.Tensor | None, sparsity_scale: float
    ) -> StepOutput:
        gate, magnitude = self.paths(x)
        f = torch.relu(magnitude) * (gate > 0)
        x_hat = decode_latents(f, self.W_dec, self.b_dec)
        mse = mse_sum(x, x_hat)
        gate_acts = torch.relu(gate)
        l1 = token_mean(gate_acts @ self.W_dec.norm(dim=-1))
        via_gate = decode_latents(gate_acts, self.W_dec.detach(), self.b_dec.detach())
        aux = mse_sum(x, via_gate)
        coef = self.cfg.sparsity_coef(DEFAULT_L1) * sparsity_scale
        fired, l0 = dense_step_stats(f)
        metrics = {"mse": mse.detach(), "l1": l1.detach(), "aux_recon": aux.detach()}
        return StepOutput(mse + coef * l1 + aux, x_hat, fired, l0, metrics)

    @torch.no_grad()
    def centre_encoder_input_(self) -> None:
        shift = self.b_dec @ self.W_enc
        self.b_enc.add_(shift)
        self.b_mag.add_(shift * self.r_mag.exp())

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {"r_mag": self.r_mag.detach(), "b_mag": self.b_mag.detach()}

    def load_extra_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name in ("r_mag", "b_mag"):
                getattr(self, name).copy_(saved_tensor(tensors, name, (self.cfg.d_sae,)))
