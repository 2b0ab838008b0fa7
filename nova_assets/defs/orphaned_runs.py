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
"""

import time

import dagster as dg

from nova_assets.core.jobs import ACTIVE_SCAN
from nova_assets.core.workers import run_worker, worker_alive

GRACE_S = 30.0
"""A run younger than this may not have recorded its worker yet."""


def find_orphans(
    instance: dg.DagsterInstance, location_name: str | None, now: float | None = None
) -> list[tuple[dg.DagsterRun, int]]:
    """STARTED runs of the code location whose worker process is gone, with the worker's pid."""
    now = time.time() if now is None else now
    records = instance.get_run_records(
        filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]), limit=ACTIVE_SCAN
    )
    orphans = []
    for record in records:
        run = record.dagster_run
        origin = run.remote_job_origin
        if location_name and origin is not None and origin.location_name != location_name:
            continue
        started = record.start_time
        if started is None or now - started < GRACE_S:
            continue
        worker = run_worker(run)
        # No worker tag: the run executes in the process that launched it (`dagster asset
        # materialize`), which fails or finishes it itself, or another launcher's worker, which
        # run monitoring watches. A worker this host cannot judge (None) is left alone too.
        if worker is not None and worker_alive(worker.pid, started) is False:
            orphans.append((run, worker.pid))
    return orphans


@dg.sensor(
    name="orphaned_runs",
    description="Fails runs whose worker process died without a trace (a hard kill of the host "
    "process), so their jobs run again and they reach the dead-letter queue.",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def orphaned_runs(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    """Fail the STARTED runs whose tagged worker is gone; runs without the tag are left alone.

    A run without the local launcher's `nova/worker` tag was started by another launcher; Dagster's
    run monitoring (its start and run timeouts) is what ends it if its worker died.
    """
    instance = context.instance
    if instance.run_launcher.supports_check_run_worker_health:
        return dg.SkipReason("The run launcher checks its workers; run monitoring fails the dead.")
    origin = context.code_location_origin
    orphans = find_orphans(instance, origin.location_name if origin else None)
    for run, pid in orphans:
        message = (
            f"The run's worker process (pid {pid}) is gone without finishing the run: the host "
            "process was killed (a hard kill, the OOM killer, a restart). Failed by the "
            "orphaned_runs sensor so the job runs again and the failure reaches the DLQ."
        )
        context.log.warning(f"Run {run.run_id} ({run.job_name}): {message}")
        instance.report_run_failed(run, message)
    return dg.SkipReason(f"{len(orphans)} orphaned run(s) failed.")


defs = dg.Definitions(sensors=[orphaned_runs])
