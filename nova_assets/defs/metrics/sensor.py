"""The `job_metrics` sensor: the eight values as Prometheus families, pushed to the gateway.

Every 15 s it advances the incremental count kept in its cursor (`state.py`) and, once that count
has caught up with run history, pushes every job's values under one grouping. `push_job_metrics`
pushes the reference recount (`recount.py`) instead, the slow, simple way the tests compare with.

An evaluation works within its budget (docs/design.md §10): the count stops in time to leave the
push its share (PUSH_SHARE of the budget, at most the push's own timeout), the cursor is written
with whatever was counted, and the push waits no longer than the budget has left. A count that
has not caught up yet, or a push that found no time, goes on at the next tick.
"""

from collections.abc import Callable, Iterator, Sequence

import dagster as dg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from nova_assets.core.bounded import WaitExceeded, call_within
from nova_assets.core.budget import Budget
from nova_assets.core.jobs import JobSpec, job_specs
from nova_assets.core.resources import JobMetricsResource
from nova_assets.core.resources.observability import failure_reason
from nova_assets.core.settings import load_settings
from nova_assets.defs.metrics.floor import read_floors
from nova_assets.defs.metrics.recount import JobMetrics, compute_job_metrics
from nova_assets.defs.metrics.state import EVENTS_PER_PAGE, MetricsState, advance
from nova_assets.defs.retention.ledger import retired_totals

PUSH_JOB = "nova_assets"
"""The Pushgateway grouping (`job` label) all metrics are pushed under."""
PUSH_SHARE = 0.25
"""The part of an evaluation's budget kept for the push (at most the push's own timeout)."""


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
    """Recount every job's metrics over all of history and push them (the slow, simple way)."""
    return push_values([compute_job_metrics(instance, n) for n in job_names], metrics, grouping)


def push_values(
    values: Sequence[JobMetrics], metrics: JobMetricsResource, grouping: str = PUSH_JOB
) -> bool:
    """Push the values; False (a warning is logged) if the push failed."""
    collector = _JobMetricsCollector(values)
    metrics.registry.register(collector)
    try:
        return metrics.push(job=grouping)
    finally:
        metrics.registry.unregister(collector)


def push_within(
    values: Sequence[JobMetrics], metrics: JobMetricsResource, budget: Budget
) -> str | None:
    """Push the values, waiting no longer than the budget has left; None if pushed, else why not."""
    try:
        pushed = call_within(
            budget.left(), lambda: push_values(values, metrics), "the Pushgateway push"
        )
    except WaitExceeded as exc:
        dg.get_dagster_logger().warning(f"Metrics not pushed this time, {exc}.")
        return "the Pushgateway did not answer within the evaluation's budget"
    return None if pushed else "the Pushgateway did not answer"


def build_job_metrics_sensor(
    specs: Sequence[JobSpec], budget: Callable[[], Budget] = Budget.for_sensor
) -> dg.SensorDefinition:
    """`job_metrics`: counts the runs finished since the last evaluation and pushes every 15 s.

    `budget` gives each evaluation its budget (`SENSOR_BUDGET_SEC`; the tests give less).
    """
    job_names = [spec.name for spec in specs]

    @dg.sensor(
        name="job_metrics",
        description="Pushes the eight job metrics to the Pushgateway, counting each finished run "
        "once: totals and position in run history are kept in the cursor.",
        minimum_interval_seconds=15,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def job_metrics(
        context: dg.SensorEvaluationContext, job_metrics: JobMetricsResource
    ) -> dg.SkipReason:
        evaluation = budget()
        state = MetricsState.parse(context.cursor)
        if state is None:
            context.log.info(
                "No readable metrics state in the cursor: rebuilding it from run history, "
                f"{EVENTS_PER_PAGE} runs per page, on top of the runs the retention deleted."
            )
            state = MetricsState.rebuilding(
                {name: retired_totals(context.instance, name) for name in job_names}
            )
        push_share = min(float(job_metrics.timeout), PUSH_SHARE * evaluation.seconds)
        counting = Budget(max(0.0, evaluation.left() - push_share))
        state = advance(context.instance, state, specs, counting)
        context.update_cursor(state.serialize())
        if not state.caught_up:
            return dg.SkipReason(
                f"Rebuilding the metrics from run history: at event {state.position}; "
                "nothing pushed until it is done."
            )
        if state.floor_pending:
            try:
                state.raise_to(
                    read_floors(job_metrics.gateway, PUSH_JOB, evaluation.left(at_most=3.0))
                )
            except Exception as exc:  # a gateway that cannot be read takes no push either
                context.log.warning(
                    "Could not read the Pushgateway's counters before the first push of a rebuilt "
                    f"count: {type(exc).__name__}: {failure_reason(exc)}."
                )
                state.floor_pending = False
            context.update_cursor(state.serialize())
        failed = push_within(state.values(job_names), job_metrics, evaluation)
        result = "pushed" if failed is None else f"not pushed ({failed})"
        return dg.SkipReason(f"Metrics of {len(job_names)} jobs {result}.")

    return job_metrics


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(sensors=[build_job_metrics_sensor(job_specs(load_settings()))])
