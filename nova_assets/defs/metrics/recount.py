"""One job's eight metrics recounted over all of history: the reference the sensor agrees with.

A job's runs are its own runs and every other run that materialized its asset (the UI's
Materialize button launches Dagster's `__ASSET_JOB`), which the sensor tags, once finished, with
`nova/counts_for.<job>` (docs/design.md §5). `compute_job_metrics` reads them from the instance's
records: the tests and benchmarks compare the sensor's incremental counts with it, and the
`nova-assets health` command reads it.
"""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import dagster as dg

from nova_assets.core.jobs import counts_for_tag
from nova_assets.defs.dlq.writing import DELIVERED_TAG, DELIVERED_VALUE

UNHEALTHY_AFTER_FAILURES = 3

_FINISHED = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE]
PENDING_WINDOW = timedelta(days=1)
"""How far back `job_dlq_pending` looks for failed runs that did not reach the DLQ."""


@dataclass(frozen=True)
class JobMetrics:
    """One job's eight values."""

    job_name: str
    successes: int
    failures: int
    duration_seconds: float | None
    last_success_timestamp: float | None
    consecutive_failures: int
    items_processed: float | None
    dlq_messages: int
    dlq_pending: int = 0

    @property
    def health(self) -> int:
        return 1 if self.consecutive_failures < UNHEALTHY_AFTER_FAILURES else 0


def items_of_run(instance: dg.DagsterInstance, run_id: str) -> float | None:
    """`dagster/row_count` of the materialization that run made, if any."""
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
    ).records
    for record in reversed(records):
        materialization = record.asset_materialization
        value = materialization.metadata.get("dagster/row_count") if materialization else None
        if value is not None:
            return float(value.value)
    return None


def compute_job_metrics(instance: dg.DagsterInstance, job_name: str) -> JobMetrics:
    """Derive one job's metrics from the instance's records: its own runs and those it counts."""
    counted = {counts_for_tag(job_name): "true"}

    def count(tags: dict[str, str] | None = None, **filters: object) -> int:
        own = dg.RunsFilter(job_name=job_name, tags=tags or {}, **filters)
        other = dg.RunsFilter(tags={**counted, **(tags or {})}, **filters)
        return instance.get_runs_count(own) + instance.get_runs_count(other)

    def newest(statuses: list[dg.DagsterRunStatus]) -> dg.RunRecord | None:
        records = [
            *instance.get_run_records(dg.RunsFilter(job_name=job_name, statuses=statuses), limit=1),
            *instance.get_run_records(dg.RunsFilter(tags=counted, statuses=statuses), limit=1),
        ]
        return max(records, key=lambda r: r.create_timestamp, default=None)

    last = newest(_FINISHED)
    success = newest([dg.DagsterRunStatus.SUCCESS])
    # Runs of one asset never overlap, so creation order is finishing order; failures created
    # after the last success are the current streak.
    streak = count(
        statuses=[dg.DagsterRunStatus.FAILURE],
        **({"created_after": success.create_timestamp} if success else {}),
    )
    # Failed runs of the last day not delivered to the DLQ: waiting for Kafka, or undeliverable.
    recent = {"updated_after": datetime.now(UTC) - PENDING_WINDOW}
    pending = count(statuses=[dg.DagsterRunStatus.FAILURE], **recent) - count(
        {DELIVERED_TAG: DELIVERED_VALUE}, statuses=[dg.DagsterRunStatus.FAILURE], **recent
    )
    duration = None
    if last and last.start_time and last.end_time:
        duration = last.end_time - last.start_time
    return JobMetrics(
        job_name=job_name,
        successes=count(statuses=[dg.DagsterRunStatus.SUCCESS]),
        failures=count(statuses=[dg.DagsterRunStatus.FAILURE]),
        duration_seconds=duration,
        last_success_timestamp=success.end_time if success else None,
        consecutive_failures=streak,
        items_processed=items_of_run(instance, success.dagster_run.run_id) if success else None,
        dlq_messages=count({DELIVERED_TAG: DELIVERED_VALUE}),
        dlq_pending=pending,
    )
