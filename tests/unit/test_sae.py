"""SAE architectures: shapes, save/load, foreign formats, sparse kernels and input checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from saeguard.errors import ConfigError, SaeguardError
from saeguard.sae import ARCHITECTURES, SAEConfig, create_sae
from saeguard.sae.io import load_sae, save_sae
from saeguard.sae.kernels import batch_topk_select, sparse_decode, sparse_topk_encode

REQUIRED = {"relu", "topk", "batchtopk", "jumprelu", "abstopk", "matryoshka", "mp"}


def _sae(arch: str, d: int = 8, n: int = 32, k: int = 3):
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(architecture=arch, d_in=d, d_sae=n, k=k))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def test_registry_holds_every_required_architecture() -> None:
    assert set(ARCHITECTURES) >= REQUIRED
    with pytest.raises(SaeguardError, match="unknown SAE architecture 'nope'.*topk"):
        create_sae(SAEConfig(architecture="nope", d_in=4, d_sae=8, k=2))


@pytest.mark.parametrize("arch", sorted(REQUIRED))
def test_any_batch_shape_and_sparsity(arch: str) -> None:
    sae = _sae(arch)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        f = sae.encode(x)
        assert f.shape == (2, 5, 32) and sae(x).shape == (2, 5, 8)
        assert sae.encode(x[0, 0]).shape == (32,)
        torch.testing.assert_close(sae.decode(f), sae(x))
    if arch in ("topk", "abstopk", "mp"):
        assert ((f != 0).sum(-1) <= 3).all()
    if arch == "abstopk":
        assert (f < 0).any()  # signs are kept


@pytest.mark.parametrize("arch", sorted(REQUIRED))
def test_save_load_round_trip_is_exact(arch: str, tmp_path: Path) -> None:
    sae = _sae(arch)
    if arch in ("batchtopk", "matryoshka"):
        sae.threshold.fill_(0.05)
    save_sae(sae, tmp_path, {"hook": "resid_post.3", "model": "tiny"})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert (
        cfg["d_in"] == 8 and cfg["d_sae"] == 32 and cfg["hook_name"] == "blocks.3.hook_resid_post"
    )
    loaded, meta = load_sae(tmp_path)
    x = torch.randn(16, 8)
    with torch.no_grad():
        assert torch.equal(sae(x), loaded(x))
    assert type(loaded) is type(sae) and meta["hook"] == "resid_post.3"


def test_saelens_fixtures_load_and_match_their_formulas(tmp_path: Path) -> None:
    torch.manual_seed(1)
    d, n = 6, 20
    tensors = {
        "W_enc": torch.randn(d, n),
        "b_enc": torch.randn(n) * 0.1,
        "W_dec": torch.randn(n, d),
        "b_dec": torch.randn(d),
    }
    x = torch.randn(10, d)
    # A standard (ReLU) SAE written without b_dec applied to the input.
    std = tmp_path / "standard"
    std.mkdir()
    save_file(tensors, str(std / "sae_weights.safetensors"))
    (std / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": d, "d_sae": n, "apply_b_dec_to_input": False,
        "normalize_activations": "none", "hook_name": "blocks.4.hook_resid_pre",
        "model_name": "gpt2",
    }))  # fmt: skip
    sae, meta = load_sae(std)
    expected = (
        torch.relu(x @ tensors["W_enc"] + tensors["b_enc"]) @ tensors["W_dec"] + tensors["b_dec"]
    )
    torch.testing.assert_close(sae(x).detach(), expected, atol=1e-5, rtol=1e-5)
    assert meta["format"] == "saelens" and meta["hook"] == "resid_pre.4"
    # A JumpReLU SAE (v6 layout: metadata block, threshold tensor).
    jr = tmp_path / "jumprelu"
    jr.mkdir()
    threshold = torch.rand(n) * 0.5
    save_file({**tensors, "threshold": threshold}, str(jr / "sae_weights.safetensors"))
    (jr / "cfg.json").write_text(json.dumps({
        "architecture": "jumprelu", "d_in": d, "d_sae": n, "apply_b_dec_to_input": True,
        "normalize_activations": "none", "metadata": {"hook_name": "blocks.2.hook_mlp_out"},
    }))  # fmt: skip
    sae, meta = load_sae(jr)
    pre = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    feats = torch.relu(pre) * (pre > threshold)
    torch.testing.assert_close(
        sae(x).detach(), feats @ tensors["W_dec"] + tensors["b_dec"], atol=1e-5, rtol=1e-5
    )
    assert meta["hook"] == "mlp_out.2"


def test_sparsify_fixture_loads_and_matches_its_formula(tmp_path: Path) -> None:
    torch.manual_seed(2)
    d, n, k = 6, 24, 3
    enc_w, enc_b = torch.randn(n, d), torch.randn(n) * 0.1
    w_dec, b_dec = torch.randn(n, d), torch.randn(d)
    save_file(
        {"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": w_dec, "b_dec": b_dec},
        str(tmp_path / "sae.safetensors"),
    )
    (tmp_path / "cfg.json").write_text(json.dumps({
        "expansion_factor": 4, "normalize_decoder": True, "num_latents": 0, "k": k,
        "multi_topk": False, "skip_connection": False, "d_in": d,
    }))  # fmt: skip
    sae, meta = load_sae(tmp_path)
    x = torch.randn(9, d)
    pre = torch.relu((x - b_dec) @ enc_w.t() + enc_b)
    vals, idx = pre.topk(k, dim=-1)
    expected = (vals.unsqueeze(-1) * w_dec[idx]).sum(1) + b_dec
    torch.testing.assert_close(sae(x).detach(), expected, atol=1e-5, rtol=1e-5)
    assert meta["format"] == "sparsify"


def test_corrupt_or_mismatched_weights_are_named(tmp_path: Path) -> None:
    sae = _sae("topk")
    save_sae(sae, tmp_path, {"hook": "resid_post.1"})
    (tmp_path / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(SaeguardError, match="sae_weights.safetensors is not a readable"):
        load_sae(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["saeguard"]["sae_config"]["d_sae"] = 64
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    save_file({"W_enc": torch.zeros(8, 32), "b_enc": torch.zeros(32), "W_dec": torch.zeros(32, 8),
               "b_dec": torch.zeros(8)}, str(tmp_path / "sae_weights.safetensors"))  # fmt: skip
    with pytest.raises(SaeguardError, match=r"W_enc has shape \(8, 32\), expected \(8, 64\)"):
        load_sae(tmp_path)


@pytest.mark.parametrize("signed", [False, True])
def test_sparse_kernels_match_dense_gradients(signed: bool) -> None:
    torch.manual_seed(0)
    n_rows, d, n, k = 40, 12, 64, 5
    acts = torch.randn(n_rows, d, dtype=torch.float64)

    def params():
        g = torch.Generator().manual_seed(3)
        shapes = [(d,), (d, n), (n,), (n, d)]
        return [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]

    b_dec, w_enc, b_enc, w_dec = sparse_params = params()
    vals, idx = sparse_topk_encode(acts, b_dec, w_enc, b_enc, k, signed)
    (sparse_decode(vals, idx, w_dec, b_dec) - acts).pow(2).sum().backward()
    b_dec2, w_enc2, b_enc2, w_dec2 = dense_params = params()
    pre = (acts - b_dec2) @ w_enc2 + b_enc2
    if signed:
        _, top = pre.abs().topk(k, -1)
        top_vals = pre.gather(-1, top)
    else:
        top_vals, top = pre.topk(k, -1)
        top_vals = top_vals.relu()
    f = torch.zeros(n_rows, n, dtype=torch.float64).scatter(-1, top, top_vals)
    (f @ w_dec2 + b_dec2 - acts).pow(2).sum().backward()
    for a, b in zip(sparse_params, dense_params, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def _flat_batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Reference BatchTopK: one flat top-k of the ReLU pre-activations, densely scattered."""
    flat = pre.relu().reshape(-1)
    values, index = flat.topk(k * pre.shape[0])
    return torch.zeros_like(flat).scatter(0, index, values).reshape(pre.shape)


