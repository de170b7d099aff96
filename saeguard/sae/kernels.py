"""Sparse kernels for the TopK family: pay only for the k latents each token keeps.

A dense TopK step multiplies by W_enc once (unavoidable: every pre-activation is needed to find
the top k) and then four more times over the full dictionary: the dense decode, its two gradients
and the encoder-weight gradient. Here the decode is an ``embedding_bag`` over the kept latents and
the encoder gradient is a sparse product over them, so after the forward matmul the step costs
O(N * k * d) instead of O(N * d_sae * d).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.nn import functional as F

AuxLatents = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""AuxK's selection for the backward pass: (dead latent ids [n_dead], kept positions into them
[N, k_aux], gradient of the kept values [N, k_aux])."""

DENSE_AUX_RATIO = 7
"""AuxK's encoder gradient and decode run as dense products over the dead latents while there
are at most this many per kept one, else as sparse ones: on a 2-core CPU (N=4096, d=576,
k_aux=288) the two cross near 2,000-2,300 dead latents, and at 300 dead the dense decode with
its backward takes 30 ms against 135 ms for ``embedding_bag``."""


def _aux_is_dense(n_dead: int, k_aux: int) -> bool:
    """Whether AuxK's products run dense over the dead latents (see ``DENSE_AUX_RATIO``)."""
    return n_dead <= DENSE_AUX_RATIO * k_aux


def _aux_for_backward(saved_aux: list[torch.Tensor], grad_aux: torch.Tensor,
                      dtype: torch.dtype) -> AuxLatents | None:  # fmt: skip
    """AuxK's part of a backward pass from what forward saved after the main tensors (dead
    ids, kept positions, live mask), or None when AuxK was off."""
    if not saved_aux:
        return None
    dead, local, aux_live = saved_aux
    return dead, local, (grad_aux * aux_live).to(dtype)


def _encoder_grads(
    x: torch.Tensor,
    crow: torch.Tensor,
    cols: torch.Tensor,
    grad_values: torch.Tensor,
    w_enc: torch.Tensor,
    want_acts: bool,
    aux: AuxLatents | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (acts, b_dec, W_enc, b_enc) of kept pre-activations given in CSR form.

    The latents' gradient is a CSR matrix G [N, n] (row pointers ``crow``, sorted columns
    ``cols`` per row): ``grad W_enc = (G^T x)^T``, ~4x faster on a CPU than the same product
    through a COO matrix, and ``grad acts = G W_enc^T`` when the activations need one (e.g. a
    consistency loss back-propagating into the LM). AuxK's latents, when given, add their
    block over the dead columns.
    """
    n_latents = w_enc.shape[1]
    with warnings.catch_warnings():  # "sparse CSR support is in beta": we rely on mm only
        warnings.simplefilter("ignore", UserWarning)
        sparse_g = torch.sparse_csr_tensor(
            crow, cols, grad_values, size=(x.shape[0], n_latents), check_invariants=False
        )
        grad_w_enc_t = sparse_g.t() @ x  # [n, d] via (n x N sparse) @ (N x d)
        grad_acts = sparse_g @ w_enc.t() if want_acts else None
    grad_b_enc = torch.zeros(n_latents, dtype=grad_values.dtype, device=grad_values.device)
    grad_b_enc.index_add_(0, cols, grad_values)
    if aux is not None:
        dead, local, grad_aux = aux
        block_t, b_enc_part, acts_part = _dead_block_grads(x, dead, local, grad_aux, w_enc,
                                                           want_acts)  # fmt: skip
        grad_w_enc_t.index_add_(0, dead, block_t)
        grad_b_enc.index_add_(0, dead, b_enc_part)
        if grad_acts is not None and acts_part is not None:
            grad_acts = grad_acts + acts_part
    grad_b_dec = -(w_enc @ grad_b_enc)
    return grad_acts, grad_b_dec, grad_w_enc_t.t(), grad_b_enc


def _dead_block_grads(
    x: torch.Tensor,
    dead: torch.Tensor,
    local: torch.Tensor,
    grad_aux: torch.Tensor,
    w_enc: torch.Tensor,
    want_acts: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """AuxK's gradients restricted to the dead columns: (W_enc block transposed [n_dead, d],
    b_enc block [n_dead], acts part or None). Dense over the dead columns while they are few,
    else a sparse product whose rows are the dead latents."""
    n_rows, n_dead = x.shape[0], len(dead)
    if _aux_is_dense(n_dead, local.shape[1]):
        dense_g = grad_aux.new_zeros(n_rows, n_dead).scatter_(1, local, grad_aux)
        acts_part = dense_g @ w_enc.index_select(1, dead).t() if want_acts else None
        return dense_g.t() @ x, dense_g.sum(0), acts_part
    flat_local = local.reshape(-1)
    order = flat_local.argsort()
    by_latent = flat_local[order]
    crow = torch.zeros(n_dead + 1, dtype=torch.long, device=x.device)
    crow[1:] = torch.bincount(by_latent, minlength=n_dead).cumsum(0)
    tokens = torch.div(order, local.shape[1], rounding_mode="floor")
    values = grad_aux.reshape(-1)[order]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        g_t = torch.sparse_csr_tensor(crow, tokens, values, size=(n_dead, n_rows),
                                      check_invariants=False)  # fmt: skip
        block_t = g_t @ x
        acts_part = (g_t.t() @ w_enc.index_select(1, dead).t()) if want_acts else None
    b_enc_part = torch.zeros(n_dead, dtype=values.dtype, device=x.device)
    b_enc_part.index_add_(0, by_latent, values)
    return block_t, b_enc_part, acts_part


def _aux_select(
    pre: torch.Tensor, dead: torch.Tensor, k_aux: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AuxK's (values [N, k_aux], positions into ``dead``, live mask): the top ``k_aux`` ReLU
    pre-activations among the ``dead`` latents, read from the pre-activations the main
    selection already computed (no second matmul over the dead encoder columns)."""
    values, local = pre.index_select(1, dead).topk(k_aux, dim=-1, sorted=False)
    return values.clamp_min(0), local, values > 0


