"""`run_retention`: the daemon deletes finished runs older than `RUN_RETENTION_DAYS` (default 7).

A sensor of the code location, so it is visible in the UI (Automation) with each evaluation's
summary, and counted in no job's metrics: it launches no run. Every 30 s, an evaluation works at
most `RETENTION_BUDGET_S`, a page of runs at a time, then leaves the rest to the next; a backlog of
a year is caught up over many evaluations, and the instance is never held for longer than one
run's deletion (docs/design.md §10). `nova-assets history prune` does the same by hand.
"""

import dagster as dg

from nova_assets.core.budget import Budget
from nova_assets.core.jobs import job_specs
from nova_assets.core.settings import load_settings
from nova_assets.defs.retention.prune import cutoff_for, prune

RETENTION_BUDGET_S = 4.0
"""At most this long an evaluation (and never more than the sensor budget): the retention shares
the instance with every tick, and on a small host its CPU with the runs."""
RETENTION_INTERVAL_S = 30


@dg.sensor(
    name="run_retention",
    description="Deletes finished runs older than RUN_RETENTION_DAYS with their events, logs and "
    "files; keeps each asset's latest materialization, undelivered failures and unfinished runs.",
    minimum_interval_seconds=RETENTION_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def run_retention(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    settings = load_settings()
    if settings.run_retention_days == 0:
        return dg.SkipReason("RUN_RETENTION_DAYS=0: every run is kept.")
    budget = Budget(min(float(settings.sensor_budget_sec), RETENTION_BUDGET_S))
    job_names = [spec.name for spec in job_specs(settings)]
    done = prune(context.instance, job_names, cutoff_for(settings.run_retention_days), budget)
    return dg.SkipReason(
        f"Runs older than {settings.run_retention_days} day(s): {done.summary()} "
        f"in {budget.spent():.1f} s."
    )


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(sensors=[run_retention])
