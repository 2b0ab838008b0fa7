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


@dataclass(frozen=True)
class JobSpec:
    name: str
    asset: str
    cron: str


def build_job(spec: JobSpec) -> Any:
    return dg.define_asset_job(
        spec.name,
        selection=[spec.asset],
        tags={JOB_TAG: spec.name},
        description=f"Materializes {spec.asset}.",
    )


ACTIVE_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def active_run(instance: dg.DagsterInstance, job_name: str) -> dg.RunRecord | None:
    """The job's queued or running run, if any."""
    records = instance.get_run_records(
        filters=dg.RunsFilter(job_name=job_name, statuses=ACTIVE_STATUSES), limit=1
    )
    return records[0] if records else None


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
        active = active_run(context.instance, spec.name)
        if active is not None:
            return dg.SkipReason(
                f"{spec.name} still has run {active.dagster_run.run_id} "
                f"{active.dagster_run.status.value.lower()}; this tick is skipped, not queued."
            )
        return dg.RunRequest()

    return _schedule


def job_specs(settings: Settings) -> list[JobSpec]:
    """One job per cache family and its cadence (docs/design.md §5)."""
    trending = [
        JobSpec(w.job_name, w.asset_name, interval_to_cron(w.refresh_sec))
        for w in windows(settings.trending_interval_sec)
    ]
    return [
        *trending,
        JobSpec(suggestions.JOB_NAME, suggestions.ASSET_NAME, settings.suggestion_cron),
        JobSpec(feeds.JOB_NAME, feeds.ASSET_NAME, interval_to_cron(feeds.REFRESH_SEC)),
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
