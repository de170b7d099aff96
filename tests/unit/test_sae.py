"""SAE architectures: shapes, save/load, foreign formats, sparse kernels and input checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from saeguard.errors import ConfigError, SaeguardError
from saeguard.ood.scores import sparse_codes
from saeguard.sae import (
    ARCHITECTURES,
    SAEConfig,
    SparseAutoencoder,
    StepOutput,
    architecture_options,
    config_class,
    create_sae,
    make_sae_config,
    register,
    sae_config_from_dict,
)
from saeguard.sae.base import dense_step_stats, normalized_mse
from saeguard.sae.io import load_sae, save_sae
from saeguard.sae.kernels import batch_topk_select, sparse_decode, sparse_topk_encode

REQUIRED = {"relu", "topk", "batchtopk", "jumprelu", "abstopk", "matryoshka", "mp", "vsae",
            "gated"}  # fmt: skip
EXTRA_PARAMETERS = ("r_mag", "b_mag", "W_logvar", "b_logvar")
"""Parameters beyond the four standard ones that start at constants: randomised in the tests."""


def _sae(arch: str, d: int = 8, n: int = 32, k: int = 3):
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(architecture=arch, d_in=d, d_sae=n, k=k))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        for name, parameter in sae.named_parameters():
            if name in EXTRA_PARAMETERS:
                parameter.normal_(0, 0.1)
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
    if arch in ("topk", "abstopk", "mp", "vsae"):
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


# What ``SAEConfig.to_dict()`` wrote before the per-architecture config classes: every
# architecture's settings, flat (here each at a value other than its default).
OLD_FLAT_SAE_CONFIG = {
    "architecture": "topk", "d_in": 8, "d_sae": 32, "k": 3, "k_aux": 5, "aux_coef": 0.25,
    "dead_tokens": 1000, "l1_coef": 0.5, "jumprelu_bandwidth": 0.2,
    "jumprelu_init_threshold": 0.3, "l0_target": 7.0, "matryoshka_prefixes": [4, 16],
    "threshold_momentum": 0.5,
}  # fmt: skip
OWN_SETTINGS = {
    "topk": {},
    "batchtopk": {"threshold_momentum": 0.5},
    "matryoshka": {"threshold_momentum": 0.5, "matryoshka_prefixes": [4, 16]},
    "jumprelu": {"jumprelu_bandwidth": 0.2, "jumprelu_init_threshold": 0.3, "l0_target": 7.0},
}


@pytest.mark.parametrize("arch", sorted(OWN_SETTINGS))
def test_old_flat_saved_configs_stay_readable(arch: str, tmp_path: Path) -> None:
    """An SAE saved when cfg.json held every architecture's settings loads with its own config
    class, its own settings' values, and the same weights."""
    values = {**OLD_FLAT_SAE_CONFIG, "architecture": arch}
    shared = {k: values[k] for k in ("d_in", "d_sae", "k", "k_aux", "aux_coef", "dead_tokens",
                                     "l1_coef")}  # fmt: skip
    sae = create_sae(make_sae_config(arch, **shared, **OWN_SETTINGS[arch]))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        if arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.05)
    save_sae(sae, tmp_path, {"hook": "resid_post.3"})
    document = json.loads((tmp_path / "cfg.json").read_text())
    assert set(document["saeguard"]["sae_config"]) == {"architecture", *shared,
                                                       *OWN_SETTINGS[arch]}  # fmt: skip
    document["saeguard"]["sae_config"] = values
    (tmp_path / "cfg.json").write_text(json.dumps(document))
    loaded, _ = load_sae(tmp_path)
    assert type(loaded.cfg) is config_class(arch) is type(sae.cfg)
    assert loaded.cfg == sae.cfg
    assert loaded.cfg.to_dict() == {"architecture": arch, **shared, **OWN_SETTINGS[arch]}
    assert sae_config_from_dict(values) == sae.cfg
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae, name), getattr(loaded, name)), name
    for name, tensor in sae.extra_tensors().items():
        torch.testing.assert_close(tensor, loaded.extra_tensors()[name])
    x = torch.randn(16, 8)
    with torch.no_grad():
        assert torch.equal(sae(x), loaded(x))


