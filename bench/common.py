"""What the benchmark scripts share."""

import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

AS_OF = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
"""The fixed instant every benchmark's data ends at and its runs are computed for."""
REDIS_URL = "redis://127.0.0.1:6379/15"
"""The local Redis, database 15: benchmark keys never meet the dev loop's."""


def timed(function: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median wall time in ms over `repeat` calls (after one warm-up call), and the last result."""
    result = function()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = function()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples), result
