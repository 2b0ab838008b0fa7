"""What the benchmark scripts share."""

import statistics
import time
from collections.abc import Callable
from typing import Any


def timed(function: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median wall time in ms over `repeat` calls (after one warm-up call), and the last result."""
    result = function()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = function()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples), result