def test_configs_are_built_per_architecture() -> None:
    assert config_class("topk") is SAEConfig
    assert {f.name for f in dataclasses.fields(config_class("matryoshka"))} >= {
        "threshold_momentum", "matryoshka_prefixes"}  # fmt: skip
    with pytest.raises(SaeguardError, match="unknown SAE architecture 'nope'.*topk"):
        config_class("nope")
    with pytest.raises(ConfigError, match="'topk' has no setting l0_target"):
        make_sae_config("topk", d_in=8, d_sae=32, l0_target=4.0)
    cfg = make_sae_config("topk", strict=False, d_in=8, d_sae=32, l0_target=4.0)
    assert type(cfg) is SAEConfig and not hasattr(cfg, "l0_target")
    assert make_sae_config("jumprelu", strict=False, d_in=8, d_sae=32, l0_target=4.0).l0_target == 4
    with pytest.raises(ConfigError, match="matryoshka prefix 40"):
        make_sae_config("matryoshka", d_in=8, d_sae=32, matryoshka_prefixes=[40])
    # A plain SAEConfig still builds any architecture, whose own settings take their defaults.
    sae = create_sae(SAEConfig(architecture="jumprelu", d_in=8, d_sae=32))
    assert sae.cfg == make_sae_config("jumprelu", d_in=8, d_sae=32)
    options = architecture_options()
    assert {n: o.architectures for n, o in options.items()} == {
        "jumprelu_bandwidth": ["jumprelu"], "jumprelu_init_threshold": ["jumprelu"],
        "l0_target": ["jumprelu"], "matryoshka_prefixes": ["matryoshka"],
        "threshold_momentum": ["batchtopk", "matryoshka"], "kl_weight": ["vsae"],
    }  # fmt: skip
    assert options["matryoshka_prefixes"].hint == list[int]
    assert options["threshold_momentum"].field.default == 0.9
    assert options["l0_target"].doc.startswith("JumpReLU: if > 0, penalise")


@pytest.mark.parametrize("arch", sorted(REQUIRED))
def test_saelens_names_written_and_read_back(arch: str, tmp_path: Path) -> None:
    """cfg.json's SAELens fields come from each architecture's registration."""
    expected = {
        "relu": ("standard", "relu", {}), "topk": ("topk", "topk", {"k": 3}),
        "abstopk": ("abstopk", "abstopk", {"k": 3}), "batchtopk": ("jumprelu", "relu", {}),
        "matryoshka": ("jumprelu", "relu", {}), "jumprelu": ("jumprelu", "relu", {}),
        "mp": ("mp", "relu", {}), "vsae": ("vsae", "topk", {"k": 3}),
        "gated": ("gated", "relu", {}),
    }  # fmt: skip
    save_sae(_sae(arch), tmp_path, {})
    document = json.loads((tmp_path / "cfg.json").read_text())
    written = (document["architecture"], document["activation_fn_str"],
               document["activation_fn_kwargs"])  # fmt: skip
    assert written == expected[arch]
    del document["saeguard"]  # as SAELens wrote it: read by its SAELens name
    (tmp_path / "cfg.json").write_text(json.dumps(document))
    loaded, meta = load_sae(tmp_path)
    batch_topk_like = arch in ("batchtopk", "matryoshka")
    assert meta["format"] == "saelens"
    assert loaded.architecture == ("jumprelu" if batch_topk_like else arch)


@pytest.mark.parametrize("arch", sorted(REQUIRED))
def test_sparse_codes_equal_the_dense_latents(arch: str) -> None:
    """Every architecture's ``sparse_codes`` holds exactly the non-zero latents of ``encode``;
    L0 is theirs, except TopK's, counted before the top-k cut (positive pre-activations)."""
    sae = _sae(arch, n=48, k=5)
    if arch in ("batchtopk", "matryoshka"):
        sae.threshold.fill_(0.05)
    x = torch.randn(64, 8)
    x[:32] *= 0.6  # with this b_enc, these tokens have fewer than k positive pre-activations
    x[32:] *= 3
    x += sae.b_dec.detach()
    with torch.no_grad():
        sae.b_enc.copy_(-sae.W_enc.norm(dim=0))
        dense = sae.encode(x)
        codes = sparse_codes(sae, x)
        topk_like = arch in ("topk", "vsae")
        l0 = (sae.pre_acts(x) > 0).sum(-1) if topk_like else (dense != 0).sum(-1)
    assert torch.equal(codes.l0, l0)
    for row in range(len(x)):
        kept = codes.values[row] != 0
        pairs = dict(zip(codes.indices[row][kept].tolist(), codes.values[row][kept].tolist(),
                         strict=True))  # fmt: skip
        nonzero = dense[row].nonzero().squeeze(-1)
        assert set(pairs) == set(nonzero.tolist()), row
        assert len(pairs) == int(kept.sum()), row  # no latent twice
        for index, value in pairs.items():
            assert value == pytest.approx(float(dense[row, index]), rel=1e-5, abs=1e-6)


