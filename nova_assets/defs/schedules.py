"""Jobs and their schedules (docs/design.md §5): one job per cache family, one run at a time."""

import functools
from collections.abc import Sequence
from typing import Any

import dagster as dg

from nova_assets.core.jobs import JOB_TAG, MAX_RUNTIME_TAG, JobSpec, active_run, job_specs
from nova_assets.core.settings import load_settings


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
