"""Live demo traffic for the local stack: a minute of new engagement events every minute.

Only the embedded engine gets it (the module's definitions are empty against a ClickHouse
server), so the rankings keep moving on a laptop while a real server is never written to.
"""

from datetime import UTC, datetime, timedelta

import dagster as dg

from nova_assets.core.jobs import JOB_TAG, JobSpec
from nova_assets.core.resources import CLICKHOUSE_POOL, ClickHouseResource, releases_engine
from nova_assets.core.settings import load_settings
from nova_assets.core.sources import ENGAGEMENT_EVENTS, FOLLOWS, POSTS
from nova_assets.defs.schedules import build_schedule
from nova_assets.defs.suggestions.shards import PRIORITY_TAG, SHARD_PRIORITY

DEMO_TRAFFIC_JOB = "demo_traffic"
DEMO_EVENTS_PER_MINUTE = 300
"""About the demo data set's own rate (2 M events over 7 days), so the rankings keep moving."""

# A minute of new events: users drawn among those in the follow graph, posts among the 5,000
# newest created in the last two days with a strong bias to the newest, the usual type mix.
_APPEND_TRAFFIC = f"""
INSERT INTO {ENGAGEMENT_EVENTS} (event_time, user_id, post_id, event_type)
WITH
    (SELECT max(follower_id) FROM {FOLLOWS}) AS max_user,
    (
        SELECT groupArray(post_id) FROM (
            SELECT DISTINCT post_id FROM {POSTS}
            WHERE created_at > fromUnixTimestamp64Milli({{end_ms:Int64}}, 'UTC') - INTERVAL 2 DAY
              AND created_at <= fromUnixTimestamp64Milli({{end_ms:Int64}}, 'UTC')
            ORDER BY post_id DESC
            LIMIT 5000
        )
    ) AS recent
SELECT
    fromUnixTimestamp64Milli(
        {{end_ms:Int64}} - toInt64(cityHash64({{seed:UInt64}}, number, 1) % {{span_ms:UInt64}}),
        'UTC'
    ),
    1 + cityHash64({{seed:UInt64}}, number, 2) % greatest(max_user, 1),
    recent[1 + toUInt64(floor(length(recent)
        * pow((cityHash64({{seed:UInt64}}, number, 3) % 1000000) / 1000000.0, 3)))],
    multiIf(roll < 800, 'view', roll < 920, 'like', roll < 970, 'comment', 'share')
FROM (
    SELECT number, cityHash64({{seed:UInt64}}, number, 4) % 1000 AS roll
    FROM numbers({{events:UInt64}})
)
WHERE length(recent) > 0
"""


def append_traffic(
    clickhouse: ClickHouseResource, end: datetime, *, events: int, span: timedelta
) -> int:
    """Append `events` new events in (end - span, end]; returns how many were written."""
    end_ms = round(end.timestamp() * 1000)
    before = clickhouse.query_rows(f"SELECT count() FROM {ENGAGEMENT_EVENTS}")[0][0]
    clickhouse.command(
        _APPEND_TRAFFIC,
        {
            "end_ms": end_ms,
            "span_ms": int(span.total_seconds() * 1000),
            "events": events,
            "seed": end_ms,
        },
    )
    return clickhouse.query_rows(f"SELECT count() FROM {ENGAGEMENT_EVENTS}")[0][0] - before


SCHEDULED_AT_TAG = ".dagster/scheduled_execution_time"
"""The tick's time, which Dagster puts on every run a schedule launches (a hidden tag)."""


class DemoTrafficConfig(dg.Config):
    events_per_minute: int = DEMO_EVENTS_PER_MINUTE


DEMO_PRIORITY = SHARD_PRIORITY + 1
"""The demo's place in the engine's line: behind the caches' steps, ahead of suggestion shards."""


@dg.op(
    pool=CLICKHOUSE_POOL,
    tags={PRIORITY_TAG: str(DEMO_PRIORITY)},
    description="Appends the last minute of demo engagement events.",
)
@releases_engine
def append_demo_traffic(
    context: dg.OpExecutionContext, config: DemoTrafficConfig, clickhouse: ClickHouseResource
) -> None:
    scheduled = context.run.tags.get(SCHEDULED_AT_TAG)
    end = datetime.fromisoformat(scheduled) if scheduled else datetime.now(UTC)
    written = append_traffic(
        clickhouse, end, events=config.events_per_minute, span=timedelta(minutes=1)
    )
    context.log.info(f"Appended {written} demo events up to {end.isoformat()}.")


@dg.job(
    name=DEMO_TRAFFIC_JOB,
    description="Local demo only: a minute of new engagement events, so trending moves.",
    tags={JOB_TAG: DEMO_TRAFFIC_JOB},
)
def demo_traffic() -> None:
    append_demo_traffic()


def demo_definitions() -> dg.Definitions:
    """The demo traffic job and its every-minute schedule."""
    spec = JobSpec(DEMO_TRAFFIC_JOB, "demo events", "* * * * *")
    return dg.Definitions(jobs=[demo_traffic], schedules=[build_schedule(spec, demo_traffic)])


defs = demo_definitions() if load_settings().embedded_clickhouse else dg.Definitions()
