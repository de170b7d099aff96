"""Hook points: uniform names, correct tensors, and the early stop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from saeguard.errors import SaeguardError
from saeguard.models import UnknownHookError, capture_hooks, load_model, run_to_hooks

FAMILIES = ["llama", "gpt2", "gpt_neox", "gemma3_text"]


def _tokens(vocab: int, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(4, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_points_match_hidden_states(tiny_model_dirs: dict[str, Path], family: str) -> None:
    loaded = load_model(str(tiny_model_dirs[family]))
    assert loaded.family == family
    n = loaded.n_layers
    tokens = _tokens(loaded.model.config.vocab_size)
    points = [loaded.hook_point(h) for h in loaded.hook_names()]
    with torch.inference_mode():
        hidden = loaded.model(input_ids=tokens, output_hidden_states=True).hidden_states
        with capture_hooks(loaded.model, points, stop_early=False) as store:
            loaded.model.base_model(input_ids=tokens, use_cache=False)
    for layer in range(n):
        torch.testing.assert_close(store[f"resid_pre.{layer}"], hidden[layer])
        if layer < n - 1:  # the last hidden state has the final norm applied
            torch.testing.assert_close(store[f"resid_post.{layer}"], hidden[layer + 1])
            torch.testing.assert_close(
                store[f"resid_pre.{layer + 1}"], store[f"resid_post.{layer}"]
            )
        # Each block adds exactly its attention and MLP outputs to the residual stream.
        summed = (
            store[f"resid_pre.{layer}"] + store[f"attn_out.{layer}"] + store[f"mlp_out.{layer}"]
        )
        torch.testing.assert_close(store[f"resid_post.{layer}"], summed, atol=1e-5, rtol=1e-5)
        assert store[f"attn_out.{layer}"].shape == (2, 12, loaded.d_model)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_stops_after_deepest_hook(tiny_model_dirs: dict[str, Path], family: str) -> None:
    loaded = load_model(str(tiny_model_dirs[family]))
    blocks_run: list[int] = []
    from saeguard.models.hooks import decoder_blocks

    blocks = decoder_blocks(loaded.model)
    handles = [  # record every block that *starts* running
        b.register_forward_pre_hook(lambda *_a, i=i: blocks_run.append(i))
        for i, b in enumerate(blocks)
    ]
    head_calls: list[int] = []
    handles.append(
        loaded.model.get_output_embeddings().register_forward_hook(lambda *_a: head_calls.append(1))
    )
    try:
        tokens = _tokens(loaded.model.config.vocab_size)
        with torch.inference_mode():
            out = run_to_hooks(loaded.model, tokens, [loaded.hook_point("resid_post.1")])
            assert blocks_run == [0, 1]
            blocks_run.clear()
            run_to_hooks(loaded.model, tokens, [loaded.hook_point("mlp_out.2")])
            assert blocks_run == [0, 1, 2]
            blocks_run.clear()
            run_to_hooks(loaded.model, tokens, [loaded.hook_point("resid_pre.0")])
            assert blocks_run == [0]  # stopped at the entrance of block 0
    finally:
        for h in handles:
            h.remove()
    assert head_calls == []
    assert out["resid_post.1"].shape == (2, 12, loaded.d_model)


def test_unknown_hook_lists_valid_names(tiny_llama_dir: Path) -> None:
    loaded = load_model(str(tiny_llama_dir))
    for bad in ("resid_post.4", "resid_mid.1", "layer3", "resid_post.-1"):
        with pytest.raises(UnknownHookError) as info:
            loaded.hook_point(bad)
        message = str(info.value)
        assert bad in message
        assert "resid_pre.L, attn_out.L, mlp_out.L, resid_post.L for L in 0..3" in message


def test_unknown_model_names_embedded_choices() -> None:
    with pytest.raises(SaeguardError) as info:
        load_model("definitely-not-a-model-xyz")
    assert "smollm2-135m" in str(info.value) and "gemma3-270m" in str(info.value)


def test_hook_names_cover_every_layer(tiny_llama_dir: Path) -> None:
    loaded = load_model(str(tiny_llama_dir))
    names = loaded.hook_names()
    assert len(names) == 4 * loaded.n_layers
    assert names[:4] == ["resid_pre.0", "attn_out.0", "mlp_out.0", "resid_post.0"]
