"""The benchmarks' one timer: the minimum wall time of ``repeat`` calls after one warm-up call."""

from __future__ import annotations

import time


def best_of(fn, repeat: int) -> float:
    """Seconds of the fastest of ``repeat`` calls of ``fn()``, after one untimed warm-up (thread pool, allocator).

    Example:
        >>> best_of(lambda: None, 3) >= 0.0
        True
    """
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
