"""Jobs and their schedules (DESIGN.md §5): one job per cache family, one run per job at a time."""

from collections.abc import Sequence
from dataclasses import dataclass

import dagster as dg

JOB_TAG = "nova/job"
"""Every run carries nova/job=<job_name>; the instance allows one run per value of it."""


@dataclass(frozen=True)
class JobSpec:
    name: str
    asset: str
    cron: str


def build_job(spec: JobSpec) -> dg.JobDefinition:
    return dg.define_asset_job(
        spec.name,
        selection=[spec.asset],
        tags={JOB_TAG: spec.name},
        description=f"Materializes {spec.asset}.",
    )


def build_schedule(spec: JobSpec, job: dg.JobDefinition) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name=f"{spec.name}_schedule",
        job=job,
        cron_schedule=spec.cron,
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )


def build_jobs_and_schedules(
    specs: Sequence[JobSpec],
) -> tuple[list[dg.JobDefinition], list[dg.ScheduleDefinition]]:
    jobs = [build_job(spec) for spec in specs]
    return jobs, [build_schedule(spec, job) for spec, job in zip(specs, jobs, strict=True)]
