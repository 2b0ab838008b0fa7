"""The job registry (docs/design.md §5): the five jobs, their assets, cadences and runs.

Everything that asks "which job is this run?" reads it here: the schedules, the sensors, the
metrics, `nova-assets health` and the DLQ. A run counts for the job whose asset it materializes,
however it was launched (the job's schedule, the UI's `__ASSET_JOB`, the CLI, a replay).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import dagster as dg

from nova_assets.core.settings import Settings, interval_to_cron

JOB_TAG = "nova/job"
"""Every run carries nova/job=<job_name>; the instance allows one run per value of it."""
MAX_RUNTIME_TAG = "dagster/max_runtime"
"""Run monitoring terminates (and fails) a run that is still going after this many seconds."""


@dataclass(frozen=True)
class JobSpec:
    name: str
    asset: str
    cron: str
    op: str | None = None
    """The asset's node (its op, or its graph of steps), when it is not named like the asset."""
    interval_sec: int = 0
    """The schedule's interval; 0 for a job with no cache asset."""
    executor: dg.ExecutorDefinition | None = None
    """The job's own executor; None for the code location's (steps in the run's process)."""

    @property
    def step(self) -> str:
        return self.op or self.asset

    @property
    def max_runtime_sec(self) -> int:
        """Five intervals, between 10 minutes and an hour.

        Far above a healthy run with all its retries, and short enough that a hung run holds its
        job for a few ticks at most.
        """
        return min(max(5 * self.interval_sec, 600), 3600)


# The cache families' jobs, assets and steps (the trending ones come from their windows below).
SUGGESTIONS_JOB = "suggested_users"
SUGGESTIONS_ASSET = "suggested_users"
SUGGESTIONS_OP = "compute_suggested_users"
"""The suggestions asset's graph of steps, under which its run config goes."""
SHARDS_IN_PARALLEL = 4
"""Shards ranked at once against a ClickHouse server (the suggestions job's executor)."""
FEEDS_JOB = "cache_warmer"
FEEDS_ASSET = "warmed_feeds"
FEEDS_REFRESH_SEC = 60
"""The cache_warmer schedule's interval."""


@dataclass(frozen=True)
class Window:
    """One trending window of docs/design.md §3: its length, decay and job."""

    name: str
    length: timedelta
    decay_per_hour: float
    refresh_sec: int

    @property
    def asset_name(self) -> str:
        return f"trending_posts_{self.name}"

    @property
    def job_name(self) -> str:
        return f"trending_{self.name}"

    @property
    def ttl_sec(self) -> int:
        return TTL_REFRESH_MULTIPLE * self.refresh_sec


TTL_REFRESH_MULTIPLE = 10


def windows(trending_interval_sec: int = 60) -> tuple[Window, ...]:
    """The three windows; the 1h refresh follows TRENDING_INTERVAL_SEC."""
    return (
        Window("1h", timedelta(hours=1), 0.5, trending_interval_sec),
        Window("24h", timedelta(hours=24), 0.9, 300),
        Window("7d", timedelta(days=7), 0.98, 3600),
    )


def job_specs(settings: Settings) -> list[JobSpec]:
    """One job per cache family and its cadence (docs/design.md §5)."""

    def spec(name: str, asset: str, interval: int, op: str | None = None) -> JobSpec:
        return JobSpec(name, asset, interval_to_cron(interval), op=op, interval_sec=interval)

    return [
        *(
            spec(w.job_name, w.asset_name, w.refresh_sec)
            for w in windows(settings.trending_interval_sec)
        ),
        JobSpec(
            SUGGESTIONS_JOB,
            SUGGESTIONS_ASSET,
            interval_to_cron(settings.suggestion_interval_sec),
            op=SUGGESTIONS_OP,
            interval_sec=settings.suggestion_interval_sec,
            # On a server the shards of a run go side by side, each in a process of its own.
            executor=None
            if settings.embedded_clickhouse
            else dg.multiprocess_executor.configured({"max_concurrent": SHARDS_IN_PARALLEL}),
        ),
        spec(FEEDS_JOB, FEEDS_ASSET, FEEDS_REFRESH_SEC),
    ]


ACTIVE_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
ACTIVE_SCAN = 500
"""Runs in flight read at once: far more than MAX_CONCURRENT_JOBS plus a queue ever holds."""


def active_run(instance: dg.DagsterInstance, spec: "JobSpec") -> dg.RunRecord | None:
    """A queued or running run that will materialize the job's asset, whatever launched it.

    The job's own runs, and any other run whose steps include the asset's: the UI's Materialize
    button (Dagster's `__ASSET_JOB`), a run launched from the command line, a replay.
    """
    records = instance.get_run_records(
        filters=dg.RunsFilter(statuses=ACTIVE_STATUSES), limit=ACTIVE_SCAN
    )
    for record in records:
        run = record.dagster_run
        if run.job_name == spec.name or executes(planned_steps(instance, run), spec.step):
            return record
    return None


def planned_steps(instance: dg.DagsterInstance, run: dg.DagsterRun) -> frozenset[str]:
    """The step keys a run executes (for an asset job, its assets' op names)."""
    if run.execution_plan_snapshot_id is None:
        return frozenset()
    snapshot = instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
    return frozenset(snapshot.step_keys_to_execute) if snapshot else frozenset()


def executes(steps: frozenset[str], node: str) -> bool:
    """Whether `steps` include the node's: its op's step, or any step inside its graph.

    A graph's steps are keyed under its name: `compute_suggested_users.rank_suggestions[shard_0]`.
    """
    return node in steps or any(step.startswith(f"{node}.") for step in steps)


COUNTS_FOR_PREFIX = "nova/counts_for."
"""A run that is not one of the jobs' own carries `nova/counts_for.<job>=true` for each job whose
asset it materialized, so the metrics count it with that job (docs/design.md §5, §7)."""


def counts_for_tag(job_name: str) -> str:
    return f"{COUNTS_FOR_PREFIX}{job_name}"


def jobs_of_run(
    instance: dg.DagsterInstance, run: dg.DagsterRun, specs: Sequence[JobSpec]
) -> list[str]:
    """The jobs a run counts for: its own job, else every job whose asset step it executes."""
    if run.job_name in {spec.name for spec in specs}:
        return [run.job_name]
    steps = planned_steps(instance, run)
    return [spec.name for spec in specs if executes(steps, spec.step)]
