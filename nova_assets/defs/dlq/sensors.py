"""The DLQ's two sensors: `dlq_publisher` sends failed runs to Kafka, `dlq_replay` runs them again.

Each is built in its own module (`publisher.py`, `replay.py`) and works within the sensor budget
(docs/design.md §10); this module puts both into the code location. The names below are the ones
the command line and the tests use.
"""

import dagster as dg

from nova_assets.core.jobs import job_specs
from nova_assets.core.settings import load_settings
from nova_assets.defs.dlq.publisher import (
    LOOKBACK,
    RUNS_PER_PAGE,
    PublisherCursor,
    build_dlq_publisher,
    is_ours,
    publish_failed_runs,
)
from nova_assets.defs.dlq.replay import (
    Replay,
    ReplayPass,
    build_dlq_replay_sensor,
    plan_replays,
    replay_pass,
)
from nova_assets.defs.schedules import cache_jobs

__all__ = [
    "LOOKBACK",
    "RUNS_PER_PAGE",
    "PublisherCursor",
    "Replay",
    "ReplayPass",
    "build_dlq_publisher",
    "build_dlq_replay_sensor",
    "is_ours",
    "plan_replays",
    "publish_failed_runs",
    "replay_pass",
]


@dg.definitions
def defs() -> dg.Definitions:
    specs = job_specs(load_settings())
    return dg.Definitions(
        sensors=[build_dlq_publisher(specs), build_dlq_replay_sensor(cache_jobs(), specs)]
    )