def aux_decode(
    values: torch.Tensor, local: torch.Tensor, dead: torch.Tensor, w_dec: torch.Tensor
) -> torch.Tensor:
    """``sum_j values[:, j] * w_dec[dead[local[:, j]]]``: AuxK's reconstruction, as a dense
    product over the dead rows while they are few (see ``DENSE_AUX_RATIO``), else a sparse one."""
    values = values.to(w_dec.dtype)
    if _aux_is_dense(len(dead), local.shape[1]):
        dense = values.new_zeros(values.shape[0], len(dead)).scatter(1, local, values)
        return dense @ w_dec.index_select(0, dead)
    return F.embedding_bag(dead[local], w_dec, per_sample_weights=values, mode="sum")


class _SparseTopKEncode(torch.autograd.Function):
    """(values, indices) of the top-k pre-activations and, when ``dead`` latents are given,
    AuxK's (values, indices) of the top ``k_aux`` dead ones, with one sparse backward pass.

    Inputs: activations x [N, d] (their gradient is computed only when they require one),
    b_dec [d] (subtracted before the encoder, so it gets -W_enc @ grad_b_enc), W_enc [d, n],
    b_enc [n].
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        acts: torch.Tensor,
        b_dec: torch.Tensor,
        w_enc: torch.Tensor,
        b_enc: torch.Tensor,
        k: int,
        signed: bool,
        dead: torch.Tensor | None,
        k_aux: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = acts - b_dec
        pre = torch.addmm(b_enc, x, w_enc)
        if signed:
            _, idx = pre.abs().topk(k, dim=-1, sorted=False)
            vals = pre.gather(-1, idx)
            live = torch.ones_like(vals, dtype=torch.bool)
        else:
            vals, idx = pre.topk(k, dim=-1, sorted=False)
            live = vals > 0
            vals = vals.clamp_min(0)
        if dead is None or k_aux == 0:
            aux_vals, aux_idx = vals[:, :0], idx[:, :0]
            ctx.save_for_backward(x, idx, live, w_enc)
        else:
            aux_vals, aux_idx, aux_live = _aux_select(pre, dead, k_aux)
            ctx.save_for_backward(x, idx, live, w_enc, dead, aux_idx, aux_live)
        ctx.mark_non_differentiable(idx, aux_idx)
        return vals, idx, aux_vals, aux_idx

    @staticmethod
    def backward(ctx: Any, grad_vals: torch.Tensor, _gi: Any, grad_aux: torch.Tensor,
                 _ga: Any) -> Any:  # type: ignore[override]  # fmt: skip
        x, idx, live, w_enc, *saved_aux = ctx.saved_tensors
        # Under bf16 autocast the gradients arrive in bf16; the products below run in fp32.
        g = (grad_vals * live).to(x.dtype)
        n_rows, k = idx.shape
        cols, order = idx.sort(dim=-1)  # sparse libraries expect sorted columns per row
        crow = torch.arange(0, n_rows * k + 1, k, device=idx.device)
        aux = _aux_for_backward(saved_aux, grad_aux, x.dtype)
        grads = _encoder_grads(x, crow, cols.reshape(-1), g.gather(-1, order).reshape(-1),
                               w_enc, ctx.needs_input_grad[0], aux)  # fmt: skip
        return (*grads, None, None, None, None)


def sparse_topk_encode(
    acts: torch.Tensor,
    b_dec: torch.Tensor,
    w_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    signed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k latents of ``(acts - b_dec) @ w_enc + b_enc`` as (values [N, k], indices [N, k]).

    ``signed`` keeps the k largest magnitudes with their signs (AbsTopK) instead of the k
    largest values through a ReLU.
    """
    vals, idx, _, _ = _SparseTopKEncode.apply(acts, b_dec, w_enc, b_enc, k, signed, None, 0)
    return vals, idx