def test_an_architecture_is_one_class_and_one_register(tmp_path: Path) -> None:
    """A toy architecture with a setting of its own, defined here with one ``@register``, is
    built, trained by the Trainer, saved, loaded and offered as an architecture option."""
    from saeguard.train import Trainer, TrainerConfig

    @dataclasses.dataclass(kw_only=True)
    class ToyConfig(SAEConfig):
        toy_gain: float = 1.0
        """Factor on the toy's ReLU latents."""

    @register("toy", config=ToyConfig, k_bounds_l0=True)
    class ToySAE(SparseAutoencoder):
        cfg: ToyConfig

        def encode_flat(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.pre_acts(x)) * self.cfg.toy_gain

        def training_step(
            self, x: torch.Tensor, dead_mask: torch.Tensor | None, sparsity_scale: float
        ) -> StepOutput:
            f = self.encode_flat(x)
            x_hat = f @ self.W_dec + self.b_dec
            mse = normalized_mse(x, x_hat)
            fired, l0 = dense_step_stats(f)
            return StepOutput(mse, x_hat, fired, l0, {"mse": mse.detach()})

    try:
        assert config_class("toy") is ToyConfig
        with pytest.raises(ConfigError, match=r"--k \(40\) cannot exceed"):
            SAEConfig(architecture="toy", d_in=8, d_sae=32, k=40)
        option = architecture_options()["toy_gain"]
        assert option.architectures == ["toy"] and option.hint is float
        assert option.doc == "Factor on the toy's ReLU latents." and option.field.default == 1.0
        sae = create_sae(make_sae_config("toy", d_in=8, d_sae=32, k=4, toy_gain=0.5))
        assert isinstance(sae, ToySAE) and sae.cfg.toy_gain == 0.5
        torch.manual_seed(0)
        batches = [torch.randn(64, 8) + 0.5 for _ in range(6)]
        settings = TrainerConfig(tokens=64 * 6, batch_tokens=64, buffer_tokens=128, lr=3e-3,
                                 checkpoint_every=3, lr_warmup_steps=1)  # fmt: skip
        trainer = Trainer({"toy": sae}, settings, tmp_path)
        initial = sae.W_enc.detach().clone()
        trainer.fit(batches)
        assert trainer.step == 6 and not torch.equal(sae.W_enc, initial)
        assert "mse" in trainer.history["toy"]
        loaded, _ = load_sae(tmp_path)
        assert isinstance(loaded, ToySAE) and loaded.cfg == ToyConfig(
            architecture="toy", d_in=8, d_sae=32, k=4, toy_gain=0.5)  # fmt: skip
        assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == "toy"
        x = torch.randn(10, 8)
        with torch.no_grad():
            assert torch.equal(loaded(x), trainer.folded("toy")(x))
        codes = sparse_codes(loaded, x)  # the dense default
        assert torch.equal(codes.l0, (loaded.encode(x) != 0).sum(-1))
        # The command line knows it too: --arch toy and its own setting, from the registry.
        from saeguard.cli import build_parser
        from saeguard.configs import config_from_args
        from saeguard.jobs.train import TrainJobConfig

        args = build_parser().parse_args(["train", "--out", "o", "--arch", "toy", "--toy-gain",
                                          "0.25", "--k", "4", "--expansion", "4"])  # fmt: skip
        job = config_from_args(TrainJobConfig, args)
        assert job.sae_configs(d_in=8)["toy_k4_x4"] == ToyConfig(
            architecture="toy", d_in=8, d_sae=32, k=4, toy_gain=0.25)  # fmt: skip
    finally:
        ARCHITECTURES.pop("toy", None)
    assert "toy_gain" not in architecture_options()
