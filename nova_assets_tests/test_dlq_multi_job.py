"""A failed run of two assets of different jobs: one DLQ message per job, counted and replayed once.

The run is what the UI's Materialize of two assets makes, a run of Dagster's implicit
`__ASSET_JOB`, failing in both steps. The real publisher sends it to a real broker as two messages,
each keyed and named by its job with only that job's asset key; the metrics count one DLQ message
for each job (the recount and the incremental state alike); and the replay sensor, reading the
topic, requests exactly one run per job, also when the messages were delivered twice.
"""

import json

import dagster as dg

from nova_assets.core.jobs import job_specs
from nova_assets.core.resources import AlertWebhookResource
from nova_assets.core.settings import Settings
from nova_assets.defs.dlq import sensors, writing
from nova_assets.defs.metrics.recount import compute_job_metrics
from nova_assets.defs.metrics.state import MetricsState, advance
from nova_assets_tests.test_dlq import FAST_RETRIES, _replay_tick

SPECS = job_specs(Settings.from_env({}))


@dg.asset(name="trending_posts_1h", retry_policy=FAST_RETRIES)
def failing_trending() -> None:
    raise ConnectionError("Redis at 127.0.0.1:6379 refused the connection")


@dg.asset(name="warmed_feeds", retry_policy=FAST_RETRIES)
def failing_feeds() -> None:
    raise TimeoutError("ClickHouse did not answer within 120 s")


def _ui_run(instance: dg.DagsterInstance) -> str:
    """Materialize both assets in one run of the implicit asset job, as the UI's button does."""
    defs = dg.Definitions(assets=[failing_trending, failing_feeds])
    job = defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        instance=instance,
        asset_selection=[dg.AssetKey("trending_posts_1h"), dg.AssetKey("warmed_feeds")],
        raise_on_error=False,
    )
    assert not result.success
    assert instance.get_run_by_id(result.run_id).job_name == "__ASSET_JOB"
    return result.run_id


def test_a_two_job_run_is_one_message_per_job_counted_and_replayed_once_each(instance, kafka_dlq):
    run_id = _ui_run(instance)
    _, delivered, pending = sensors.publish_failed_runs(
        instance,
        sensors.PublisherCursor(),
        kafka_dlq,
        AlertWebhookResource(),
        dg.get_dagster_logger(),
        SPECS,
    )
    assert (delivered, pending) == (2, 0)
    assert instance.get_run_by_id(run_id).tags[writing.DELIVERED_TAG] == writing.DELIVERED_VALUE

    records = kafka_dlq.read()
    bodies = {record.key: json.loads(record.value) for record in records}
    assert len(records) == 2 and set(bodies) == {"trending_1h", "cache_warmer"}
    trending, feeds = bodies["trending_1h"], bodies["cache_warmer"]
    assert (trending["job_name"], trending["run_id"]) == ("trending_1h", run_id)
    assert (feeds["job_name"], feeds["run_id"]) == ("cache_warmer", run_id)
    assert trending["asset_keys"] == ["trending_posts_1h"]
    assert feeds["asset_keys"] == ["warmed_feeds"]
    # Each carries its own job's failure: its step, its error, its retries.
    assert trending["failed_steps"] == ["trending_posts_1h"]
    assert trending["error"]["type"] == "ConnectionError"
    assert feeds["failed_steps"] == ["warmed_feeds"]
    assert feeds["error"]["type"] == "TimeoutError"
    assert trending["retry_count"] == feeds["retry_count"] == 2

    # Counted once for each job: by the incremental state (which tags the run with the jobs it
    # counts for) and by the recount from those tags.
    counted = advance(instance, MetricsState(), SPECS).values(["trending_1h", "cache_warmer"])
    assert [(m.job_name, m.dlq_messages) for m in counted] == [
        ("trending_1h", 1),
        ("cache_warmer", 1),
    ]
    for job in ("trending_1h", "cache_warmer"):
        assert compute_job_metrics(instance, job).dlq_messages == 1

    # Each message replays its own job only; delivered twice (at least once), still once each.
    def requested() -> list[tuple[str, str, list[dg.AssetKey]]]:
        requests = _replay_tick(instance, kafka_dlq).run_requests
        return sorted((r.job_name, r.run_key, r.asset_selection) for r in requests)

    expected = [
        ("cache_warmer", f"replay:{run_id}:cache_warmer", [dg.AssetKey("warmed_feeds")]),
        ("trending_1h", f"replay:{run_id}:trending_1h", [dg.AssetKey("trending_posts_1h")]),
    ]
    assert requested() == expected
    for record in records:
        assert kafka_dlq.publish(record.key or "", record.value)
    assert requested() == expected
