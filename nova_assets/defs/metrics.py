"""The job metrics of docs/design.md §7, computed from durable state and pushed to the gateway.

Every value is derived afresh from the Dagster instance: run history for counts, durations,
successes and failure streaks; the latest materialization's `dagster/row_count` for items; the
runs tagged as delivered to the dead-letter topic for DLQ counts. Nothing lives in one process's
memory, so restarting every process — or the Pushgateway, which keeps nothing on disk — loses no
count: the next push restores the full state.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import dagster as dg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from nova_assets.core.resources import JobMetricsResource
from nova_assets.core.settings import load_settings
from nova_assets.defs.dlq.messages import DELIVERED_TAG, DELIVERED_VALUE
from nova_assets.defs.schedules import job_specs

PUSH_JOB = "nova_assets"
"""The Pushgateway grouping (`job` label) all metrics are pushed under."""

UNHEALTHY_AFTER_FAILURES = 3

_FINISHED = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE]


@dataclass(frozen=True)
class JobMetrics:
    """One job's seven values."""

    job_name: str
    successes: int
    failures: int
    duration_seconds: float | None
    last_success_timestamp: float | None
    consecutive_failures: int
    items_processed: float | None
    dlq_messages: int

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
    """Derive one job's metrics from the instance's records."""

    def count(**filters: object) -> int:
        return instance.get_runs_count(dg.RunsFilter(job_name=job_name, **filters))

    last = instance.get_run_records(dg.RunsFilter(job_name=job_name, statuses=_FINISHED), limit=1)
    last_success = instance.get_run_records(
        dg.RunsFilter(job_name=job_name, statuses=[dg.DagsterRunStatus.SUCCESS]), limit=1
    )
    success = last_success[0] if last_success else None
    # One run per job at a time, so creation order is finishing order; failures created after
    # the last success are the current streak.
    streak = count(
        statuses=[dg.DagsterRunStatus.FAILURE],
        **({"created_after": success.create_timestamp} if success else {}),
    )
    duration = None
    if last and last[0].start_time and last[0].end_time:
        duration = last[0].end_time - last[0].start_time
    return JobMetrics(
        job_name=job_name,
        successes=count(statuses=[dg.DagsterRunStatus.SUCCESS]),
        failures=count(statuses=[dg.DagsterRunStatus.FAILURE]),
        duration_seconds=duration,
        last_success_timestamp=success.end_time if success else None,
        consecutive_failures=streak,
        items_processed=_items_of_run(instance, success.dagster_run.run_id) if success else None,
        dlq_messages=count(tags={DELIVERED_TAG: DELIVERED_VALUE}),
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


def build_job_metrics_sensor(job_names: Sequence[str]) -> dg.SensorDefinition:
    """`job_metrics`: recomputes and pushes the metrics every 15 seconds."""

    @dg.sensor(
        name="job_metrics",
        description="Pushes the seven job metrics, derived from run history, to the Pushgateway.",
        minimum_interval_seconds=15,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def job_metrics(
        context: dg.SensorEvaluationContext, job_metrics: JobMetricsResource
    ) -> dg.SkipReason:
        pushed = push_job_metrics(context.instance, job_names, job_metrics)
        state = "pushed" if pushed else "not pushed (the Pushgateway did not answer)"
        return dg.SkipReason(f"Metrics of {len(job_names)} jobs {state}.")

    return job_metrics


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(
        sensors=[build_job_metrics_sensor([spec.name for spec in job_specs(load_settings())])]
    )
