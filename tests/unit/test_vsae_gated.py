"""The variational TopK SAE (vsae) and the Gated SAE: what each adds to the generic SAE tests of
test_sae.py (which cover both through ``REQUIRED``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saeguard.errors import ConfigError, SaeguardError
from saeguard.sae import create_sae, make_sae_config
from saeguard.sae.base import batch_share
from saeguard.sae.io import load_sae, save_sae
from saeguard.sae.vsae import NOISE_ROWS, kl_to_standard_normal

D, N = 8, 32


def _random(arch: str, seed: int = 0, **settings: object):
    """An SAE whose every parameter is random (biases and extras included)."""
    torch.manual_seed(seed)
    sae = create_sae(make_sae_config(arch, d_in=D, d_sae=N, k=3, **settings))
    with torch.no_grad():
        for name, parameter in sae.named_parameters():
            if name not in ("W_enc", "W_dec"):
                parameter.normal_(0, 0.3)
    return sae


# --- vsae ---------------------------------------------------------------------------------------
def test_vsae_encodes_the_top_k_of_its_mean_deterministically() -> None:
    sae = _random("vsae").eval()
    topk = create_sae(make_sae_config("topk", d_in=D, d_sae=N, k=3))
    topk.load_state_dict({k: v for k, v in sae.state_dict().items() if k in dict(
        topk.named_parameters())})  # fmt: skip
    x = torch.randn(20, D)
    with torch.no_grad():
        first, second = sae.encode(x), sae.encode(x)
        mu = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        values, indices = mu.topk(3, dim=-1)
        expected = torch.zeros_like(mu).scatter(-1, indices, values.relu())
        assert torch.equal(first, second)
        torch.testing.assert_close(first, expected)
        assert torch.equal(first, topk.encode(x)) and torch.equal(sae(x), topk(x))
    # Training samples: the same batch at two steps selects differently.
    out = [sae.training_step(x, None, 1.0) for _ in range(2)]
    assert torch.equal(out[0].x_hat, out[1].x_hat)  # same step: same noise
    sae.after_step_()
    assert not torch.equal(sae.training_step(x, None, 1.0).x_hat, out[0].x_hat)


def test_the_kl_term_is_zero_at_the_prior_and_grows_away_from_it() -> None:
    zeros = torch.zeros(4, N)
    assert torch.equal(kl_to_standard_normal(zeros, zeros), torch.zeros(4))
    previous = torch.zeros(4)
    for scale in (0.5, 1.0, 2.0):
        for mu, log_var in ((zeros + scale, zeros), (zeros, zeros + scale), (zeros, zeros - scale)):
            kl = kl_to_standard_normal(mu, log_var)
            assert bool((kl > 0).all())
        grown = kl_to_standard_normal(zeros + scale, zeros - scale)
        assert bool((grown > previous).all())
        previous = grown
    # In the loss: 0 for an encoder at the prior (mu = 0, log sigma^2 = 0), positive otherwise.
    sae = _random("vsae")
    x = torch.randn(16, D)
    assert float(sae.training_step(x, None, 1.0).metrics["kl"]) > 0
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_logvar", "b_logvar"):
            getattr(sae, name).zero_()
    assert float(sae.training_step(x, None, 1.0).metrics["kl"]) == 0.0


@pytest.mark.parametrize("with_dead", [False, True])
def test_vsae_training_step_matches_the_textbook_formula(with_dead: bool) -> None:
    """Loss and every gradient (the input's too) of the fused training encoder equal plain
    autograd on the definition: TopK of the sample, AuxK on the dead latents' sampled values,
    KL over all latents over the batch variance."""
    sae = _random("vsae", kl_weight=0.3).double()
    dead_mask = (torch.arange(N) % 3 == 0) if with_dead else None
    x = torch.randn(40, D, dtype=torch.float64, requires_grad=True)
    out = sae.training_step(x, dead_mask, 1.0)
    out.loss.backward()
    grads = [p.grad.clone() for p in sae.parameters()] + [x.grad.clone()]
    sae.zero_grad()
    x.grad = None
    mu, log_var = sae.posterior(x)
    z = mu + (0.5 * log_var).exp() * sae.noise(40, x.device).double()
    values, indices = z.topk(3, -1)
    x_hat = torch.zeros_like(z).scatter(-1, indices, values.relu()) @ sae.W_dec + sae.b_dec
    variance = (x - x.mean(0)).pow(2).sum()  # the MSE's is differentiated, the KL's is not
    loss = (x - x_hat).pow(2).sum() / variance
    loss = loss + 0.3 * kl_to_standard_normal(mu, log_var).sum() / variance.detach()
    if dead_mask is not None:
        top, chosen = z.masked_fill(~dead_mask, float("-inf")).topk(sae.cfg.effective_k_aux, -1)
        aux = torch.zeros_like(z).scatter(-1, chosen, top.relu()) @ sae.W_dec
        residual = (x - x_hat).detach()
        loss = loss + sae.cfg.aux_coef * (aux - residual).pow(2).sum() / (
            residual - residual.mean(0)).pow(2).sum()  # fmt: skip
    loss.backward()
    torch.testing.assert_close(out.loss, loss)
    assert (float(out.metrics["auxk"]) > 0) == with_dead
    for fast, slow in zip(grads, [*[p.grad for p in sae.parameters()], x.grad], strict=True):
        torch.testing.assert_close(fast, slow)


def test_vsae_without_kl_trains_like_topk(tmp_path: Path) -> None:
    """kl_weight = 0 leaves TopK's loss with a noisy selection: on sparse combinations of 24
    directions, trained side by side with a TopK SAE (one pass, the same batches), its held-out
    FVU falls as far as TopK's."""
    from saeguard.train import Trainer, TrainerConfig

    g = torch.Generator().manual_seed(1)
    directions = torch.nn.functional.normalize(torch.randn(24, D, generator=g), dim=-1)

    def batch(seed: int, size: int = 128) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        on = torch.rand(size, 24, generator=g) < 0.1
        return (on * (1 + torch.rand(size, 24, generator=g))) @ directions + 0.3

    saes = {arch: create_sae(make_sae_config(arch, d_in=D, d_sae=N, k=3, **settings))
            for arch, settings in (("vsae", {"kl_weight": 0.0}), ("topk", {}))}  # fmt: skip
    trainer = Trainer(saes, TrainerConfig(tokens=128 * 25, batch_tokens=128, buffer_tokens=256,
                                          checkpoint_every=0), tmp_path)  # fmt: skip
    trainer._initialise(batch(0))
    held_out = batch(999, 1024)

    def fvu(name: str) -> float:
        with torch.no_grad():
            error = (trainer.folded(name)(held_out) - held_out).pow(2).sum()
        return float(error / (held_out - held_out.mean(0)).pow(2).sum())

    before = fvu("vsae")
    trainer.fit([batch(i) for i in range(25)])
    after, topk = fvu("vsae"), fvu("topk")
    assert after < 0.6 * before, (before, after)
    assert after < topk + 0.1, (after, topk)


def test_vsae_noise_is_the_same_split_over_ranks_and_across_a_resume() -> None:
    sae = _random("vsae")
    sae.reset_parameters(torch.Generator().manual_seed(7))
    rows = NOISE_ROWS + 200  # the shares cross a block boundary
    whole = sae.noise(rows, torch.device("cpu"))
    assert whole.shape == (rows, N)
    for first, size in ((0, 300), (300, rows - 300), (NOISE_ROWS, 200)):
        with batch_share(lambda t: t, first_row=first):
            torch.testing.assert_close(sae.noise(size, torch.device("cpu")),
                                       whole[first : first + size], rtol=0, atol=0)  # fmt: skip
    state = sae.state_dict()  # as a checkpoint holds it
    sae.after_step_()
    later = sae.noise(rows, torch.device("cpu"))
    assert not torch.equal(later, whole)
    resumed = create_sae(make_sae_config("vsae", d_in=D, d_sae=N, k=3))
    resumed.load_state_dict(state)
    assert torch.equal(resumed.noise(rows, torch.device("cpu")), whole)
    resumed.after_step_()
    assert torch.equal(resumed.noise(rows, torch.device("cpu")), later)
    other = create_sae(make_sae_config("vsae", d_in=D, d_sae=N, k=3))
    other.reset_parameters(torch.Generator().manual_seed(8))  # another seed or SAE name
    assert not torch.equal(other.noise(rows, torch.device("cpu")), whole)


# --- gated -------------------------------------------------------------------------------------
def test_gated_latents_are_zero_exactly_where_the_gate_is_closed() -> None:
    sae = _random("gated")
    x = torch.randn(200, D)
    with torch.no_grad():
        f = sae.encode(x)
        gate = (x - sae.b_dec) @ sae.W_enc + sae.b_gate
        magnitude = (x - sae.b_dec) @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
    assert bool((f[gate <= 0] == 0).all())
    assert torch.equal(f != 0, (gate > 0) & (magnitude > 0))
    torch.testing.assert_close(f[gate > 0], magnitude.relu()[gate > 0])
    assert bool(((gate <= 0) & (magnitude > 0)).any())  # the gate did close some open magnitudes


def test_gated_magnitude_weights_share_the_gate_directions() -> None:
    sae = _random("gated")
    x = torch.randn(50, D)
    gate, magnitude = sae.paths(x)
    w_mag = sae.W_enc * sae.r_mag.exp()
    cosine = torch.nn.functional.cosine_similarity(w_mag, sae.W_enc, dim=0)
    torch.testing.assert_close(cosine, torch.ones(N))
    torch.testing.assert_close(magnitude, (x - sae.b_dec) @ w_mag + sae.b_mag)
    torch.testing.assert_close(gate, (x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    sae.training_step(x, None, 1.0).loss.backward()
    assert sae.r_mag.grad is not None and float(sae.r_mag.grad.abs().sum()) > 0


@pytest.mark.parametrize("decode", ["dense", "sparse"])
def test_gated_loss_and_its_frozen_decoder(decode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loss = |x - x_hat|^2 + lambda sum ReLU(pi_gate) |W_dec,i| + |x - x_hat_frozen|^2 (token
    means), with every gradient of that formula whichever way the latents are decoded; the
    auxiliary reconstruction sends no gradient into W_dec (b_dec gets one through the
    encoder's centring, as in the paper)."""
    from saeguard.sae import kernels

    monkeypatch.setattr(kernels, "SPARSE_DECODE_FRACTION", 0.0 if decode == "dense" else 1.0)
    sae = _random("gated", l1_coef=0.7).double()
    x = torch.randn(40, D, dtype=torch.float64, requires_grad=True)
    out = sae.training_step(x, None, 0.5)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    grads["x"] = x.grad.clone()
    sae.zero_grad()
    x.grad = None
    gate = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    magnitude = (x - sae.b_dec) @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
    f = magnitude.relu() * (gate > 0)
    x_hat = f @ sae.W_dec + sae.b_dec
    mse = (x - x_hat).pow(2).sum(-1).mean()
    l1 = (gate.relu() * sae.W_dec.norm(dim=-1)).sum(-1).mean()
    aux = (x - gate.relu() @ sae.W_dec.detach() - sae.b_dec.detach()).pow(2).sum(-1).mean()
    loss = mse + 0.7 * 0.5 * l1 + aux
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(out.x_hat, x_hat)
    loss.backward(retain_graph=True)
    for name, parameter in [*sae.named_parameters(), ("x", x)]:
        torch.testing.assert_close(grads[name], parameter.grad, msg=name)
    sae.zero_grad()
    (mse + 0.35 * l1).backward()
    torch.testing.assert_close(grads["W_dec"], sae.W_dec.grad)  # the auxiliary term adds nothing
    assert not torch.allclose(grads["W_enc"], sae.W_enc.grad)  # ...but does to the gate


def test_gated_saves_in_the_saelens_layout_and_reads_it(tmp_path: Path) -> None:
    sae = _random("gated")
    save_sae(sae, tmp_path, {"hook": "resid_post.3"})
    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert set(tensors) == {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"}
    assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == "gated"
    # SAELens's formula with the saved tensors, written without saeguard's block.
    x = torch.randn(30, D)
    centred = x - tensors["b_dec"]
    active = (centred @ tensors["W_enc"] + tensors["b_gate"]) > 0
    mags = torch.relu(centred @ (tensors["W_enc"] * tensors["r_mag"].exp()) + tensors["b_mag"])
    expected = (active * mags) @ tensors["W_dec"] + tensors["b_dec"]
    fixture = tmp_path / "saelens"
    fixture.mkdir()
    save_file(tensors, str(fixture / "sae_weights.safetensors"))
    (fixture / "cfg.json").write_text(json.dumps({
        "architecture": "gated", "d_in": D, "d_sae": N, "apply_b_dec_to_input": True,
        "normalize_activations": "none", "metadata": {"hook_name": "blocks.3.hook_resid_post"},
    }))  # fmt: skip
    for directory in (tmp_path, fixture):
        loaded, meta = load_sae(directory)
        assert loaded.architecture == "gated" and meta["hook"] == "resid_post.3"
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected)
        for name in ("r_mag", "b_mag"):
            assert torch.equal(getattr(loaded, name), getattr(sae, name))
    # A SAELens gated SAE whose encoder reads raw x: converted exactly.
    raw = {**tensors, "b_dec": torch.randn(D)}
    save_file(raw, str(fixture / "sae_weights.safetensors"))
    document = json.loads((fixture / "cfg.json").read_text())
    (fixture / "cfg.json").write_text(json.dumps({**document, "apply_b_dec_to_input": False}))
    active = (x @ raw["W_enc"] + raw["b_gate"]) > 0
    mags = torch.relu(x @ (raw["W_enc"] * raw["r_mag"].exp()) + raw["b_mag"])
    loaded, _ = load_sae(fixture)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), (active * mags) @ raw["W_dec"] + raw["b_dec"])


# --- both: save/load, tampering, settings -------------------------------------------------------
@pytest.mark.parametrize("arch", ["vsae", "gated"])
def test_round_trip_keeps_every_tensor_and_tampering_is_one_line(arch: str, tmp_path: Path) -> None:
    sae = _random(arch, kl_weight=0.25) if arch == "vsae" else _random(arch, l1_coef=2.0)
    save_sae(sae, tmp_path, {"hook": "resid_post.3"})
    loaded, _ = load_sae(tmp_path)
    assert loaded.cfg == sae.cfg
    for name, parameter in sae.named_parameters():
        assert torch.equal(getattr(loaded, name), parameter), name
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    setting = "kl_weight" if arch == "vsae" else "l1_coef"
    flag = setting.replace("_", "-")
    cfg["saeguard"]["sae_config"][setting] = -1.0
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    message = rf"cfg.json: --{flag} must be a finite number >= 0, got -1.0; re-save or re-train"
    with pytest.raises(SaeguardError, match=message) as error:
        load_sae(tmp_path)
    assert "\n" not in str(error.value)
    cfg["saeguard"]["sae_config"][setting] = 0.5
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))
    extra = "W_logvar" if arch == "vsae" else "r_mag"
    save_file({k: v for k, v in tensors.items() if k != extra},
              str(tmp_path / "sae_weights.safetensors"))  # fmt: skip
    with pytest.raises(SaeguardError, match=f"SAE weights lack the tensor '{extra}'"):
        load_sae(tmp_path)
    save_file({**tensors, extra: tensors[extra][..., :-1].contiguous()},
              str(tmp_path / "sae_weights.safetensors"))  # fmt: skip
    with pytest.raises(SaeguardError, match=f"SAE tensor {extra} has shape"):
        load_sae(tmp_path)


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf")])
def test_bad_coefficients_are_refused_with_their_flag(value: float) -> None:
    with pytest.raises(ConfigError, match="--kl-weight must be a finite number >= 0"):
        make_sae_config("vsae", d_in=D, d_sae=N, kl_weight=value)
    with pytest.raises(ConfigError, match="--l1-coef must be a finite number >= 0"):
        make_sae_config("gated", d_in=D, d_sae=N, l1_coef=value)
