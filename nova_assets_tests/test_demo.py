"""Demo traffic: a minute of realistic events every minute, with the embedded engine only."""

import subprocess
import sys
from datetime import UTC, datetime, timedelta

from nova_assets.core.contract import epoch_ms
from nova_assets.defs import demo
from nova_assets.local import seed


def test_demo_traffic_appends_a_minute_of_realistic_events(clickhouse):
    end = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    seed.truncate(clickhouse)
    seed.generate(
        clickhouse,
        seed.SeedSpec(
            seed=9, users=2_000, posts=10_000, events=50_000, as_of=end - timedelta(minutes=1)
        ),
    )
    result = demo.demo_traffic.execute_in_process(
        resources={"clickhouse": clickhouse},
        run_config={"ops": {"append_demo_traffic": {"config": {"events_per_minute": 500}}}},
        tags={demo.SCHEDULED_AT_TAG: end.isoformat()},
    )
    assert result.success
    [(count, known, live_posts, types)] = clickhouse.query_rows(
        "SELECT count(), countIf(post_id IN (SELECT post_id FROM nova.posts)), "
        "uniqExact(post_id), groupUniqArray(toString(event_type)) "
        "FROM nova.engagement_events "
        "WHERE event_time > fromUnixTimestamp64Milli({start:Int64}, 'UTC') "
        "AND event_time <= fromUnixTimestamp64Milli({end:Int64}, 'UTC')",
        {"start": epoch_ms(end - timedelta(minutes=1)), "end": epoch_ms(end)},
    )
    assert count == 500 and known == 500
    assert 1 < live_posts < 500  # skewed to the newest posts
    assert set(types) == {"view", "like", "comment", "share"}
    seed.truncate(clickhouse)


def test_demo_traffic_exists_only_with_the_embedded_engine():
    probe = (
        "import nova_assets.definitions as d;"
        "print(sorted(j.name for j in d.defs.get_repository_def().get_all_jobs()))"
    )
    jobs = {}
    for url in ("", "https://user:pass@clickhouse.example:8443/"):
        completed = subprocess.run(
            [sys.executable, "-c", probe],
            env={"PATH": "/usr/bin:/bin", "CLICKHOUSE_URL": url},
            capture_output=True,
            text=True,
            check=True,
        )
        jobs[url] = completed.stdout
    assert "demo_traffic" in jobs[""]
    assert "demo_traffic" not in jobs["https://user:pass@clickhouse.example:8443/"]
