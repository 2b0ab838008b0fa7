"""The `job_metrics` sensor's incremental count: totals and a position in history, in its cursor.

Each evaluation walks the event log's run status events (RUN_SUCCESS, RUN_FAILURE) from where it
stopped, a storage id kept in the cursor, and adds each finished run to the totals of the jobs it
counts for; gauges (last duration, last success, failure streak, items) follow the newest runs.
The cursor is durable, in the instance, so restarting every process — or the Pushgateway, which
keeps nothing on disk — loses no count, and each evaluation costs what finished since the last
one, however long the history. Counters only grow: deleting runs lowers none. A lost or
unreadable cursor is rebuilt from history once, in pages.

A run of another job that materialized one of our assets (the UI's `__ASSET_JOB`) is tagged, once
it finished, with `nova/counts_for.<job>` for each job it counts for (docs/design.md §5), so
`recount.py` finds it too.
"""

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg

from nova_assets.core.jobs import JobSpec, counts_for_tag, jobs_of_run
from nova_assets.defs.dlq.writing import DELIVERED_TAG, DELIVERED_VALUE
from nova_assets.defs.metrics.recount import PENDING_WINDOW, JobMetrics, items_of_run

ATTRIBUTED_TAG = "nova/counts_for"
"""On a run of another job, the jobs it was found to count for (comma-separated, "-" for none)."""
_PAGE = 100
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
            state.jobs[job].items_processed = items_of_run(instance, run_id)
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
