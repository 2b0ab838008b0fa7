"""The job metrics of docs/design.md §7, counted once per finished run and pushed to the gateway.

The `job_metrics` sensor walks the event log's run status events (RUN_SUCCESS, RUN_FAILURE) from
where it stopped, a storage id kept in its cursor, and adds each finished run to the totals of
the jobs it counts for; gauges (last duration, last success, failure streak, items) follow the
newest runs. The cursor is durable, in the instance, so restarting every process — or the
Pushgateway, which keeps nothing on disk — loses no count, and each evaluation costs what
finished since the last one, however long the history. Counters only grow: deleting runs lowers
none. A lost or unreadable cursor is rebuilt from history once, in pages.

A job's runs are its own runs and every other run that materialized its asset (the UI's
Materialize button launches Dagster's `__ASSET_JOB`): the sensor tags each such run, once it
finished, with `nova/counts_for.<job>` for each job it counts for (docs/design.md §5).
`compute_job_metrics` recounts one job over all of history instead: the reference the tests and
benchmarks compare with, and what the `nova-assets health` command reads.
"""

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from nova_assets.core.jobs import JobSpec, counts_for_tag, job_specs, jobs_of_run
from nova_assets.core.resources import JobMetricsResource
from nova_assets.core.settings import load_settings
from nova_assets.defs.dlq.messages import DELIVERED_TAG, DELIVERED_VALUE

PUSH_JOB = "nova_assets"
"""The Pushgateway grouping (`job` label) all metrics are pushed under."""

UNHEALTHY_AFTER_FAILURES = 3

_FINISHED = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE]
ATTRIBUTED_TAG = "nova/counts_for"
"""On a run of another job, the jobs it was found to count for (comma-separated, "-" for none)."""
_PAGE = 100
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


# -- incremental counting ---------------------------------------------------------------------

STATE_VERSION = 1
EVENTS_PER_PAGE = 1000
REBUILD_BUDGET_S = 40.0
"""Time one evaluation may spend catching up on history, inside the 60 s evaluation timeout."""
DELIVERY_LOOKBACK = timedelta(minutes=10)
"""Runs tagged delivered this long before the last look are read again (clocks that differ)."""
AWAITING_LIMIT = 10_000
"""Failed runs waiting for their DLQ delivery that the state keeps (the newest)."""
_STATUS_EVENTS = {
    dg.DagsterEventType.RUN_SUCCESS: "success",
    dg.DagsterEventType.RUN_FAILURE: "failure",
}


@dataclass
class JobState:
    """One job's running totals and latest values, as kept between evaluations."""

    successes: int = 0
    failures: int = 0
    dlq_messages: int = 0
    duration_seconds: float | None = None
    last_success_timestamp: float | None = None
    consecutive_failures: int = 0
    items_processed: float | None = None


@dataclass
class MetricsState:
    """Everything the `job_metrics` sensor knows, kept in its cursor (durable, in the instance).

    `position` is the storage id of the last run status event (RUN_SUCCESS / RUN_FAILURE) of the
    event log that was counted; the totals only ever grow. `awaiting` holds the failed runs not
    yet seen delivered to the DLQ: run id → [failure time, jobs it counts for].
    """

    position: int = 0
    jobs: dict[str, JobState] = field(default_factory=dict)
    awaiting: dict[str, list[Any]] = field(default_factory=dict)
    settled_until: float = 0.0
    caught_up: bool = False

    @classmethod
    def parse(cls, raw: str | None) -> "MetricsState | None":
        """The stored state, or None when there is none or it cannot be read (rebuild it)."""
        try:
            stored = json.loads(raw or "")
            if not isinstance(stored, dict) or stored.get("version") != STATE_VERSION:
                return None
            return cls(
                position=int(stored["position"]),
                jobs={name: JobState(**values) for name, values in stored["jobs"].items()},
                awaiting={str(k): [float(v[0]), list(v[1])] for k, v in stored["awaiting"].items()},
                settled_until=float(stored["settled_until"]),
                caught_up=bool(stored["caught_up"]),
            )
        except (ValueError, TypeError, KeyError, AttributeError, IndexError):
            return None

    def serialize(self) -> str:
        return json.dumps(
            {
                "version": STATE_VERSION,
                "position": self.position,
                "jobs": {name: asdict(job) for name, job in self.jobs.items()},
                "awaiting": self.awaiting,
                "settled_until": self.settled_until,
                "caught_up": self.caught_up,
            }
        )

    def values(self, job_names: Sequence[str]) -> list[JobMetrics]:
        pending = {name: 0 for name in job_names}
        for _, jobs in self.awaiting.values():
            for job in jobs:
                if job in pending:
                    pending[job] += 1
        return [
            JobMetrics(
                job_name=name, **asdict(self.jobs.get(name, JobState())), dlq_pending=pending[name]
            )
            for name in job_names
        ]


def _status_events(
    instance: dg.DagsterInstance, after: int
) -> tuple[list[tuple[int, str, str]], int | None]:
    """The run status events after storage id `after`, in storage order, up to one page.

    Returns (storage id, status, run id) triples and the storage id they run to when a page was
    full (more follow), else None.
    """
    events, bound = [], None
    for event_type, status in _STATUS_EVENTS.items():
        records = instance.fetch_run_status_changes(
            dg.RunStatusChangeRecordsFilter(event_type=event_type, after_storage_id=after),
            limit=EVENTS_PER_PAGE,
            ascending=True,
        ).records
        events += [(r.storage_id, status, r.run_id) for r in records]
        if len(records) == EVENTS_PER_PAGE:
            last = records[-1].storage_id
            bound = last if bound is None else min(bound, last)
    events.sort()
    return [e for e in events if bound is None or e[0] <= bound], bound


