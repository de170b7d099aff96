"""Variational TopK SAE (vSAE; Baker et al. 2025, "Analysis of Variational Sparse
Autoencoders"): the latents are a sample of a Gaussian posterior, kept close to N(0, I).

Encoder: ``mu = W_enc (x - b_dec) + b_enc`` (TopK's pre-activation) and ``log sigma^2 =
W_logvar (x - b_dec) + b_logvar``, a second encoder matrix and bias as in the paper, so the
posterior width depends on the input (the cheaper per-latent or shared-weight forms would fix or
tie it; the price is one more dense product forward and one backward, and the KL term makes the
encoder gradients dense anyway). ``W_logvar`` starts at 0 and ``b_logvar`` at -2 (sigma ~ 0.37),
so the first top-k choices follow ``mu`` rather than the noise.

Training: ``z = mu + sigma * eps`` (reparameterisation, ``eps ~ N(0, I)``), then TopK's
selection on the sample: ``f = TopK_k(ReLU(z))``, ``x_hat = f W_dec + b_dec``. Loss:

    normalised MSE + AuxK (TopK's, on the dead latents' sampled pre-activations)
    + kl_weight * sum_t KL(q(z|x_t) || N(0, I)) / sum_t |x_t - mean(x)|^2

where each token's KL is summed over **all d_sae latents** (the posterior of the whole latent
vector, not only of the k kept ones): ``KL_t = 1/2 sum_i (mu^2 + sigma^2 - 1 - log sigma^2)``.
It is divided by the batch's total variance, the denominator of the normalised MSE, so the loss
times that variance is ``sum |x - x_hat|^2 + kl_weight * sum KL``: ``kl_weight`` is the beta of a
beta-VAE with a squared-error likelihood, in the training's units (inputs scaled to E|x|^2 =
d_in), and 0 gives TopK's loss with noisy selection.

Inference (``encode``, ``sparse_codes``, eval, OOD, the monitor) uses the mean: the SAE is then
exactly a TopK SAE with ``W_enc``, ``b_enc``. It is saved under its own architecture name
``vsae`` (SAELens has none; its strict loading would refuse the two extra tensors under
``topk``), with ``activation_fn_str: topk`` and k; ``W_logvar`` [d_in, d_sae] and ``b_logvar``
[d_sae] are saved beside the four standard tensors and read back.

The noise is drawn per block of :data:`NOISE_ROWS` tokens from a generator seeded by (the SAE's
noise seed, drawn from its initialisation generator; the step; the block's index in the global
batch), on the SAE's device: two data-parallel ranks draw the noise one process draws, a resumed
run draws what the uninterrupted one did, and no global random state is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from saeguard.errors import ConfigError
from saeguard.sae.base import (
    StepOutput,
    aux_latents,
    auxk_loss,
    batch_variance,
    normalized_mse,
    saved_tensor,
    share_first_row,
    sparse_step_stats,
)
from saeguard.sae.config import SAEConfig
from saeguard.sae.kernels import sparse_decode, variational_topk_encode
from saeguard.sae.registry import register
from saeguard.sae.topk import TopKSAE

NOISE_ROWS = 512
"""Tokens drawn from one noise seed (a rank draws only the blocks its share overlaps)."""

INITIAL_LOGVAR = -2.0
"""``b_logvar`` at initialisation: sigma = e^-1 ~ 0.37 for every latent."""


@dataclass(kw_only=True)
class VariationalTopKConfig(SAEConfig):
    """vsae's settings beside the shared ones."""

    kl_weight: float = 1e-3
    """Weight beta of the KL(q(z|x) || N(0, I)) term against the squared error (0: no KL)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not math.isfinite(self.kl_weight) or self.kl_weight < 0:
            raise ConfigError(f"--kl-weight must be a finite number >= 0, got {self.kl_weight}")


def kl_to_standard_normal(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, e^log_var) || N(0, 1)) summed over the last dimension: one value per token."""
    return 0.5 * (mu.square() + log_var.exp() - 1 - log_var).sum(-1)


def _block_seed(seed: int, step: int, block: int) -> int:
    """A 64-bit generator seed for one (SAE, step, block of tokens)."""
    mixed = (seed * 6364136223846793005 + step) % 2**64
    return (mixed * 1442695040888963407 + block) % 2**64


