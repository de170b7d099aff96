"""Micro-batching: concurrent requests' texts go through the model together.

Each request puts its texts on one queue and awaits a future; a single loop takes the first
waiting request, lets others join it for up to ``max_wait_ms`` (or until ``max_batch_texts``),
and scores them in one call on a worker thread, so one model serves every request without two
forward passes competing for the cores. The queue is bounded in texts: a request that would
overflow it is refused at once (the app answers 503 with Retry-After) instead of waiting
unboundedly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from saeguard.ood.explain import TextScore
from saeguard.serve.settings import ServiceLimits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreOptions:
    """What a request asks of the monitor; requests are batched with others asking the same."""

    explain: bool = True
    explain_all: bool = False
    tokens: bool = False
    with_lm: bool | None = None


ScoreFunction = Callable[[list[str | bytes], ScoreOptions], list[TextScore]]
"""Scores a batch of texts (blocking; runs on the batcher's worker thread)."""


class QueueFullError(Exception):
    """The queue holds too many texts to take this request now."""


@dataclass
class _Pending:
    texts: list[str | bytes]
    options: ScoreOptions
    future: asyncio.Future[list[TextScore]]
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class BatchObserver:
    """Hooks the app's metrics attach to (every one optional)."""

    on_batch: Callable[[int, float], None] = lambda texts, seconds: None
    """A batch of ``texts`` texts was scored in ``seconds``."""
    on_queue: Callable[[int], None] = lambda texts: None
    """The number of texts waiting changed."""
    on_wait: Callable[[float], None] = lambda seconds: None
    """A request waited ``seconds`` in the queue before its batch started."""


class MicroBatcher:
    """The queue and the loop that empties it (start it inside the running event loop)."""

    def __init__(
        self,
        score: ScoreFunction,
        limits: ServiceLimits,
        observer: BatchObserver | None = None,
    ) -> None:
        self._score = score
        self._limits = limits
        self._observer = observer or BatchObserver()
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task[None] | None = None
        self.queued_texts = 0
        """Texts waiting for the model (not counting the batch being scored)."""
        self.busy = False
        """Whether a batch is being scored now."""

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def submit(self, texts: Sequence[str | bytes], options: ScoreOptions) -> list[TextScore]:
        """Queue ``texts`` and wait for their results (raises :class:`QueueFullError`)."""
        if self._queue is None or self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running")
        if self.queued_texts + len(texts) > self._limits.max_queue_texts:
            raise QueueFullError(
                f"{self.queued_texts} texts are waiting (limit {self._limits.max_queue_texts})"
            )
        pending = _Pending(list(texts), options, asyncio.get_running_loop().create_future())
        self.queued_texts += len(texts)
        self._observer.on_queue(self.queued_texts)
        self._queue.put_nowait(pending)
        return await pending.future

    async def stop(self) -> None:
        """Finish every queued request, then end the loop."""
        if self._queue is None or self._task is None:
            return
        while (self.queued_texts or self.busy) and not self._task.done():
            await asyncio.sleep(0.01)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            batch, n_texts = [first], len(first.texts)
            deadline = loop.time() + self._limits.max_wait_ms / 1000
            while n_texts < self._limits.max_batch_texts:
                if self._queue.empty():
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(self._queue.get(), left)
                    except TimeoutError:
                        break
                else:
                    nxt = self._queue.get_nowait()
                batch.append(nxt)
                n_texts += len(nxt.texts)
            self.queued_texts -= n_texts
            self._observer.on_queue(self.queued_texts)
            started = time.perf_counter()
            for pending in batch:
                self._observer.on_wait(started - pending.queued_at)
            self.busy = True
            try:
                await self._score_batch(batch)
            finally:
                self.busy = False
            self._observer.on_batch(n_texts, time.perf_counter() - started)

    async def _score_batch(self, batch: list[_Pending]) -> None:
        """One scoring call per distinct set of options, in arrival order."""
        groups: dict[ScoreOptions, list[_Pending]] = {}
        for pending in batch:
            groups.setdefault(pending.options, []).append(pending)
        for options, members in groups.items():
            texts = [t for p in members for t in p.texts]
            try:
                results: Any = await asyncio.to_thread(self._score, texts, options)
            except Exception as exc:  # every waiting request learns of it; the loop goes on
                log.exception("scoring a batch of %d texts failed", len(texts))
                for p in members:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            start = 0
            for p in members:
                part = results[start : start + len(p.texts)]
                start += len(p.texts)
                if not p.future.done():  # the client may have gone away
                    p.future.set_result(part)
