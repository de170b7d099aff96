"""The one timing rule every benchmark script uses (a warm-up call, then the median of repeats),
and the one SAE training step the throughput benchmarks time."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from saeguard.devices import autocast_device_type
from saeguard.train.optim import SaeOptimizer, default_lr


def timed(step: Callable[[], object], repeats: int) -> float:
    """Median wall-clock seconds of ``step`` over ``repeats`` calls, after one warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sae_train_step(
    sae: Any, x: torch.Tensor, optimizer: str = "signsgd", schedule_free: bool = True
) -> Callable[[bool], torch.Tensor]:
    """A closure running one whole training step of ``sae`` on ``x`` (forward, backward, the
    optimiser, decoder renormalisation), as the trainer does; its argument turns on bfloat16
    autocast. The default optimiser is saeguard's (sign-SGD, schedule-free)."""
    lr = default_lr(optimizer, sae.cfg.d_sae)
    opt = SaeOptimizer(sae, optimizer, lr, schedule_free)  # type: ignore[arg-type]
    kind = autocast_device_type(x.device)

    def step(autocast: bool = False) -> torch.Tensor:
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=autocast):
            out = sae.training_step(x, None, 1.0)
        opt.zero_grad()
        out.loss.backward()
        sae.remove_parallel_decoder_grad_()
        opt.step(lr)
        sae.normalize_decoder_()
        return out.loss.detach()

    return step