@register("vsae", config=VariationalTopKConfig, k_bounds_l0=True)
class VariationalTopKSAE(TopKSAE):
    """TopK of a reparameterised Gaussian sample in training, TopK of its mean at inference."""

    cfg: VariationalTopKConfig

    def __init__(self, cfg: VariationalTopKConfig) -> None:
        super().__init__(cfg)
        self.W_logvar = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae))
        self.b_logvar = nn.Parameter(torch.full((cfg.d_sae,), INITIAL_LOGVAR))
        self.noise_seed = 0
        self.noise_step = 0

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """TopK's initialisation; ``W_logvar`` = 0, ``b_logvar`` = :data:`INITIAL_LOGVAR`, and
        a noise seed drawn from ``generator`` (the trainer's: seed and SAE name)."""
        super().reset_parameters(generator)
        self.noise_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self.noise_step = 0
        if hasattr(self, "W_logvar"):  # not yet while the base constructor runs
            with torch.no_grad():
                self.W_logvar.zero_()
                self.b_logvar.fill_(INITIAL_LOGVAR)

    def get_extra_state(self) -> torch.Tensor:
        """(noise seed, step) in checkpoints (``state_dict``), so a resumed run draws on."""
        return torch.tensor([self.noise_seed, self.noise_step], dtype=torch.int64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.noise_seed, self.noise_step = (int(v) for v in state.tolist())

    def noise(self, n_rows: int, device: torch.device) -> torch.Tensor:
        """eps [n_rows, d_sae] for this rank's share of the global batch at this step."""
        first = share_first_row()
        start, stop = first // NOISE_ROWS, (first + n_rows - 1) // NOISE_ROWS + 1
        noise = torch.empty((stop - start) * NOISE_ROWS, self.cfg.d_sae, device=device)
        for position, block in enumerate(range(start, stop)):
            generator = torch.Generator(device=device)
            generator.manual_seed(_block_seed(self.noise_seed, self.noise_step, block))
            noise[position * NOISE_ROWS : (position + 1) * NOISE_ROWS].normal_(generator=generator)
        offset = first - start * NOISE_ROWS
        return noise[offset : offset + n_rows]

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, log sigma^2) [N, d_sae] of a flat batch."""
        centred = x - self.b_dec
        return self.pre_acts(x), torch.addmm(self.b_logvar, centred, self.W_logvar)

    def training_step(
        self, x: torch.Tensor, dead_mask: torch.Tensor | None, sparsity_scale: float
    ) -> StepOutput:
        dead, k_aux = aux_latents(self, dead_mask)
        values, indices, aux_values, aux_local, kl_sum = variational_topk_encode(
            x, self.b_dec, self.W_enc, self.b_enc, self.W_logvar, self.b_logvar,
            self.noise(len(x), x.device), self.cfg.k, dead, k_aux,
        )  # fmt: skip
        x_hat = sparse_decode(values, indices, self.W_dec, self.b_dec)
        mse = normalized_mse(x, x_hat)
        aux = auxk_loss(self, x, x_hat, dead, aux_values, aux_local)
        kl = kl_sum / batch_variance(x)
        fired, l0 = sparse_step_stats(values, indices, self.cfg.d_sae)
        metrics = {"mse": mse.detach(), "auxk": aux.detach(), "kl": kl.detach()}
        return StepOutput(mse + aux + self.cfg.kl_weight * kl, x_hat, fired, l0, metrics)

    @torch.no_grad()
    def after_step_(self) -> None:
        self.noise_step += 1

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        super().fold_input_scale_(scale)
        self.W_logvar.mul_(scale)

    @torch.no_grad()
    def centre_encoder_input_(self) -> None:
        super().centre_encoder_input_()
        self.b_logvar.add_(self.b_dec @ self.W_logvar)

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {"W_logvar": self.W_logvar.detach(), "b_logvar": self.b_logvar.detach()}

    def load_extra_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        shapes = {"W_logvar": (self.cfg.d_in, self.cfg.d_sae), "b_logvar": (self.cfg.d_sae,)}
        with torch.no_grad():
            for name, shape in shapes.items():
                getattr(self, name).copy_(saved_tensor(tensors, name, shape))