@pytest.mark.parametrize("case", ["typical", "one token takes many", "few positive"])
def test_batch_topk_selection_is_the_flat_top_k(case: str) -> None:
    """The two-stage selection (each token's 4k candidates, then the batch's top k*N) must equal
    one flat top-k, including when a token would keep more than its 4k candidates."""
    torch.manual_seed(1)
    pre = torch.randn(50, 200, dtype=torch.float64)
    if case == "one token takes many":
        pre[7] += 10.0  # token 7 alone holds more than 4k of the batch's top entries
    if case == "few positive":
        pre -= 3.0
    rows, cols, values = batch_topk_select(pre, k=3)
    dense = torch.zeros_like(pre).index_put((rows, cols), values)
    torch.testing.assert_close(dense, _flat_batch_topk(pre, 3))
    assert bool((values > 0).all())
    assert bool(((rows[1:] > rows[:-1]) | ((rows[1:] == rows[:-1]) & (cols[1:] > cols[:-1]))).all())
    if case == "one token takes many":
        assert int((rows == 7).sum()) > 4 * 3


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_sparse_batch_topk_training_matches_the_dense_formula(arch: str) -> None:
    """Loss and every gradient (the input's too) of the CSR training step equal the dense
    BatchTopK/Matryoshka formulas."""
    sae = _sae(arch, d=12, n=64, k=4).double()
    sae.cfg.aux_coef = 0.0
    acts = torch.randn(40, 12, dtype=torch.float64, requires_grad=True)
    out = sae.training_step(acts, None, 1.0)
    out.loss.backward()
    sparse_grads = [p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
    sparse_acts_grad = acts.grad.clone()
    sae.zero_grad()
    acts.grad = None
    f = _flat_batch_topk(sae.pre_acts(acts), 4)
    losses, x_hat, start = [], sae.b_dec.expand_as(acts), 0
    for size in sae.cfg.prefixes() if arch == "matryoshka" else [sae.cfg.d_sae]:
        x_hat = x_hat + f[:, start:size] @ sae.W_dec[start:size]
        losses.append((x_hat - acts).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum())
        start = size
    loss = torch.stack(losses).mean()
    loss.backward()
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(out.x_hat, x_hat)
    assert out.l0 == pytest.approx(float((f != 0).sum()) / 40)
    for a, p in zip(sparse_grads, (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec), strict=True):
        torch.testing.assert_close(a, p.grad)
    torch.testing.assert_close(sparse_acts_grad, acts.grad)


@pytest.mark.parametrize("arch", ["topk", "abstopk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("aux_path", ["dense", "sparse"])
def test_auxk_from_shared_pre_activations_matches_the_dense_formula(
    arch: str, aux_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AuxK read from the main encoder's pre-activations (either backward product over the
    dead columns) gives the loss and every gradient of the textbook formula: the top k_aux ReLU
    pre-activations among dead latents, decoded without bias, against the detached residual."""
    from saeguard.sae import kernels

    monkeypatch.setattr(kernels, "DENSE_AUX_RATIO", 10**6 if aux_path == "dense" else 0)
    sae = _sae(arch, d=12, n=64, k=4).double()
    dead_mask = torch.zeros(64, dtype=torch.bool)
    dead_mask[torch.randperm(64, generator=torch.Generator().manual_seed(5))[:20]] = True
    acts = torch.randn(40, 12, dtype=torch.float64, requires_grad=True)
    out = sae.training_step(acts, dead_mask, 1.0)
    out.loss.backward()
    params = (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    fast_grads = [p.grad.clone() for p in params] + [acts.grad.clone()]
    sae.zero_grad()
    acts.grad = None
    no_aux = sae.training_step(acts, None, 1.0)
    pre = sae.pre_acts(acts)
    k_aux = sae.cfg.effective_k_aux
    masked = pre.masked_fill(~dead_mask, float("-inf"))
    top_vals, top = masked.topk(k_aux, -1)
    f_aux = torch.zeros_like(pre).scatter(-1, top, top_vals.relu())
    residual = (acts - no_aux.x_hat).detach()
    aux = (f_aux @ sae.W_dec - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
    loss = no_aux.loss + sae.cfg.aux_coef * aux
    loss.backward()
    torch.testing.assert_close(out.loss, loss)
    assert float(out.metrics["auxk"]) > 0
    for fast, slow in zip(fast_grads, [*[p.grad for p in params], acts.grad], strict=True):
        torch.testing.assert_close(fast, slow)


def test_width_mismatch_and_impossible_configs() -> None:
    sae = _sae("topk")
    with pytest.raises(SaeguardError, match="width 7 but this SAE reads d_in=8"):
        sae.encode(torch.randn(3, 7))
    with pytest.raises(ConfigError, match=r"--k \(40\) cannot exceed"):
        SAEConfig(architecture="topk", d_in=8, d_sae=32, k=40)
    with pytest.raises(ConfigError, match="d_sae must be positive"):
        SAEConfig(architecture="topk", d_in=8, d_sae=-8, k=4)


@pytest.mark.parametrize("arch", sorted(REQUIRED))
def test_folding_the_input_scale_is_exact(arch: str) -> None:
    sae = _sae(arch)
    if arch in ("batchtopk", "matryoshka"):
        sae.threshold.fill_(0.05)
    x = torch.randn(16, 8) * 7
    scale = 0.3
    with torch.no_grad():
        reference_f = sae.encode(x * scale)
        reference = sae(x * scale) / scale
        sae.fold_input_scale_(scale)
        torch.testing.assert_close(sae.encode(x), reference_f, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sae(x), reference, atol=1e-4, rtol=1e-4)


def test_older_saelens_topk_and_unsupported_sparsify(tmp_path: Path) -> None:
    torch.manual_seed(4)
    d, n = 6, 20
    tensors = {"W_enc": torch.randn(d, n), "b_enc": torch.zeros(n), "W_dec": torch.randn(n, d),
               "b_dec": torch.zeros(d)}  # fmt: skip
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": d, "d_sae": n, "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 4}, "hook_name": "blocks.1.hook_resid_post",
    }))  # fmt: skip
    sae, _ = load_sae(tmp_path)
    assert sae.architecture == "topk" and sae.cfg.k == 4
    assert ((sae.encode(torch.randn(5, d)) != 0).sum(-1) <= 4).all()
    sparsify = tmp_path / "groupmax"
    sparsify.mkdir()
    save_file({"encoder.weight": torch.randn(n, d), "encoder.bias": torch.zeros(n),
               "W_dec": torch.randn(n, d), "b_dec": torch.zeros(d)},
              str(sparsify / "sae.safetensors"))  # fmt: skip
    (sparsify / "cfg.json").write_text(json.dumps({"k": 4, "activation": "groupmax"}))
    with pytest.raises(SaeguardError, match="groupmax"):
        load_sae(sparsify)


def test_gradient_reaches_the_input_activations() -> None:
    sae = _sae("topk")
    x = torch.randn(10, 8, requires_grad=True)
    sae(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    x2 = x.detach().clone().requires_grad_()
    pre = (x2 - sae.b_dec) @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(3, -1)
    f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    (f @ sae.W_dec + sae.b_dec).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("n_tokens", [3, 300])  # direct projections / Gram-matrix updates
def test_matching_pursuit_matches_the_textbook_loop(n_tokens: int) -> None:
    """The fast MP (no-grad atom choice, Gram updates) equals SPEC §2's loop, atoms of any norm."""
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(architecture="mp", d_in=32, d_sae=128, k=6))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(128, 1) + 0.5)
    x = torch.randn(n_tokens, 32)
    residual, expected = x - sae.b_dec, torch.zeros(n_tokens, 128)
    w, rows = sae.W_dec.detach(), torch.arange(n_tokens)
    for _ in range(6):
        proj = residual @ w.t()
        j = (proj / w.norm(dim=-1)).argmax(-1)
        coef = proj[rows, j] / w[j].pow(2).sum(-1)
        expected[rows, j] += coef
        residual = residual - coef[:, None] * w[j]
    with torch.no_grad():
        assert torch.allclose(sae.encode(x), expected, atol=1e-5)
        assert torch.allclose(sae(x), x - residual, atol=1e-4)
    out = sae.training_step(x, None, 1.0)
    out.loss.backward()
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0
    assert out.l0 == pytest.approx(float((expected != 0).sum(-1).float().mean()))