def sparse_topk_encode_aux(
    acts: torch.Tensor,
    b_dec: torch.Tensor,
    w_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    signed: bool,
    dead: torch.Tensor | None,
    k_aux: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sparse_topk_encode` plus AuxK's top ``k_aux`` ReLU pre-activations among the
    ``dead`` latent ids, as (values, indices, aux values, aux positions into ``dead``); the
    AuxK pair is empty without dead latents."""
    return _SparseTopKEncode.apply(acts, b_dec, w_enc, b_enc, k, signed, dead, k_aux)  # type: ignore[no-any-return]


def sparse_decode(
    values: torch.Tensor, indices: torch.Tensor, w_dec: torch.Tensor, b_dec: torch.Tensor
) -> torch.Tensor:
    """``sum_j values[:, j] * w_dec[indices[:, j]] + b_dec`` without a dense latent matrix."""
    values = values.to(w_dec.dtype)  # bf16 autocast: the cheap sparse decode stays in fp32
    out = F.embedding_bag(indices, w_dec, per_sample_weights=values, mode="sum")
    return out + b_dec


def scatter_dense(values: torch.Tensor, indices: torch.Tensor, n_latents: int) -> torch.Tensor:
    """The dense [N, n_latents] latent matrix of a (values, indices) pair."""
    dense = values.new_zeros(values.shape[0], n_latents)
    return dense.scatter(-1, indices, values)


class _VariationalTopKEncode(torch.autograd.Function):
    """vsae's training encoder in one pass: the posterior ``mu = (x - b_dec) W_enc + b_enc``,
    ``log sigma^2 = (x - b_dec) W_logvar + b_logvar``, the sample ``z = mu + sigma * eps``, its
    top-k (ReLU'd) values and indices, AuxK's top ``k_aux`` among the ``dead`` latents, and the
    summed KL(N(mu, sigma^2) || N(0, 1)) over every token and latent.

    The backward pass builds the two dense latent gradients once each (the KL term's,
    ``dKL/dmu = mu`` and ``dKL/dlog sigma^2 = (sigma^2 - 1) / 2``, plus the sampled values'
    gradients scattered at their k + k_aux places) and spends one product per matrix on them;
    ``b_dec``'s gradient is a matrix-vector product, not a dense gradient of ``x - b_dec``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        acts: torch.Tensor,
        b_dec: torch.Tensor,
        w_enc: torch.Tensor,
        b_enc: torch.Tensor,
        w_logvar: torch.Tensor,
        b_logvar: torch.Tensor,
        eps: torch.Tensor,
        k: int,
        dead: torch.Tensor | None,
        k_aux: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = acts - b_dec
        # In x's dtype (float32) also under bf16 autocast: exp and the KL sum need the range.
        mu = torch.addmm(b_enc, x, w_enc).to(x.dtype)
        std = torch.addmm(b_logvar, x, w_logvar).to(x.dtype)  # log sigma^2 for now
        eps = eps.to(x.dtype)
        kl_terms = std.neg()  # -log sigma^2
        std.mul_(0.5).exp_()
        kl_terms.addcmul_(std, std).sub_(1).addcmul_(mu, mu)
        kl = 0.5 * kl_terms.sum()
        del kl_terms
        z = torch.addcmul(mu, std, eps)
        vals, idx = z.topk(k, dim=-1, sorted=False)
        live = vals > 0
        if dead is None or k_aux == 0:
            aux_vals, aux_idx = vals[:, :0], idx[:, :0]
            aux_saved: tuple[torch.Tensor, ...] = ()
        else:
            aux_vals, aux_idx, aux_live = _aux_select(z, dead, k_aux)
            aux_cols = dead[aux_idx]
            aux_saved = (aux_cols, aux_live, eps.gather(1, aux_cols))
        ctx.save_for_backward(x, mu, std, w_enc, w_logvar, idx, live, eps.gather(1, idx),
                              *aux_saved)  # fmt: skip
        ctx.mark_non_differentiable(idx, aux_idx)
        return vals.clamp_min(0), idx, aux_vals, aux_idx, kl

    @staticmethod
    def backward(ctx: Any, grad_vals: torch.Tensor, _gi: Any, grad_aux: torch.Tensor,
                 _ga: Any, grad_kl: torch.Tensor) -> Any:  # type: ignore[override]  # fmt: skip
        x, mu, std, w_enc, w_logvar, idx, live, eps_kept, *aux_saved = ctx.saved_tensors
        grad_mu = mu * grad_kl
        grad_logvar = std.square().sub_(1).mul_(0.5 * grad_kl)
        places = [(idx, (grad_vals * live).to(mu.dtype), eps_kept)]
        if aux_saved:
            aux_cols, aux_live, eps_aux = aux_saved
            places.append((aux_cols, (grad_aux * aux_live).to(mu.dtype), eps_aux))
        for cols, grad_z, eps_at in places:  # dz/dmu = 1, dz/dlog sigma^2 = sigma eps / 2
            grad_mu.scatter_add_(1, cols, grad_z)
            grad_logvar.scatter_add_(1, cols, grad_z * std.gather(1, cols) * eps_at * 0.5)
        grad_w_enc, grad_b_enc = x.t() @ grad_mu, grad_mu.sum(0)
        grad_w_logvar, grad_b_logvar = x.t() @ grad_logvar, grad_logvar.sum(0)
        grad_b_dec = -(w_enc @ grad_b_enc + w_logvar @ grad_b_logvar)
        grad_acts = None
        if ctx.needs_input_grad[0]:
            grad_acts = grad_mu @ w_enc.t() + grad_logvar @ w_logvar.t()
        return (grad_acts, grad_b_dec, grad_w_enc, grad_b_enc, grad_w_logvar, grad_b_logvar,
                None, None, None, None)  # fmt: skip


def variational_topk_encode(
    acts: torch.Tensor,
    b_dec: torch.Tensor,
    w_enc: torch.Tensor,
    b_enc: torch.Tensor,
    w_logvar: torch.Tensor,
    b_logvar: torch.Tensor,
    eps: torch.Tensor,
    k: int,
    dead: torch.Tensor | None,
    k_aux: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """vsae's sampled top-k latents (values [N, k], indices), AuxK's (values [N, k_aux],
    positions into ``dead``; empty without dead latents) and the KL summed over tokens and
    latents, differentiable in every parameter (see ``_VariationalTopKEncode``)."""
    return _VariationalTopKEncode.apply(acts, b_dec, w_enc, b_enc, w_logvar, b_logvar, eps, k,  # type: ignore[no-any-return]
                                        dead, k_aux)  # fmt: skip


def batch_topk_select(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, values) of the ``k * N`` largest positive entries of ``pre`` [N, n] (ReLU
    applied), sorted by row then column: BatchTopK's selection, without a gradient.

    One flat top-k over N * n entries costs ~0.6 s at N=4096, n=9216 on a 2-core CPU. Each token
    first offers its ``4k`` largest entries and the batch's top ``k * N`` is taken among those;
    that is exact unless some token's candidates were all kept (it might have had more), and
    then the flat top-k runs instead.
    """
    n_rows, n_latents = pre.shape
    keep = min(k * n_rows, pre.numel())
    width = min(n_latents, 4 * k)
    cand_vals, cand_cols = pre.topk(width, dim=-1, sorted=False)
    values, position = cand_vals.reshape(-1).topk(keep, sorted=False)
    rows = torch.div(position, width, rounding_mode="floor")
    kept_per_row = torch.bincount(rows[values > 0], minlength=n_rows)
    if width < n_latents and bool((kept_per_row >= width).any()):
        values, flat = pre.reshape(-1).topk(keep, sorted=False)
        rows, cols = torch.div(flat, n_latents, rounding_mode="floor"), flat % n_latents
    else:
        cols = cand_cols.reshape(-1)[position]
    live = values > 0
    rows, cols, values = rows[live], cols[live], values[live]
    order = (rows * n_latents + cols).argsort()
    return rows[order], cols[order], values[order]


class _SparseBatchTopKEncode(torch.autograd.Function):
    """BatchTopK latents in CSR form (values [nnz], columns [nnz], row pointers [N+1]) and, when
    ``dead`` latents are given, AuxK's (values, indices) of the top ``k_aux`` dead ones per
    token, with the same sparse backward pass as TopK; tokens keep different numbers of
    latents."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        acts: torch.Tensor,
        b_dec: torch.Tensor,
        w_enc: torch.Tensor,
        b_enc: torch.Tensor,
        k: int,
        dead: torch.Tensor | None,
        k_aux: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = acts - b_dec
        pre = torch.addmm(b_enc, x, w_enc)
        rows, cols, values = batch_topk_select(pre, k)
        crow = torch.zeros(x.shape[0] + 1, dtype=torch.long, device=x.device)
        crow[1:] = torch.bincount(rows, minlength=x.shape[0]).cumsum(0)
        if dead is None or k_aux == 0:
            aux_vals, aux_idx = pre[:, :0], cols.new_zeros(x.shape[0], 0)
            ctx.save_for_backward(x, crow, cols, w_enc)
        else:
            aux_vals, aux_idx, aux_live = _aux_select(pre, dead, k_aux)
            ctx.save_for_backward(x, crow, cols, w_enc, dead, aux_idx, aux_live)
        ctx.mark_non_differentiable(cols, crow, aux_idx)
        return values, cols, crow, aux_vals, aux_idx

    @staticmethod
    def backward(ctx: Any, grad_values: torch.Tensor, _gc: Any, _gr: Any,
                 grad_aux: torch.Tensor, _ga: Any) -> Any:  # type: ignore[override]  # fmt: skip
        x, crow, cols, w_enc, *saved_aux = ctx.saved_tensors
        aux = _aux_for_backward(saved_aux, grad_aux, x.dtype)
        grads = _encoder_grads(x, crow, cols, grad_values.to(x.dtype), w_enc,
                               ctx.needs_input_grad[0], aux)  # fmt: skip
        return (*grads, None, None, None)


def sparse_batch_topk_encode(
    acts: torch.Tensor,
    b_dec: torch.Tensor,
    w_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    dead: torch.Tensor | None = None,
    k_aux: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchTopK latents of ``(acts - b_dec) @ w_enc + b_enc`` as CSR (values, cols, crow), plus
    AuxK's (values [N, k_aux], positions into ``dead``) (empty without dead latents)."""
    return _SparseBatchTopKEncode.apply(acts, b_dec, w_enc, b_enc, k, dead, k_aux)  # type: ignore[no-any-return]


def sparse_decode_csr(
    values: torch.Tensor,
    cols: torch.Tensor,
    crow: torch.Tensor,
    w_dec: torch.Tensor,
    b_dec: torch.Tensor,
) -> torch.Tensor:
    """``x_hat[i] = sum_{j in row i} values[j] * w_dec[cols[j]] + b_dec`` (rows may be empty)."""
    values = values.to(w_dec.dtype)
    out = F.embedding_bag(cols, w_dec, crow, mode="sum", per_sample_weights=values,
                          include_last_offset=True)  # fmt: skip
    return out + b_dec


SPARSE_DECODE_FRACTION = 1 / 32
"""A dense latent matrix decodes through ``embedding_bag`` over its non-zeros while at most this
fraction of its entries is non-zero (288 a token at 9,216 latents), else as one dense product:
the gather costs ~d memory-bound operations per non-zero against the product's ~d
multiply-adds per entry at full speed."""


def decode_latents(f: torch.Tensor, w_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """``f @ w_dec + b_dec`` of dense latents [N, n] that are mostly zero (gated's), paying, in
    the decode and both its gradients, for the non-zeros only while they are few (see
    ``SPARSE_DECODE_FRACTION``); the count is read on the host, like BatchTopK's."""
    active = f != 0
    if int(active.sum()) > SPARSE_DECODE_FRACTION * f.numel():
        return f @ w_dec + b_dec
    rows, cols = active.nonzero(as_tuple=True)  # sorted by row, then column
    crow = torch.zeros(f.shape[0] + 1, dtype=torch.long, device=f.device)
    crow[1:] = torch.bincount(rows, minlength=f.shape[0]).cumsum(0)
    return sparse_decode_csr(f[rows, cols], cols, crow, w_dec, b_dec)
