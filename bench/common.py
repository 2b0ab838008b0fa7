"""What the benchmark scripts share.

Importing it also puts the repository root on `sys.path`: the scripts run as
`.venv/bin/python bench/<name>.py`, and some use the test suite's helpers (`nova_assets_tests`),
which are not installed with the package.
"""

import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg

from nova_assets.core.contract import iso_z
from nova_assets.core.resources import ClickHouseResource, RedisCacheResource

AS_OF = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
"""The fixed instant every benchmark's data ends at and its runs are computed for."""
REDIS_URL = "redis://127.0.0.1:6379/15"
"""The local Redis, database 15: benchmark keys never meet the dev loop's."""
ROOT = Path(__file__).resolve().parents[1]
"""The repository's root folder."""

if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))


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


def materialize_as_of(
    asset: dg.AssetsDefinition, url: str, key_prefix: str
) -> tuple[dg.ExecuteInProcessResult, float, dict[str, Any]]:
    """One materialization of `asset` as of AS_OF, on `url` and the bench Redis (`key_prefix`).

    Returns the result, its wall seconds and its materialization's metadata values.
    """
    node = asset.node_def.name
    started = time.perf_counter()
    result = dg.materialize(
        [asset],
        resources={
            "clickhouse": ClickHouseResource(url=url),
            "redis_cache": RedisCacheResource(url=REDIS_URL, key_prefix=key_prefix),
        },
        run_config={"ops": {node: {"config": {"as_of": iso_z(AS_OF)}}}},
    )
    seconds = time.perf_counter() - started
    [materialization] = result.asset_materializations_for_node(node)
    return result, seconds, {k: v.value for k, v in materialization.metadata.items()}
