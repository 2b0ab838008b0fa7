"""The eight job metrics on a real Pushgateway, derived from a real Dagster instance's history.

Success and failure streaks, health, durations, items and DLQ counts as a user reads them from
the gateway's /metrics; the same values after the gateway and every process restart; and a dead
gateway that costs a warning, never a run.
"""

import re
import time
import urllib.request
import uuid

import dagster as dg
import pytest

from nova_assets.core.jobs import JobSpec, job_specs
from nova_assets.core.resources import AlertWebhookResource, JobMetricsResource
from nova_assets.core.settings import Settings
from nova_assets.defs.dlq import sensors
from nova_assets.defs.metrics.recount import compute_job_metrics
from nova_assets.defs.metrics.sensor import build_job_metrics_sensor, push_job_metrics, push_values
from nova_assets.defs.metrics.state import MetricsState, advance
from nova_assets.local.stack import StackConfig, down, up
from nova_assets_tests.conftest import PUSHGATEWAY_URL, free_ports
from nova_assets_tests.history import add_history, history_instance, spread

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


def _grouping(kind: str):
    """A Pushgateway grouping of the test's own, deleted afterwards."""
    name = f"nova_assets_{kind}_{uuid.uuid4().hex[:8]}"
    yield name
    request = urllib.request.Request(f"{PUSHGATEWAY_URL}/metrics/job/{name}", method="DELETE")
    urllib.request.urlopen(request, timeout=5)


@pytest.fixture
def grouping(pushgateway: str):
    yield from _grouping("test")


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


# -- incremental counting over a long history ---------------------------------------------------

SPECS = job_specs(Settings.from_env({}))
NAMES = [spec.name for spec in SPECS]


def samples(text: str, grouping: str) -> dict[tuple[str, tuple], float]:
    """Every sample of one grouping on the gateway, keyed by name and labels (bar `job`)."""
    found = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)\{(.*)\} (\S+)", line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
        if labels.pop("job", None) == grouping and match.group(1).startswith("job_"):
            labels.pop("instance", None)
            found[(match.group(1), tuple(sorted(labels.items())))] = float(match.group(3))
    return found


@pytest.fixture
def recount_grouping(pushgateway: str):
    yield from _grouping("recount")


def test_ten_new_runs_after_5000_push_what_a_full_recount_pushes(
    tmp_path, grouping, recount_grouping
):
    with history_instance(tmp_path / "home") as instance:
        add_history(instance, spread(NAMES, 5000, until=time.time() - 600))
        state = advance(instance, MetricsState(), SPECS)
        assert state.caught_up and state.position > 0

        add_history(instance, spread(NAMES, 10, until=time.time(), fail_every=3))
        state = advance(instance, MetricsState.parse(state.serialize()), SPECS)
        assert push_values(state.values(NAMES), gateway(), grouping)
        assert push_job_metrics(instance, NAMES, gateway(), recount_grouping)

    text = scrape()
    incremental, recount = samples(text, grouping), samples(text, recount_grouping)
    # Nine samples a job (job_runs_total twice), but for items: bulk-written runs record none.
    assert len(incremental) == 5 * 8
    assert incremental == recount
    runs = {k: v for k, v in incremental.items() if k[0] == "job_runs_total"}
    assert sum(runs.values()) == 5010


def test_deleting_runs_never_lowers_a_counter(tmp_path, grouping):
    with history_instance(tmp_path / "home") as instance:
        history = spread(NAMES, 500, until=time.time())
        add_history(instance, history)
        state = advance(instance, MetricsState(), SPECS)
        assert push_values(state.values(NAMES), gateway(), grouping)
        before = samples(scrape(), grouping)

        for run in history[:100]:
            instance.delete_run(run.run_id)
        add_history(instance, spread(NAMES, 5, until=time.time() + 10))
        state = advance(instance, MetricsState.parse(state.serialize()), SPECS)
        assert push_values(state.values(NAMES), gateway(), grouping)
        after = samples(scrape(), grouping)
        recounted = {m.job_name: m for m in (compute_job_metrics(instance, n) for n in NAMES)}

    counters = [k for k in before if k[0] in ("job_runs_total", "job_dlq_messages_total")]
    assert counters
    for key in counters:
        assert after[key] >= before[key], key
    # A recount over what is left would have gone down: 100 runs fewer.
    assert sum(m.successes + m.failures for m in recounted.values()) == 405
    assert sum(v for k, v in after.items() if k[0] == "job_runs_total") == 505


def test_a_lost_cursor_is_rebuilt_from_history_once(tmp_path, capsys):
    sensor = build_job_metrics_sensor(SPECS)
    dead = JobMetricsResource(gateway="http://127.0.0.1:1", timeout=1)
    with history_instance(tmp_path / "home") as instance:
        add_history(instance, spread(NAMES, 2500, until=time.time()))
        for lost in (None, "not json", '{"version": 99}', '{"version": 1, "jobs": []}'):
            capsys.readouterr()
            with dg.build_sensor_context(
                instance=instance, cursor=lost, resources={"job_metrics": dead}
            ) as context:
                sensor.evaluate_tick(context)
                rebuilt = MetricsState.parse(context.cursor)
            assert "rebuilding it from run history" in capsys.readouterr().err
            assert rebuilt is not None and rebuilt.caught_up
            assert rebuilt.values(NAMES) == [compute_job_metrics(instance, n) for n in NAMES]
        # From a readable cursor: no rebuild.
        capsys.readouterr()
        with dg.build_sensor_context(
            instance=instance, cursor=rebuilt.serialize(), resources={"job_metrics": dead}
        ) as context:
            sensor.evaluate_tick(context)
        assert "rebuilding" not in capsys.readouterr().err
