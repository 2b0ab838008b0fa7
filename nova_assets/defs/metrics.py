"""The job metrics of docs/design.md §7, computed from durable state and pushed to the gateway.

Every value is derived afresh from the Dagster instance: run history for counts, durations,
successes and failure streaks; the latest materialization's `dagster/row_count` for items; the
runs tagged as delivered to the dead-letter topic for DLQ counts. Nothing lives in one process's
memory, so restarting every process — or the Pushgateway, which keeps nothing on disk — loses no
count: the next push restores the full state.

A job's runs are its own runs and every other run that materialized its asset (the UI's
Materialize button launches Dagster's `__ASSET_JOB`): before computing, the sensor tags each such
run, once it finished, with `nova/counts_for.<job>` for each job it counts for (docs/design.md §5).
"""

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import dagster as dg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from nova_assets.core.resources import JobMetricsResource
from nova_assets.core.settings import load_settings
from nova_assets.defs.dlq.messages import DELIVERED_TAG, DELIVERED_VALUE
from nova_assets.defs.schedules import JobSpec, counts_for_tag, job_specs, jobs_of_run

PUSH_JOB = "nova_assets"
"""The Pushgateway grouping (`job` label) all metrics are pushed under."""

UNHEALTHY_AFTER_FAILURES = 3

_FINISHED = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE]
ATTRIBUTED_TAG = "nova/counts_for"
"""On a run of another job, the jobs it was found to count for (comma-separated, "-" for none)."""
ATTRIBUTION_LOOKBACK = timedelta(minutes=10)
"""Runs updated this long before the cursor are looked at again (a late or skewed update time)."""
_PAGE = 100
PENDING_WINDOW = timedelta(days=1)
"""How far back `job_dlq_pending` looks for failed runs that did not reach the DLQ."""


def attribute_runs(
    instance: dg.DagsterInstance, specs: Sequence[JobSpec], watermark: float
) -> float:
    """Tag finished runs of other jobs with the jobs they count for; returns the new watermark.

    Pages through the runs updated since `watermark - ATTRIBUTION_LOOKBACK`, so each evaluation
    reads only recent history; runs already tagged are passed over.
    """
    names = {spec.name for spec in specs}
    since = datetime.fromtimestamp(watermark, UTC) - ATTRIBUTION_LOOKBACK
    seen: set[str] = set()
    while True:
        records = instance.get_run_records(
            filters=dg.RunsFilter(statuses=_FINISHED, updated_after=since),
            order_by="update_timestamp",
            ascending=True,
            limit=_PAGE,
        )
        fresh = [r for r in records if r.dagster_run.run_id not in seen]
        for record in fresh:
            run = record.dagster_run
            seen.add(run.run_id)
            watermark = max(watermark, record.update_timestamp.timestamp())
            if run.job_name in names or ATTRIBUTED_TAG in run.tags:
                continue
            jobs = jobs_of_run(instance, run, specs)
            tags = {counts_for_tag(job): "true" for job in jobs}
            instance.add_run_tags(run.run_id, {**tags, ATTRIBUTED_TAG: ",".join(jobs) or "-"})
        if len(records) < _PAGE:
            return watermark
        # `updated_after` is strict: start just before this page's last instant; a page of
        # nothing new moves past it.
        last = records[-1].update_timestamp
        since = last - timedelta(microseconds=1) if fresh else last


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


def _items_of_run(instance: dg.DagsterInstance, run_id: str) -> float | None:
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
        items_processed=_items_of_run(instance, success.dagster_run.run_id) if success else None,
        dlq_messages=count({DELIVERED_TAG: DELIVERED_VALUE}),
        dlq_pending=pending,
    )


class _JobMetricsCollector(Collector):
    """Exposes computed values as Prometheus families (counters keep their absolute totals)."""

    def __init__(self, values: Sequence[JobMetrics]) -> None:
        self.values = values

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        runs = CounterMetricFamily(
            "job_runs", "Finished runs by job and status.", labels=["job_name", "status"]
        )
        dlq = CounterMetricFamily(
            "job_dlq_messages", "DLQ messages published, by job.", labels=["job_name"]
        )
        gauges = {
            "job_duration_seconds": "Duration of the last finished run, in seconds.",
            "job_last_success_timestamp": "Unix time the last successful run ended.",
            "job_health": "1 while consecutive failures < 3, else 0.",
            "job_consecutive_failures": "Failures since the last success.",
            "job_items_processed": "Items written by the last successful run.",
            "job_dlq_pending": "Failed runs of the last day not (yet) delivered to the DLQ.",
        }
        families = {
            name: GaugeMetricFamily(name, text, labels=["job_name"])
            for name, text in gauges.items()
        }
        for job in self.values:
            label = [job.job_name]
            runs.add_metric([job.job_name, "success"], job.successes)
            runs.add_metric([job.job_name, "failure"], job.failures)
            dlq.add_metric(label, job.dlq_messages)
            families["job_health"].add_metric(label, job.health)
            families["job_consecutive_failures"].add_metric(label, job.consecutive_failures)
            families["job_dlq_pending"].add_metric(label, job.dlq_pending)
            optional = {
                "job_duration_seconds": job.duration_seconds,
                "job_last_success_timestamp": job.last_success_timestamp,
                "job_items_processed": job.items_processed,
            }
            for name, value in optional.items():
                if value is not None:  # no sample rather than a misleading zero
                    families[name].add_metric(label, value)
        yield runs
        yield from families.values()
        yield dlq


def push_job_metrics(
    instance: dg.DagsterInstance,
    job_names: Sequence[str],
    metrics: JobMetricsResource,
    grouping: str = PUSH_JOB,
) -> bool:
    """Compute every job's metrics and push them; False (a warning is logged) if the push failed."""
    collector = _JobMetricsCollector([compute_job_metrics(instance, n) for n in job_names])
    metrics.registry.register(collector)
    try:
        return metrics.push(job=grouping)
    finally:
        metrics.registry.unregister(collector)


def build_job_metrics_sensor(specs: Sequence[JobSpec]) -> dg.SensorDefinition:
    """`job_metrics`: attributes new runs, then recomputes and pushes the metrics every 15 s."""
    job_names = [spec.name for spec in specs]

    @dg.sensor(
        name="job_metrics",
        description="Pushes the eight job metrics, derived from run history, to the Pushgateway.",
        minimum_interval_seconds=15,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def job_metrics(
        context: dg.SensorEvaluationContext, job_metrics: JobMetricsResource
    ) -> dg.SkipReason:
        # A first evaluation looks back a day, not over the whole history.
        first = (datetime.now(UTC) - timedelta(days=1)).timestamp()
        watermark = float(json.loads(context.cursor or "{}").get("attributed_until", first))
        watermark = attribute_runs(context.instance, specs, watermark)
        context.update_cursor(json.dumps({"attributed_until": watermark}))
        pushed = push_job_metrics(context.instance, job_names, job_metrics)
        state = "pushed" if pushed else "not pushed (the Pushgateway did not answer)"
        return dg.SkipReason(f"Metrics of {len(job_names)} jobs {state}.")

    return job_metrics


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(sensors=[build_job_metrics_sensor(job_specs(load_settings()))])
