"""Runs orphaned by a hard kill are failed, so they free their slots and reach the DLQ (§5).

The local run launcher starts each run's worker as a process on this host and tags the run with
the worker's pid and start time (`nova/worker`, `nova_assets.core.workers`). The launcher cannot
report whether a worker is still alive, so when `dagster dev` is killed as a whole (a laptop
closing, the OOM killer, a container restart) its runs stay STARTED forever: their jobs'
schedules skip every tick and their pool slots stay claimed.

`orphaned_runs` looks, every 30 s, at this code location's STARTED runs: one whose worker
process is gone (or whose pid now belongs to a process started after the run) is reported
failed. Run monitoring then frees its pool slots, and `dlq_publisher` publishes it like any other
failure. A run without the tag (launched by another launcher: Dagster's default one, which the
local launcher hands runs of another Python to) is left to Dagster's run monitoring and its
timeouts, as are runs of launchers that check their workers themselves (Kubernetes, Docker).

An evaluation works within its budget (docs/design.md §10): it reads the STARTED runs a page at a
time, newest first, and stops when the budget is spent; its cursor is the last run it looked
at, and the next evaluation goes on below it, starting again from the newest once it reaches
the oldest. However many runs a kill left, each is failed within a few evaluations.
"""

import time
from collections.abc import Callable, Iterator

import dagster as dg

from nova_assets.core.budget import Budget
from nova_assets.core.workers import run_worker, worker_running

GRACE_S = 30.0
"""A run younger than this may not have recorded its worker yet."""
PAGE = 100
"""STARTED runs read per query."""


def started_runs(
    instance: dg.DagsterInstance, after: str | None, budget: Budget | None = None
) -> Iterator[dg.RunRecord]:
    """The STARTED runs, newest first, from below run `after` (None: the newest) to the oldest.

    Stops when the budget is spent, before a page is read.
    """
    cursor = after
    while budget is None or not budget.exhausted:
        records = instance.get_run_records(
            filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]),
            limit=PAGE,
            cursor=cursor,
        )
        yield from records
        if len(records) < PAGE:
            return
        cursor = records[-1].dagster_run.run_id


def orphaned_worker(record: dg.RunRecord, location_name: str | None, now: float) -> int | None:
    """The pid of the run's worker if that process is gone; None if alive or not ours to judge."""
    run = record.dagster_run
    origin = run.remote_job_origin
    if location_name and origin is not None and origin.location_name != location_name:
        return None
    started = record.start_time
    if started is None or now - started < GRACE_S:
        return None
    worker = run_worker(run)
    # No worker tag: the run executes in the process that launched it (`dagster asset
    # materialize`), which fails or finishes it itself, or another launcher's worker, which
    # run monitoring watches. A worker this host cannot judge (None) is left alone too.
    if worker is not None and worker_running(worker) is False:
        return worker.pid
    return None


def find_orphans(
    instance: dg.DagsterInstance, location_name: str | None, now: float | None = None
) -> list[tuple[dg.DagsterRun, int]]:
    """STARTED runs of the code location whose worker process is gone, with the worker's pid."""
    now = time.time() if now is None else now
    return [
        (record.dagster_run, pid)
        for record in started_runs(instance, None)
        if (pid := orphaned_worker(record, location_name, now)) is not None
    ]


def fail_orphans(
    instance: dg.DagsterInstance,
    location_name: str | None,
    after: str | None,
    budget: Budget,
    log: dg.DagsterLogManager | None = None,
) -> tuple[list[tuple[dg.DagsterRun, int]], str | None]:
    """Fail the orphans among the STARTED runs below run `after`, until done or out of budget.

    Returns the runs failed, and the run to go on below next time (None: from the newest).
    """
    now, failed, last = time.time(), [], None
    for record in started_runs(instance, after, budget):
        if budget.exhausted:
            return failed, last
        run = record.dagster_run
        last = run.run_id
        pid = orphaned_worker(record, location_name, now)
        if pid is None:
            continue
        message = (
            f"The run's worker process (pid {pid}) is gone without finishing the run: the host "
            "process was killed (a hard kill, the OOM killer, a restart). Failed by the "
            "orphaned_runs sensor so the job runs again and the failure reaches the DLQ."
        )
        if log is not None:
            log.warning(f"Run {run.run_id} ({run.job_name}): {message}")
        instance.report_run_failed(run, message)
        failed.append((run, pid))
    if budget.exhausted:
        return failed, last
    return failed, None


def build_orphaned_runs_sensor(
    budget: Callable[[], Budget] = Budget.for_sensor,
) -> dg.SensorDefinition:
    """`orphaned_runs`; `budget` gives each evaluation its budget (the tests give less)."""

    @dg.sensor(
        name="orphaned_runs",
        description="Fails runs whose worker process died without a trace (a hard kill of the "
        "host process), so their jobs run again and they reach the dead-letter queue.",
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def orphaned_runs(context: dg.SensorEvaluationContext) -> dg.SkipReason:
        """Fail the STARTED runs whose tagged worker is gone; runs without the tag are left alone.

        A run without the local launcher's `nova/worker` tag was started by another launcher;
        Dagster's run monitoring (its start and run timeouts) is what ends it if its worker died.
        """
        evaluation = budget()
        instance = context.instance
        if instance.run_launcher.supports_check_run_worker_health:
            return dg.SkipReason(
                "The run launcher checks its workers; run monitoring fails the dead."
            )
        origin = context.code_location_origin
        failed, following = fail_orphans(
            instance,
            origin.location_name if origin else None,
            context.cursor or None,
            evaluation,
            context.log,
        )
        context.update_cursor(following)
        later = " The rest at the next evaluation (budget spent)." if following else ""
        return dg.SkipReason(f"{len(failed)} orphaned run(s) failed.{later}")

    return orphaned_runs


orphaned_runs = build_orphaned_runs_sensor()

defs = dg.Definitions(sensors=[orphaned_runs])
