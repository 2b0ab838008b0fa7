"""Runs orphaned by a hard kill: a STARTED run whose worker process is gone is failed, once.

The worker's pid is read from the run's `nova/worker` tag as the local run launcher writes it. A
real process stands in for the worker: killed, its run is failed with a message saying why; alive,
its run is left alone; a run without the tag (launched in the process that executes it, or by
another launcher) and a run too young to have recorded its worker are left alone too. Hundreds
of orphans and a small budget: each evaluation returns within it, the next goes on from its
cursor, and every orphan is failed once.
"""

import subprocess
import sys
import time
from datetime import UTC, datetime

import dagster as dg

from nova_assets.core.budget import Budget
from nova_assets.core.workers import WORKER_TAG, Worker, process_start, worker_alive
from nova_assets.defs.orphaned_runs import (
    GRACE_S,
    build_orphaned_runs_sensor,
    find_orphans,
    orphaned_runs,
)


def _started_run(instance: dg.DagsterInstance, pid: int | None) -> dg.DagsterRun:
    """A run of ours in STARTED, its worker `pid` tagged as the local run launcher tags it."""
    run = instance.add_run(
        dg.DagsterRun(job_name="trending_1h", status=dg.DagsterRunStatus.NOT_STARTED)
    )
    instance.handle_run_event(
        run.run_id,
        dg.DagsterEvent(
            event_type_value=dg.DagsterEventType.RUN_START.value, job_name=run.job_name
        ),
    )
    if pid is not None:
        instance.add_run_tags(run.run_id, {WORKER_TAG: Worker(pid, process_start(pid)).tag_value})
    return instance.get_run_by_id(run.run_id)


def _evaluate(instance: dg.DagsterInstance) -> dg.SkipReason:
    with dg.build_sensor_context(instance=instance) as context:
        return orphaned_runs.evaluate_tick(context)


def test_a_run_whose_worker_died_is_failed_and_a_live_one_is_left_alone(instance):
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_run = _started_run(instance, worker.pid)
        live_run = _started_run(instance, alive.pid)
        silent_run = _started_run(instance, None)
        worker.kill()
        worker.wait()
        later = time.time() + GRACE_S + 1
        assert [run.run_id for run, _ in find_orphans(instance, None, now=later)] == [
            dead_run.run_id
        ]
        # Too young to judge: nothing yet.
        assert find_orphans(instance, None) == []
    finally:
        alive.kill()
        alive.wait()

    # Finding orphans changes nothing by itself.
    statuses = {r.run_id: r.status for r in instance.get_runs()}
    assert statuses[dead_run.run_id] == dg.DagsterRunStatus.STARTED
    assert statuses[live_run.run_id] == dg.DagsterRunStatus.STARTED
    assert statuses[silent_run.run_id] == dg.DagsterRunStatus.STARTED


def test_the_sensor_fails_an_orphan_with_the_reason(instance, monkeypatch):
    worker = subprocess.Popen([sys.executable, "-c", "pass"])
    worker.wait()
    run = _started_run(instance, worker.pid)
    # The run started a while ago (the sensor's next tick after a restart).
    monkeypatch.setattr("nova_assets.defs.orphaned_runs.GRACE_S", 0.0)
    result = _evaluate(instance)
    failed = instance.get_run_by_id(run.run_id)
    assert failed.status == dg.DagsterRunStatus.FAILURE
    assert "1 orphaned run(s) failed" in result.skip_message
    [event] = instance.get_records_for_run(
        run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE
    ).records
    assert f"worker process (pid {worker.pid}) is gone" in event.event_log_entry.message
    # Evaluated again: nothing more to do.
    assert "0 orphaned run(s)" in _evaluate(instance).skip_message


def test_a_reused_pid_is_not_mistaken_for_the_worker():
    started_after = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.05)
        # The run "started" long before this process: its pid was reused.
        assert not worker_alive(started_after.pid, run_started=time.time() - 3600)
        assert worker_alive(started_after.pid, run_started=time.time())
    finally:
        started_after.kill()
        started_after.wait()


# -- within the budget ----------------------------------------------------------------------------

BUDGET_S = 0.25
MARGIN_S = 1.5
"""What one evaluation may run past its budget: the run it was failing (a new SQLite file for its
events, 0.1 to 0.4 s on a busy machine), or a page of runs."""


def _started_runs(instance: dg.DagsterInstance, count: int, worker: str | None) -> list[str]:
    """`count` runs STARTED two minutes ago, their worker tagged `worker` (None: untagged)."""
    started = datetime.fromtimestamp(time.time() - 120, UTC)
    run_ids = []
    for _ in range(count):
        tags = {} if worker is None else {WORKER_TAG: worker}
        run = instance.add_run(
            dg.DagsterRun(job_name="trending_1h", status=dg.DagsterRunStatus.NOT_STARTED, tags=tags)
        )
        start = dg.DagsterEvent(dg.DagsterEventType.RUN_START.value, job_name=run.job_name)
        instance.handle_run_event(run.run_id, start, started)
        run_ids.append(run.run_id)
    return run_ids


def test_a_kill_that_left_many_orphans_is_handled_over_evaluations_each_within_the_budget(
    instance,
):
    """Failing a run writes its failure (about 0.1 s on SQLite): 40 of them outlast the budget."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphans = _started_runs(instance, 40, Worker(gone.pid, time.time() - 121).tag_value)
    [untagged] = _started_runs(instance, 1, None)
    sensor = build_orphaned_runs_sensor(budget=lambda: Budget(BUDGET_S))
    cursor, evaluations, slowest, failed = None, 0, 0.0, 0
    while failed < len(orphans):
        evaluations += 1
        assert evaluations < 200, "the orphans were never all failed"
        with dg.build_sensor_context(instance=instance, cursor=cursor) as context:
            started = time.monotonic()
            message = orphaned_runs_message(sensor.evaluate_tick(context))
            slowest = max(slowest, time.monotonic() - started)
            cursor = context.cursor
        failed += int(message.split()[0])
    statuses = {r.run_id: r.status for r in instance.get_runs()}

    assert evaluations > 2
    assert slowest < BUDGET_S + MARGIN_S
    # What one unbounded evaluation leaves (the tests above): every orphan failed, once, and the
    # run without the tag still going. Evaluated again, there is nothing left to fail.
    assert failed == len(orphans)
    assert {statuses[run_id] for run_id in orphans} == {dg.DagsterRunStatus.FAILURE}
    assert statuses[untagged] == dg.DagsterRunStatus.STARTED
    with dg.build_sensor_context(instance=instance, cursor=cursor) as context:
        assert orphaned_runs_message(sensor.evaluate_tick(context)).startswith("0 orphaned")


def orphaned_runs_message(result: dg.SkipReason) -> str:
    return result.skip_message or ""
