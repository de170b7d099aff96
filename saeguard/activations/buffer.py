"""Shuffled training batches from any stream of activation chunks.

Consecutive activations are strongly correlated (same context, same document), so training on
them in order hurts SAEs. :class:`ShuffleBuffer` keeps a large pool, shuffles it, hands out half of
it as batches and refills from the stream, the usual mixing scheme of SAE trainers. It accepts any
iterable of ``[n, d]`` tensors: a cache (:class:`CachedActivationSource`) or a live model
(:class:`~saeguard.activations.source.ModelActivationSource`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from saeguard.activations.cache import ActivationCache
from saeguard.distributed import World
from saeguard.errors import ConfigError

log = logging.getLogger(__name__)


class CachedActivationSource:
    """Streams one hook's activations shard by shard from an activation cache."""

    def __init__(
        self,
        directory: str | Path,
        hook: str | None = None,
        verify: bool = True,
        cycle: bool = False,
    ) -> None:
        self.cache = ActivationCache.open(directory)
        self.hook = hook or self.cache.hooks[0]
        self.cache.d_model(self.hook)  # unknown hook -> clear error now
        self.verify = verify
        self.cycle = cycle

    @property
    def d_model(self) -> int:
        return self.cache.d_model(self.hook)

    def __len__(self) -> int:
        return self.cache.n_tokens(self.hook)

    def __iter__(self) -> Iterator[torch.Tensor]:
        """One pass over the shards, or endless passes with ``cycle`` (each pass logged)."""
        for acts in self.chunks():
            assert acts is not None
            yield acts

    def chunks(self, world: World | None = None) -> Iterator[torch.Tensor | None]:
        """Each shard's activations in order; with a ``world``, None for the shards other ranks
        read (the ``i``-th shard read, passes included, is rank ``i % size``'s)."""
        entries = [e for e in self.cache.shards if int(e["counts"].get(self.hook, 0)) > 0]
        index = 0
        for passes in itertools.count():
            if passes:
                if not self.cycle:
                    return
                log.warning("activation cache exhausted: starting pass %d over it", passes + 1)
            for entry in entries:
                if world is None or world.owns(index):
                    verify = self.verify and passes == 0
                    yield self.cache.shard_activations(entry, self.hook, verify=verify)
                else:
                    yield None
                index += 1


class ShuffleBuffer:
    """Yield shuffled ``[batch_size, d]`` batches from a stream of ``[n, d]`` chunks.

    Deterministic for a given seed and stream. The final partial batch is dropped unless
    ``drop_last`` is False.
    """

    def __init__(
        self,
        source: Iterable[torch.Tensor],
        batch_size: int,
        buffer_tokens: int = 262_144,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size must be positive, got {batch_size}")
        if buffer_tokens < 2 * batch_size:
            raise ConfigError(
                f"the shuffle buffer ({buffer_tokens} tokens) must hold at least two batches "
                f"({2 * batch_size} tokens)"
            )
        self.source = source
        self.batch_size = batch_size
        self.buffer_tokens = buffer_tokens
        self.seed = seed
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        yielded = 0
        pool: list[torch.Tensor] = []
        pooled = 0
        chunks = iter(self.source)
        exhausted = False
        while True:
            while not exhausted and pooled < self.buffer_tokens:
                chunk = next(chunks, None)
                if chunk is None:
                    exhausted = True
                    break
                if chunk.ndim != 2:
                    raise ConfigError(f"activation chunks must be [n, d], got {tuple(chunk.shape)}")
                pool.append(chunk)
                pooled += len(chunk)
            if not pool:
                return
            data = torch.cat(pool)
            data = data[torch.randperm(len(data), generator=generator)]
            # Hand out half the pool (all of it once the stream is done), keep the rest mixed in.
            hand_out = len(data) if exhausted else max(self.batch_size, len(data) // 2)
            hand_out -= hand_out % self.batch_size if not exhausted else 0
            for start in range(0, hand_out - self.batch_size + 1, self.batch_size):
                yielded += 1
                yield data[start : start + self.batch_size]
            tail_start = (hand_out // self.batch_size) * self.batch_size
            if exhausted:
                if not self.drop_last and tail_start < len(data):
                    yield data[tail_start:]
                elif yielded == 0:
                    log.warning(
                        "the source held %d activations, fewer than one batch of %d: no batch",
                        len(data),
                        self.batch_size,
                    )
                return
            rest = data[tail_start:]
            pool, pooled = ([rest], len(rest)) if len(rest) else ([], 0)
