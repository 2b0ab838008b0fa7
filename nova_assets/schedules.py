"""Jobs and their schedules (DESIGN.md §5): one job per cache family, one run per job at a time."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg

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


def build_jobs_and_schedules(
    specs: Sequence[JobSpec],
) -> tuple[list[Any], list[dg.ScheduleDefinition]]:
    jobs = [build_job(spec) for spec in specs]
    return jobs, [build_schedule(spec, job) for spec, job in zip(specs, jobs, strict=True)]
