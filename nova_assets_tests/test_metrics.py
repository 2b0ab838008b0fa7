"""The eight job metrics on a real Pushgateway, derived from a real Dagster instance's history.

Success and failure streaks, health, durations, items and DLQ counts as a user reads them from
the gateway's /metrics; the same values after the gateway and every process restart; and a dead
gateway that costs a warning, never a run.
"""

import re
import urllib.request
import uuid

import dagster as dg
import pytest

from nova_assets.core.resources import AlertWebhookResource, JobMetricsResource
from nova_assets.core.settings import Settings
from nova_assets.defs.dlq import sensors
from nova_assets.defs.metrics import build_job_metrics_sensor, compute_job_metrics, push_job_metrics
from nova_assets.defs.schedules import JobSpec, job_specs
from nova_assets.local.stack import StackConfig, down, up
from nova_assets_tests.conftest import PUSHGATEWAY_URL, free_ports

JOB = "trending_1h"


def _job(outcomes: list[bool]) -> dg.JobDefinition:
    """A job named like ours whose runs succeed or fail as `outcomes` says, in order."""

    @dg.asset(name="trending_posts_1h")
    def ranking() -> dg.MaterializeResult:
        if not outcomes.pop(0):
            raise ConnectionError("Redis refused the connection")
        return dg.MaterializeResult(metadata={"dagster/row_count": 42})

    job = dg.define_asset_job(JOB, selection=[ranking])
    return dg.Definitions(assets=[ranking], jobs=[job]).resolve_job_def(JOB)


def run(job: dg.JobDefinition, instance: dg.DagsterInstance) -> dg.DagsterRun:
    result = job.execute_in_process(instance=instance, raise_on_error=False)
    return instance.get_run_record_by_id(result.run_id)


def gateway(url: str = PUSHGATEWAY_URL) -> JobMetricsResource:
    resource = JobMetricsResource(gateway=url)
    resource.setup_for_execution(None)
    return resource


