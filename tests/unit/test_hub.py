"""``hf:ORG/REPO[:PATH]`` SAEs, read offline from a fake Hugging Face cache built in the test."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from saeguard.errors import SaeguardError
from saeguard.sae.hub import parse_hub_sae, resolve_sae_dir
from saeguard.sae.io import load_sae

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _snapshot(cache: Path, repo: str) -> Path:
    """The snapshot folder of ``repo`` in a Hub cache laid out as huggingface_hub lays it out."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    return snapshot


def _saelens_sae(directory: Path, layer: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    d, n = 6, 20
    tensors = {"W_enc": torch.randn(d, n), "b_enc": torch.randn(n) * 0.1,
               "W_dec": torch.randn(n, d), "b_dec": torch.randn(d)}  # fmt: skip
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "sae_weights.safetensors"))
    (directory / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": d, "d_sae": n, "apply_b_dec_to_input": True,
        "normalize_activations": "none", "hook_name": f"blocks.{layer}.hook_resid_post",
        "model_name": "gpt2",
    }))  # fmt: skip
    return tensors


@pytest.fixture()
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """A SAELens-layout repo with one SAE per hook (layers 1 and 2) and a sparsify-layout repo,
    in a Hub cache the tests read offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    lens = _snapshot(cache, "org/saelens-repo")
    weights = {layer: _saelens_sae(lens / f"blocks.{layer}.hook_resid_post", layer, layer)
               for layer in (1, 2)}  # fmt: skip
    sparse = _snapshot(cache, "org/sparsify-repo") / "layers.2"
    sparse.mkdir()
    torch.manual_seed(3)
    enc_w, enc_b = torch.randn(24, 6), torch.randn(24) * 0.1
    save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": torch.randn(24, 6),
               "b_dec": torch.randn(6)}, str(sparse / "sae.safetensors"))  # fmt: skip
    (sparse / "cfg.json").write_text(json.dumps({"k": 3, "d_in": 6, "num_latents": 0}))
    return {"weights": weights, "encoder": enc_w}


def test_hub_saes_load_offline_from_the_cache(hub_cache: dict[str, object]) -> None:
    weights = hub_cache["weights"]
    assert isinstance(weights, dict)
    for layer in (1, 2):
        sae, meta = load_sae(f"hf:org/saelens-repo:blocks.{layer}.hook_resid_post")
        assert meta["format"] == "saelens" and meta["hook"] == f"resid_post.{layer}"
        assert torch.equal(sae.W_enc.detach(), weights[layer]["W_enc"])  # the hook asked for
    sae, meta = load_sae("hf:org/sparsify-repo:layers.2")
    assert meta["format"] == "sparsify" and sae.cfg.k == 3 and sae.cfg.d_sae == 24
    assert meta["hook"] == "resid_post.2"  # sparsify's hookpoint (folder) in saeguard's names
    assert torch.equal(sae.W_enc.detach(), hub_cache["encoder"].t())  # type: ignore[union-attr]
    with pytest.raises(SaeguardError, match="no folder 'blocks.9.*SAEs in this repo: blocks.1"):
        resolve_sae_dir("hf:org/saelens-repo:blocks.9.hook_resid_post")


def test_an_uncached_hub_sae_fails_fast_offline_with_the_fix(
    hub_cache: dict[str, object],
) -> None:
    start = time.perf_counter()
    with pytest.raises(SaeguardError, match="not in the local Hugging Face cache.*hf download"):
        load_sae("hf:org/never-downloaded:layer.0")
    assert time.perf_counter() - start < 2.0


def test_malformed_hub_names_are_one_clear_line() -> None:
    assert parse_hub_sae("hf:org/repo") == ("org/repo", "")
    assert parse_hub_sae("hf:org/repo:a/b") == ("org/repo", "a/b")
    for bad in ("hf:repo-without-org", "hf:org/repo:../escape", "hf:org/repo:/abs", "hf:"):
        with pytest.raises(SaeguardError, match="hf:"):
            parse_hub_sae(bad)
    assert resolve_sae_dir("runs/x") == Path("runs/x")  # local paths pass through


def test_a_hub_sae_is_never_written_into_the_cache(hub_cache: dict[str, object]) -> None:
    """`saeguard eval` writes next to a local SAE by default; a Hub SAE's folder is the cache's,
    so its eval needs --out (asked before anything loads)."""
    from saeguard.errors import ConfigError
    from saeguard.jobs.eval import EvalConfig, run_eval

    with pytest.raises(ConfigError, match="pass --out"):
        run_eval("hf:org/saelens-repo:blocks.1.hook_resid_post", EvalConfig())


def test_sparsify_hookpoints_map_onto_saeguard_hooks() -> None:
    from saeguard.sae.io import from_sparsify_hookpoint

    assert from_sparsify_hookpoint("layers.5") == "resid_post.5"
    assert from_sparsify_hookpoint("model.layers.12.mlp") == "mlp_out.12"
    assert from_sparsify_hookpoint("layers.3.self_attn") == "attn_out.3"
    assert from_sparsify_hookpoint("transformer.h.7") == "resid_post.7"
    assert from_sparsify_hookpoint("embed_tokens") == "embed_tokens"  # unknown: kept as is


def test_a_hub_sae_is_checked_against_the_model(
    hub_cache: dict[str, object], tiny_llama_dir: Path, text_corpus: Path
) -> None:
    """The Hub SAEs of the fixture read 6-d activations; the tiny llama's residual is 32-d:
    one line names both widths and the fix, before any evaluation."""
    from saeguard.activations.subject import load_subject
    from saeguard.errors import ConfigError

    with pytest.raises(ConfigError, match="reads 6-d activations.*d_model 32.*--model"):
        load_subject("hf:org/sparsify-repo:layers.2", model=str(tiny_llama_dir),
                     corpus=str(text_corpus))  # fmt: skip
