"""Shuffled batches from a cache or straight from the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from saeguard.activations import (
    ActivationSourceConfig,
    CachedActivationSource,
    ModelActivationSource,
    ShuffleBuffer,
)
from saeguard.errors import ConfigError
from saeguard.jobs.harvest import HarvestConfig, harvest


def _rows(n: int, d: int = 3) -> list[torch.Tensor]:
    data = torch.arange(n * d, dtype=torch.float32).reshape(n, d)
    return list(data.split(7))


def test_buffer_yields_every_row_once_shuffled() -> None:
    chunks = _rows(100)
    batches = list(ShuffleBuffer(chunks, batch_size=8, buffer_tokens=32, seed=0, drop_last=False))
    out = torch.cat(batches)
    assert sorted(out[:, 0].tolist()) == sorted(torch.cat(chunks)[:, 0].tolist())
    assert out[:, 0].tolist() != torch.cat(chunks)[:, 0].tolist()  # order changed
    assert all(len(b) == 8 for b in batches[:-1])
    again = torch.cat(list(ShuffleBuffer(chunks, 8, 32, seed=0, drop_last=False)))
    assert torch.equal(out, again)
    other = torch.cat(list(ShuffleBuffer(chunks, 8, 32, seed=1, drop_last=False)))
    assert not torch.equal(out, other)


def test_buffer_drop_last_and_validation() -> None:
    batches = list(ShuffleBuffer(_rows(100), batch_size=8, buffer_tokens=32))
    assert len(batches) == 12 and all(len(b) == 8 for b in batches)
    with pytest.raises(ConfigError, match="at least two batches"):
        ShuffleBuffer(_rows(10), batch_size=8, buffer_tokens=8)
    with pytest.raises(ConfigError, match=r"\[n, d\]"):
        list(ShuffleBuffer([torch.zeros(4, 2, 2)], batch_size=2, buffer_tokens=4))


def test_model_source_streams_the_same_activations_as_the_cache(
    tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path
) -> None:
    common = {
        "model": str(tiny_llama_dir),
        "hooks": ["resid_post.2"],
        "corpus": str(text_corpus),
        "split": "all",
        "ctx_len": 16,
        "batch_size": 4,
        "calibration_contexts": 4,
        "repeat": False,
    }
    cache = harvest(HarvestConfig(**common, out=str(tmp_path / "c"), tokens=300, shard_tokens=64))
    from_cache = torch.cat(list(CachedActivationSource(cache.directory)))
    live = ModelActivationSource(ActivationSourceConfig(**common))
    from_model = torch.cat(list(live))[:300]
    torch.testing.assert_close(from_model, from_cache)
    assert (
        live.describe()["exclusions"]["median_norms"]
        == cache.manifest["exclusions"]["median_norms"]
    )
    # Each iteration starts over (a second epoch sees the same stream, not an exhausted one).
    torch.testing.assert_close(torch.cat(list(live))[:300], from_cache)
    batches = list(ShuffleBuffer(CachedActivationSource(cache.directory), 32, 128))
    assert len(batches) == 300 // 32 and batches[0].shape == (32, live.d_model)
