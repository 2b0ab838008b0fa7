"""Jobs and their schedules (docs/design.md §5): one job per cache family, one run at a time."""

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg

from nova_assets.core.settings import Settings, interval_to_cron, load_settings
from nova_assets.defs.feeds import assets as feeds
from nova_assets.defs.suggestions import assets as suggestions
from nova_assets.defs.trending.assets import windows

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


def build_job(spec: JobSpec) -> Any:
    tags = {JOB_TAG: spec.name}
    if spec.interval_sec:
        tags[MAX_RUNTIME_TAG] = str(spec.max_runtime_sec)
    return dg.define_asset_job(
        spec.name,
        selection=[spec.asset],
        tags=tags,
        description=f"Materializes {spec.asset}.",
        executor_def=spec.executor,
    )


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


def build_schedule(spec: JobSpec, job: Any) -> dg.ScheduleDefinition:
    """A schedule whose tick is skipped, not queued, while the job still has a run in flight."""

    @dg.schedule(
        name=f"{spec.name}_schedule",
        job=job,
        cron_schedule=spec.cron,
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Materializes {spec.asset} on `{spec.cron}` (UTC).",
    )
    def _schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
        active = active_run(context.instance, spec)
        if active is not None:
            run = active.dagster_run
            return dg.SkipReason(
                f"{spec.name} still has run {run.run_id} ({run.job_name}) "
                f"{run.status.value.lower()}; this tick is skipped, not queued."
            )
        return dg.RunRequest()

    return _schedule


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
            suggestions.JOB_NAME,
            suggestions.ASSET_NAME,
            interval_to_cron(settings.suggestion_interval_sec),
            op=suggestions.OP_NAME,
            interval_sec=settings.suggestion_interval_sec,
            # On a server the shards of a run go side by side, each in a process of its own.
            executor=None
            if settings.embedded_clickhouse
            else dg.multiprocess_executor.configured(
                {"max_concurrent": suggestions.SHARDS_IN_PARALLEL}
            ),
        ),
        spec(feeds.JOB_NAME, feeds.ASSET_NAME, feeds.REFRESH_SEC),
    ]


@functools.cache
def cache_jobs() -> tuple[Any, ...]:
    """The deployment's cache jobs, built once: schedules and sensors target these objects."""
    return tuple(build_job(spec) for spec in job_specs(load_settings()))


def build_schedules(specs: Sequence[JobSpec], jobs: Sequence[Any]) -> list[dg.ScheduleDefinition]:
    return [build_schedule(spec, job) for spec, job in zip(specs, jobs, strict=True)]


@dg.definitions
def defs() -> dg.Definitions:
    jobs = cache_jobs()
    return dg.Definitions(jobs=jobs, schedules=build_schedules(job_specs(load_settings()), jobs))