def advance(
    instance: dg.DagsterInstance,
    state: MetricsState,
    specs: Sequence[JobSpec],
    budget_s: float = REBUILD_BUDGET_S,
) -> MetricsState:
    """Count the runs that finished since `state.position`, page by page, within `budget_s`.

    Each finished run counts for the jobs it belongs to (§5); a run of another job is tagged
    with them on the way (`nova/counts_for.<job>`). Failed runs wait in `awaiting` until their
    DLQ delivery tag shows; the totals only ever grow, so deleting runs lowers no counter.
    """
    deadline = time.monotonic() + budget_s
    names = {spec.name for spec in specs}
    while True:
        events, bound = _status_events(instance, state.position)
        records = _run_records(instance, [run_id for _, _, run_id in events])
        newest_success: dict[str, str] = {}
        for storage_id, status, run_id in events:
            state.position = storage_id
            record = records.get(run_id)
            if record is None:  # deleted since it finished: nothing left to count
                continue
            jobs = _jobs_counted(instance, record.dagster_run, specs, names)
            for job in jobs:
                _count(state.jobs.setdefault(job, JobState()), status, record)
                if status == "success":
                    newest_success[job] = run_id
            if status == "failure" and jobs:
                if record.dagster_run.tags.get(DELIVERED_TAG) == DELIVERED_VALUE:
                    for job in jobs:
                        state.jobs[job].dlq_messages += 1
                else:
                    state.awaiting[run_id] = [record.end_time or time.time(), jobs]
        for job, run_id in newest_success.items():
            state.jobs[job].items_processed = _items_of_run(instance, run_id)
        if bound is None:
            state.caught_up = True
            break
        if time.monotonic() >= deadline:
            break
    _settle_deliveries(instance, state)
    return state


def _run_records(instance: dg.DagsterInstance, run_ids: Sequence[str]) -> dict[str, dg.RunRecord]:
    records: dict[str, dg.RunRecord] = {}
    for chunk in range(0, len(run_ids), _PAGE):
        wanted = list(dict.fromkeys(run_ids[chunk : chunk + _PAGE]))
        found = instance.get_run_records(dg.RunsFilter(run_ids=wanted))
        records.update((r.dagster_run.run_id, r) for r in found)
    return records


def _jobs_counted(
    instance: dg.DagsterInstance, run: dg.DagsterRun, specs: Sequence[JobSpec], names: set[str]
) -> list[str]:
    """The jobs `run` counts for; a run of another job is tagged with them once."""
    if run.job_name in names:
        return [run.job_name]
    if ATTRIBUTED_TAG in run.tags:
        attributed = run.tags[ATTRIBUTED_TAG]
        return [] if attributed == "-" else attributed.split(",")
    jobs = jobs_of_run(instance, run, specs)
    tags = {counts_for_tag(job): "true" for job in jobs}
    instance.add_run_tags(run.run_id, {**tags, ATTRIBUTED_TAG: ",".join(jobs) or "-"})
    return jobs


def _count(job: JobState, status: str, record: dg.RunRecord) -> None:
    if record.start_time and record.end_time:
        job.duration_seconds = record.end_time - record.start_time
    if status == "success":
        job.successes += 1
        job.consecutive_failures = 0
        job.last_success_timestamp = record.end_time
    else:
        job.failures += 1
        job.consecutive_failures += 1


def _settle_deliveries(instance: dg.DagsterInstance, state: MetricsState) -> None:
    """Count the awaiting failed runs tagged delivered since the last look; forget day-old ones.

    Tagging a run stamps its update time, so only runs delivered since `settled_until` (less a
    look-back for clocks that run behind) are read, however many failures wait.
    """
    now = datetime.now(UTC)
    if state.awaiting:
        since = datetime.fromtimestamp(state.settled_until, UTC) - DELIVERY_LOOKBACK
        delivered = instance.get_run_records(
            dg.RunsFilter(tags={DELIVERED_TAG: DELIVERED_VALUE}, updated_after=since)
        )
        for record in delivered:
            waiting = state.awaiting.pop(record.dagster_run.run_id, None)
            for job in waiting[1] if waiting else ():
                state.jobs.setdefault(job, JobState()).dlq_messages += 1
    oldest = (now - PENDING_WINDOW).timestamp()
    kept = [(k, v) for k, v in state.awaiting.items() if v[0] >= oldest]
    if len(kept) > AWAITING_LIMIT:
        kept = sorted(kept, key=lambda item: item[1][0])[-AWAITING_LIMIT:]
    state.awaiting = dict(kept)
    state.settled_until = now.timestamp()


def build_job_metrics_sensor(specs: Sequence[JobSpec]) -> dg.SensorDefinition:
    """`job_metrics`: counts the runs finished since the last evaluation and pushes every 15 s."""
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
        state = MetricsState.parse(context.cursor)
        if state is None:
            context.log.info(
                "No readable metrics state in the cursor: rebuilding it from run history, "
                f"{EVENTS_PER_PAGE} runs per page."
            )
            state = MetricsState()
        state = advance(context.instance, state, specs)
        context.update_cursor(state.serialize())
        if not state.caught_up:
            return dg.SkipReason(
                f"Rebuilding the metrics from run history: at event {state.position}; "
                "nothing pushed until it is done."
            )
        pushed = push_values(state.values(job_names), job_metrics)
        result = "pushed" if pushed else "not pushed (the Pushgateway did not answer)"
        return dg.SkipReason(f"Metrics of {len(job_names)} jobs {result}.")

    return job_metrics


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(sensors=[build_job_metrics_sensor(job_specs(load_settings()))])
