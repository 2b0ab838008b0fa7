"""The metrics sensor within its budget, and a success counted before its run's end is written.

A history far longer than one small budget is counted over several evaluations, each returning
within the budget and a small margin, each going on from the cursor the last one wrote, until the
count caught up and equals what one unbounded evaluation and the full recount give. A RUN_SUCCESS
event read in the moment between Dagster storing it and writing the run's `end_time` still gives
the job its `job_last_success_timestamp`, on the gateway. A gateway that accepts the push and
never answers costs the evaluation what its budget has left, not the push's own timeout.
"""

import time
from datetime import UTC, datetime
from urllib.parse import urlsplit

import dagster as dg
import pytest

from nova_assets.core.budget import Budget
from nova_assets.core.jobs import JOB_TAG, job_specs
from nova_assets.core.resources import JobMetricsResource
from nova_assets.core.settings import Settings
from nova_assets.defs.metrics.recount import compute_job_metrics
from nova_assets.defs.metrics.sensor import build_job_metrics_sensor, push_values
from nova_assets.defs.metrics.state import MetricsState, advance
from nova_assets_tests.conftest import GateProxy
from nova_assets_tests.history import add_history, history_instance, spread
from nova_assets_tests.test_metrics import _grouping, gateway, sample, scrape

SPECS = job_specs(Settings.from_env({}))
NAMES = [spec.name for spec in SPECS]
BUDGET_S = 0.25
MARGIN_S = 1.0
"""What one evaluation may run past its budget: the unit of work it was in (a page of events)."""


def test_a_long_history_is_counted_over_several_evaluations_each_within_the_budget(tmp_path):
    sensor = build_job_metrics_sensor(SPECS, budget=lambda: Budget(BUDGET_S))
    dead = JobMetricsResource(gateway="http://127.0.0.1:1", timeout=1)
    with history_instance(tmp_path / "home") as instance:
        add_history(instance, spread(NAMES, 12_000, until=time.time()))
        started = time.monotonic()
        whole = advance(instance, MetricsState(), SPECS, Budget(600))
        unbounded_s = time.monotonic() - started
        assert whole.caught_up
        # Were it evaluated in one go, an evaluation would overrun the budget many times over.
        assert unbounded_s > BUDGET_S + MARGIN_S

        cursor, evaluations, slowest, message = None, 0, 0.0, ""
        while not message.startswith("Metrics of"):
            evaluations += 1
            assert evaluations < 200, "the count never caught up"
            with dg.build_sensor_context(
                instance=instance, cursor=cursor, resources={"job_metrics": dead}
            ) as context:
                started = time.monotonic()
                message = sensor.evaluate_tick(context).skip_message or ""
                slowest = max(slowest, time.monotonic() - started)
                cursor = context.cursor
        state = MetricsState.parse(cursor)
        recounted = [compute_job_metrics(instance, name) for name in NAMES]

    assert evaluations > 2
    assert slowest < BUDGET_S + MARGIN_S
    assert state is not None and state.caught_up
    assert state.position == whole.position
    assert state.values(NAMES) == whole.values(NAMES) == recounted


@pytest.fixture
def grouping(pushgateway: str):
    yield from _grouping("budget")


def _started_run(instance: dg.DagsterInstance, job_name: str) -> dg.DagsterRun:
    run = instance.add_run(
        dg.DagsterRun(
            job_name=job_name, status=dg.DagsterRunStatus.NOT_STARTED, tags={JOB_TAG: job_name}
        )
    )
    start = dg.DagsterEvent(dg.DagsterEventType.RUN_START.value, job_name=job_name)
    instance.handle_new_event(
        dg.EventLogEntry(
            error_info=None,
            level="DEBUG",
            user_message="",
            run_id=run.run_id,
            timestamp=time.time() - 5,
            dagster_event=start,
        )
    )
    return instance.get_run_by_id(run.run_id)


def test_a_success_read_before_its_runs_end_time_is_written_keeps_the_last_success(
    instance, grouping
):
    job = "trending_1h"
    run = _started_run(instance, job)
    success = dg.DagsterEvent(dg.DagsterEventType.RUN_SUCCESS.value, job_name=job)
    entry = dg.EventLogEntry(
        error_info=None,
        level="DEBUG",
        user_message="",
        run_id=run.run_id,
        timestamp=time.time(),
        dagster_event=success,
    )
    # What Dagster's `handle_new_event` does first: the event is in the log; the run's status
    # and `end_time` are written a moment later.
    instance.event_log_storage.store_event(entry)
    record = instance.get_run_record_by_id(run.run_id)
    assert record.end_time is None and record.start_time is not None

    state = advance(instance, MetricsState(), SPECS, Budget(30))
    [values] = state.values([job])
    assert values.successes == 1
    assert values.last_success_timestamp == entry.timestamp
    assert values.duration_seconds == entry.timestamp - record.start_time
    assert push_values([values], gateway(), grouping)
    assert sample(scrape(), grouping, "job_last_success_timestamp", job_name=job) == (
        entry.timestamp
    )

    # Then Dagster writes the run's end, from the event's stamp: the full recount agrees.
    stamp = datetime.fromtimestamp(entry.timestamp, UTC)
    instance.run_storage.handle_run_event(run.run_id, success, stamp)
    recount = compute_job_metrics(instance, job)
    assert recount.last_success_timestamp == pytest.approx(values.last_success_timestamp)


def test_a_gateway_that_never_answers_costs_the_budget_not_the_push_timeout(instance, pushgateway):
    """The push is given what the budget has left, here less than its own timeout."""
    gate = GateProxy(urlsplit(pushgateway).port)
    gate.hold()
    silent = JobMetricsResource(gateway=f"http://127.0.0.1:{gate.port}", timeout=30)
    sensor = build_job_metrics_sensor(SPECS, budget=lambda: Budget(1.0))
    _started_run(instance, "trending_1h")
    try:
        with dg.build_sensor_context(
            instance=instance, resources={"job_metrics": silent}
        ) as context:
            started = time.monotonic()
            message = sensor.evaluate_tick(context).skip_message or ""
            took = time.monotonic() - started
            state = MetricsState.parse(context.cursor)
    finally:
        gate.close()
    assert "not pushed (the Pushgateway did not answer within the evaluation's budget)" in message
    assert took < 1.0 + MARGIN_S
    # The count was written all the same: the next tick pushes it.
    assert state is not None and state.caught_up
