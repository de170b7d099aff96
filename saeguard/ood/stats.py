"""In-distribution statistics (``IDStats``, SPEC section 5), fitted in one streaming pass.

Per latent: firing rate, |activation| quantiles (p50, p99, p99.9) among the tokens where it is
active, and its top-activating ID contexts (for explanations). Per token: the L0 and relative
reconstruction error distributions. Per text: the mean-pooled raw activation, for the
Mahalanobis (Ledoit-Wolf covariance) and k-NN baselines.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from saeguard.errors import CorpusError
from saeguard.ood.scores import SparseCodes

QUANTILES: tuple[float, ...] = (0.5, 0.99, 0.999)
"""Quantiles stored per latent: p50, p99, p99.9 of |activation| where the latent is active."""


@dataclass
class IDStats:
    """Everything the monitor knows about in-distribution text."""

    n_tokens: int
    """ID tokens the statistics were fitted on."""
    n_texts: int
    """ID texts the statistics were fitted on."""
    firing_count: torch.Tensor
    """[d_sae] tokens on which each latent was active."""
    quantiles: torch.Tensor
    """[len(QUANTILES), d_sae] |activation| quantiles among active tokens (0 if never active)."""
    l0_mean: float
    l0_std: float
    recon_mean: float
    """Mean per-token relative squared reconstruction error."""
    recon_quantiles: list[float]
    """p50, p90, p99 of the per-token relative error."""
    pooled_mean: torch.Tensor
    """[d_in] mean of the per-text pooled activations."""
    pooled_precision: torch.Tensor
    """[d_in, d_in] inverse of their Ledoit-Wolf covariance."""
    knn_bank: torch.Tensor
    """[n_texts, d_in] L2-normalised pooled activations of the fit texts."""
    top_values: torch.Tensor
    """[T, d_sae] largest |activations| of each latent on the fit texts (0: fewer than T)."""
    top_window: torch.Tensor
    """[T, d_sae] window (row of ``context_tokens``) of each top activation."""
    top_position: torch.Tensor
    """[T, d_sae] position within that window."""
    context_tokens: torch.Tensor
    """[n_windows, ctx_len] token ids of the fit windows, padded with -1."""

    @property
    def rate(self) -> torch.Tensor:
        """[d_sae] firing rate per latent."""
        return self.firing_count.double() / max(self.n_tokens, 1)

    @property
    def rate_floor(self) -> float:
        """Rate shown for a latent never seen active: below one firing in the fit set."""
        return 0.5 / max(self.n_tokens, 1)

    @property
    def p999(self) -> torch.Tensor:
        return self.quantiles[QUANTILES.index(0.999)]

    LATENT_TENSORS = ("firing_count", "quantiles", "top_values", "top_window", "top_position")
    """The per-latent tensors scoring reads next to the SAE's codes (they follow the SAE to its
    device); the baselines' tensors stay on the CPU, where numpy and scikit-learn read them."""

    def to(self, device: torch.device | str) -> IDStats:
        """These statistics with their per-latent tensors on ``device`` (the same object when
        they are there already)."""
        device = torch.device(device)
        if self.firing_count.device == device:
            return self
        return replace(self, **{n: getattr(self, n).to(device) for n in self.LATENT_TENSORS})

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by name, on the CPU (what the monitor directory saves)."""
        return {k: v.cpu() for k, v in self._tensors().items()}

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            "firing_count": self.firing_count,
            "quantiles": self.quantiles,
            "pooled_mean": self.pooled_mean,
            "pooled_precision": self.pooled_precision,
            "knn_bank": self.knn_bank,
            "top_values": self.top_values,
            "top_window": self.top_window,
            "top_position": self.top_position,
            "context_tokens": self.context_tokens,
        }

    def scalars(self) -> dict[str, object]:
        return {
            "n_tokens": self.n_tokens,
            "n_texts": self.n_texts,
            "l0_mean": self.l0_mean,
            "l0_std": self.l0_std,
            "recon_mean": self.recon_mean,
            "recon_quantiles": self.recon_quantiles,
            "quantile_levels": list(QUANTILES),
        }

    @classmethod
    def from_parts(cls, scalars: dict[str, object], tensors: dict[str, torch.Tensor]) -> IDStats:
        return cls(
            n_tokens=int(scalars["n_tokens"]),  # type: ignore[call-overload]
            n_texts=int(scalars["n_texts"]),  # type: ignore[call-overload]
            l0_mean=float(scalars["l0_mean"]),  # type: ignore[arg-type]
            l0_std=float(scalars["l0_std"]),  # type: ignore[arg-type]
            recon_mean=float(scalars["recon_mean"]),  # type: ignore[arg-type]
            recon_quantiles=[float(v) for v in scalars["recon_quantiles"]],  # type: ignore[attr-defined]
            **tensors,
        )


@dataclass
class StatsAccumulator:
    """Streams batches of (activations, codes, reconstruction errors) into :class:`IDStats`."""

    d_sae: int
    top_k: int = 5
    """Top-activating ID contexts kept per latent."""
    device: torch.device | str = "cpu"
    """Where the batches arrive and the per-latent sums are kept (the SAE's device)."""
    count: torch.Tensor = field(init=False)
    _pairs_idx: list[torch.Tensor] = field(default_factory=list)
    _pairs_val: list[torch.Tensor] = field(default_factory=list)
    _l0: list[torch.Tensor] = field(default_factory=list)
    _err: list[torch.Tensor] = field(default_factory=list)
    _pooled: list[torch.Tensor] = field(default_factory=list)
    _windows: list[list[int]] = field(default_factory=list)
    top_values: torch.Tensor = field(init=False)
    top_window: torch.Tensor = field(init=False)
    top_position: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        device = self.device
        self.count = torch.zeros(self.d_sae, dtype=torch.long, device=device)
        self.top_values = torch.zeros(self.top_k, self.d_sae, device=device)
        self.top_window = torch.zeros(self.top_k, self.d_sae, dtype=torch.long, device=device)
        self.top_position = torch.zeros(self.top_k, self.d_sae, dtype=torch.long, device=device)

    def add_windows(self, windows: list[list[int]]) -> int:
        """Register a text's windows; returns the global index of its first one."""
        first = len(self._windows)
        self._windows.extend(windows)
        return first

    def add(
        self,
        codes: SparseCodes,
        rel_error: torch.Tensor,
        window: torch.Tensor,
        position: torch.Tensor,
        pooled: torch.Tensor,
    ) -> None:
        """One batch of tokens: codes [n, m], their global window / position, and the pooled
        activation of every text the batch holds."""
        active = codes.values != 0
        idx = codes.indices[active]
        mag = codes.values.abs()[active]
        self.count += torch.bincount(idx, minlength=self.d_sae)
        self._pairs_idx.append(idx)
        self._pairs_val.append(mag.float())
        self._l0.append(codes.l0.float())
        self._err.append(rel_error.float())
        self._pooled.append(pooled.float())
        dense = torch.zeros(len(codes.values), self.d_sae, device=self.count.device)
        dense.scatter_(-1, codes.indices, codes.values.abs().float() * active)
        values = torch.cat([self.top_values, dense])
        best, rows = values.topk(self.top_k, dim=0)
        from_batch = rows >= self.top_k
        batch_rows = (rows - self.top_k).clamp_min(0)
        keep_rows = rows.clamp_max(self.top_k - 1)
        self.top_window = torch.where(
            from_batch, window[batch_rows], self.top_window.gather(0, keep_rows)
        )
        self.top_position = torch.where(
            from_batch, position[batch_rows], self.top_position.gather(0, keep_rows)
        )
        self.top_values = best

    def finish(self, ctx_len: int) -> IDStats:
        """The statistics, on the CPU (where they are saved; scoring moves what it needs)."""
        from sklearn.covariance import LedoitWolf

        if not self._l0:
            raise CorpusError("no in-distribution tokens to fit statistics on")
        l0 = torch.cat(self._l0).cpu()
        err = torch.cat(self._err).cpu()
        pooled = torch.cat(self._pooled).cpu().numpy().astype(np.float64)
        if len(pooled) < 2:
            raise CorpusError(
                f"only {len(pooled)} in-distribution text(s) to fit on; the monitor needs at "
                "least 2 (use --fit-texts of 200 or more for a usable covariance)"
            )
        quantiles = per_latent_quantiles(
            torch.cat(self._pairs_idx), torch.cat(self._pairs_val), self.d_sae, QUANTILES
        ).cpu()
        lw = LedoitWolf().fit(pooled)
        unit = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        tokens = torch.full((len(self._windows), ctx_len), -1, dtype=torch.int32)
        for i, win in enumerate(self._windows):
            tokens[i, : len(win)] = torch.tensor(win[:ctx_len], dtype=torch.int32)
        return IDStats(
            n_tokens=len(l0),
            n_texts=len(pooled),
            firing_count=self.count.cpu(),
            quantiles=quantiles,
            l0_mean=float(l0.mean()),
            l0_std=float(l0.std()) if len(l0) > 1 else 0.0,
            recon_mean=float(err.mean()),
            recon_quantiles=[float(q) for q in torch.quantile(err, torch.tensor([0.5, 0.9, 0.99]))],
            pooled_mean=torch.from_numpy(lw.location_).float(),
            pooled_precision=torch.from_numpy(lw.precision_).float(),
            knn_bank=torch.from_numpy(unit).float(),
            top_values=self.top_values.cpu(),
            top_window=self.top_window.to(torch.int32).cpu(),
            top_position=self.top_position.to(torch.int32).cpu(),
            context_tokens=tokens,
        )


def per_latent_quantiles(
    indices: torch.Tensor, values: torch.Tensor, d_sae: int, levels: tuple[float, ...]
) -> torch.Tensor:
    """[len(levels), d_sae] quantiles (lower) of ``values`` grouped by latent ``indices``."""
    order = torch.argsort(values, stable=True)
    idx, val = indices[order], values[order]
    order = torch.argsort(idx, stable=True)  # by latent; values stay sorted within each latent
    idx, val = idx[order], val[order]
    counts = torch.bincount(idx, minlength=d_sae)
    starts = torch.cumsum(counts, 0) - counts
    out = torch.zeros(len(levels), d_sae, device=values.device)
    seen = counts > 0
    for row, q in enumerate(levels):
        offset = torch.floor(q * (counts - 1).clamp_min(0).double()).long()
        pos = (starts + offset).clamp(max=max(len(val) - 1, 0))
        if len(val):
            out[row] = torch.where(seen, val[pos], torch.zeros((), device=values.device))
    return out
