"""The one timing rule every benchmark script uses: a warm-up call, then the median of repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(step: Callable[[], object], repeats: int) -> float:
    """Median wall-clock seconds of ``step`` over ``repeats`` calls, after one warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