def sample(text: str, grouping: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the gateway's /metrics, or None when absent."""
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)\{(.*)\} (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
        if found.get("job") == grouping and all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return None


def scrape(url: str = PUSHGATEWAY_URL) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        return response.read().decode()


@pytest.fixture
def grouping(pushgateway: str):
    name = f"nova_assets_test_{uuid.uuid4().hex[:8]}"
    yield name
    request = urllib.request.Request(f"{PUSHGATEWAY_URL}/metrics/job/{name}", method="DELETE")
    urllib.request.urlopen(request, timeout=5)


def test_streaks_health_and_reset_as_the_gateway_shows_them(grouping):
    outcomes = [True, False, False, False, True]
    job = _job(outcomes)
    with dg.instance_for_test() as instance:

        def push_and_read() -> str:
            assert push_job_metrics(instance, [JOB], gateway(), grouping)
            return scrape()

        first = run(job, instance)
        run(job, instance)
        run(job, instance)
        text = push_and_read()
        assert sample(text, grouping, "job_runs_total", job_name=JOB, status="success") == 1
        assert sample(text, grouping, "job_runs_total", job_name=JOB, status="failure") == 2
        assert sample(text, grouping, "job_consecutive_failures", job_name=JOB) == 2
        assert sample(text, grouping, "job_health", job_name=JOB) == 1
        assert sample(text, grouping, "job_last_success_timestamp", job_name=JOB) == (
            pytest.approx(first.end_time)
        )

        run(job, instance)
        text = push_and_read()
        assert sample(text, grouping, "job_health", job_name=JOB) == 0
        assert sample(text, grouping, "job_consecutive_failures", job_name=JOB) == 3

        last = run(job, instance)
        text = push_and_read()
        assert sample(text, grouping, "job_consecutive_failures", job_name=JOB) == 0
        assert sample(text, grouping, "job_health", job_name=JOB) == 1
        assert sample(text, grouping, "job_runs_total", job_name=JOB, status="success") == 2
        assert sample(text, grouping, "job_last_success_timestamp", job_name=JOB) == (
            pytest.approx(last.end_time)
        )
        assert sample(text, grouping, "job_items_processed", job_name=JOB) == 42
        assert sample(text, grouping, "job_duration_seconds", job_name=JOB) == pytest.approx(
            last.end_time - last.start_time, abs=1.0
        )


def test_a_job_that_never_ran_reports_zeros_and_no_misleading_timestamps(grouping):
    with dg.instance_for_test() as instance:
        assert push_job_metrics(instance, ["cache_warmer"], gateway(), grouping)
    text = scrape()
    assert sample(text, grouping, "job_runs_total", job_name="cache_warmer", status="failure") == 0
    assert sample(text, grouping, "job_health", job_name="cache_warmer") == 1
    assert sample(text, grouping, "job_last_success_timestamp", job_name="cache_warmer") is None


def test_dlq_messages_are_counted_from_delivered_runs(grouping, kafka_dlq):
    job = _job([False, False])
    with dg.instance_for_test() as instance:
        run(job, instance)
        run(job, instance)
        assert compute_job_metrics(instance, JOB).dlq_messages == 0
        assert push_job_metrics(instance, [JOB], gateway(), grouping)
        assert sample(scrape(), grouping, "job_dlq_pending", job_name=JOB) == 2
        sensors.publish_failed_runs(
            instance,
            sensors.PublisherCursor(),
            kafka_dlq,
            AlertWebhookResource(),
            dg.get_dagster_logger(),
            specs=[JobSpec(JOB, "trending_posts_1h", "* * * * *")],
        )
        assert push_job_metrics(instance, [JOB], gateway(), grouping)
    assert len(kafka_dlq.read()) == 2
    assert sample(scrape(), grouping, "job_dlq_messages_total", job_name=JOB) == 2
    assert sample(scrape(), grouping, "job_dlq_pending", job_name=JOB) == 0


def test_restarting_the_gateway_and_every_process_loses_no_count(tmp_path, service_binaries):
    [port] = free_ports(1)
    config = StackConfig(state_dir=tmp_path / ".nova", pushgateway_port=port)
    url = f"http://127.0.0.1:{port}"
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    up(config, services=("pushgateway",))
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            job = _job([True, False, True, False])
            for _ in range(4):
                run(job, instance)
            assert push_job_metrics(instance, [JOB], gateway(url))
        before = scrape(url)

        down(config, services=("pushgateway",))
        up(config, services=("pushgateway",))
        assert sample(scrape(url), "nova_assets", "job_runs_total", job_name=JOB) is None

        # A new instance object and a new resource: nothing carried over in memory.
        with dg.DagsterInstance.from_config(str(home)) as instance:
            assert push_job_metrics(instance, [JOB], gateway(url))
        after = scrape(url)
    finally:
        down(config, services=("pushgateway",))
    for name, labels in [
        ("job_runs_total", {"status": "success"}),
        ("job_runs_total", {"status": "failure"}),
        ("job_consecutive_failures", {}),
        ("job_health", {}),
        ("job_last_success_timestamp", {}),
        ("job_duration_seconds", {}),
        ("job_items_processed", {}),
        ("job_dlq_messages_total", {}),
        ("job_dlq_pending", {}),
    ]:
        value = sample(before, "nova_assets", name, job_name=JOB, **labels)
        assert value is not None, name
        assert sample(after, "nova_assets", name, job_name=JOB, **labels) == value, name


def test_a_dead_gateway_costs_a_warning_never_a_run(caplog):
    job = _job([True])
    sensor = build_job_metrics_sensor([JobSpec(JOB, "trending_posts_1h", "* * * * *")])
    with dg.instance_for_test() as instance:
        assert run(job, instance).dagster_run.status == dg.DagsterRunStatus.SUCCESS
        dead = JobMetricsResource(gateway="http://127.0.0.1:1", timeout=1)
        with dg.build_sensor_context(instance=instance, resources={"job_metrics": dead}) as ctx:
            result = sensor.evaluate_tick(ctx)
    assert "not pushed" in result.skip_message
    assert "Could not push metrics" in caplog.text


def test_runs_of_other_jobs_count_for_the_jobs_owning_their_assets(grouping):
    """A UI launch (Dagster's implicit asset job) counts in the job that owns each asset."""

    @dg.asset(name="trending_posts_1h")
    def trending() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"dagster/row_count": 50})

    @dg.asset(name="warmed_feeds", deps=[trending])
    def feeds() -> None:
        raise ConnectionError("Redis refused the connection")

    specs = job_specs(Settings.from_env({}))
    sensor = build_job_metrics_sensor(specs)
    with dg.instance_for_test() as instance:
        assert dg.materialize([trending], instance=instance).success
        both = dg.materialize([trending, feeds], instance=instance, raise_on_error=False)
        assert not both.success
        with dg.build_sensor_context(
            instance=instance, resources={"job_metrics": gateway()}
        ) as context:
            sensor.evaluate_tick(context)
            cursor = context.cursor
        ui_run = instance.get_run_by_id(both.run_id)
        # Evaluated again from its cursor: nothing is counted twice.
        with dg.build_sensor_context(
            instance=instance, cursor=cursor, resources={"job_metrics": gateway()}
        ) as context:
            sensor.evaluate_tick(context)
        trending_1h = compute_job_metrics(instance, "trending_1h")
        cache_warmer = compute_job_metrics(instance, "cache_warmer")
        assert push_job_metrics(instance, ["trending_1h", "cache_warmer"], gateway(), grouping)

    assert ui_run.tags["nova/counts_for"] == "trending_1h,cache_warmer"
    # The two-asset run failed: it counts as a failure of both jobs it materialized for.
    assert (trending_1h.successes, trending_1h.failures) == (1, 1)
    assert (cache_warmer.successes, cache_warmer.failures) == (0, 1)
    assert trending_1h.items_processed == 50
    text = scrape()
    for job, status, value in [
        ("trending_1h", "success", 1),
        ("trending_1h", "failure", 1),
        ("cache_warmer", "failure", 1),
    ]:
        assert sample(text, grouping, "job_runs_total", job_name=job, status=status) == value
