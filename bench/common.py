"""What the benchmark scripts share."""

import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
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


def peak_rss_mib() -> float:
    """This process's own peak resident memory (VmHWM), in MiB.

    Not `getrusage(RUSAGE_SELF).ru_maxrss`: in a child process that reports the larger of its own
    peak and the parent's at the fork, so a benchmark's child started from a big parent would
    show the parent's memory.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")
