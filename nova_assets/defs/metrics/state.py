"""The `job_metrics` sensor's incremental count: totals and a position in history, in its cursor.

Each evaluation walks the event log's run status events (RUN_SUCCESS, RUN_FAILURE) from where it
stopped, a storage id kept in the cursor, and adds each finished run to the totals of the jobs it
counts for; gauges (last duration, last success, failure streak, items) follow the newest runs.
The cursor is durable, in the instance, so restarting every process — or the Pushgateway, which
keeps nothing on disk — loses no count, and each evaluation costs what finished since the last
one, however long the history. Counters only grow: deleting runs lowers none. A lost or
unreadable cursor is rebuilt from history, in pages, over as many evaluations as it takes.

Each evaluation works within its budget (docs/design.md §10): it counts a chunk of events at a
time and stops when the budget is spent, its position just past the last event counted. Events
that commit after a higher storage id was read are found by a recheck (`reading.py`).

A run's end is the stamp of its status event, which the run's `end_time` is set from: the event
is in the log a moment before Dagster writes the run's `end_time`, and the count may read it in
between.

A run of another job that materialized one of our assets (the UI's `__ASSET_JOB`) is tagged, once
it finished, with `nova/counts_for.<job>` for each job it counts for (docs/design.md §5), so
`recount.py` finds it too.
"""

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg

from nova_assets.core.budget import Budget
from nova_assets.core.jobs import JobSpec, counts_for_tag, jobs_of_run
from nova_assets.defs.dlq.writing import DELIVERED_TAG, DELIVERED_VALUE
from nova_assets.defs.metrics.reading import (
    EVENTS_PER_PAGE,
    LateCommits,
    StatusEvent,
    status_events,
)
from nova_assets.defs.metrics.recount import PENDING_WINDOW, JobMetrics, items_of_run

__all__ = ["EVENTS_PER_PAGE", "JobState", "MetricsState", "advance"]

ATTRIBUTED_TAG = "nova/counts_for"
"""On a run of another job, the jobs it was found to count for (comma-separated, "-" for none)."""
CHUNK = 100
"""Events counted between two looks at the budget (their runs are read in one query)."""
STATE_VERSION = 2
"""2 added the recheck of late commits (`late`); a version 1 state is read and carried on."""
DELIVERY_LOOKBACK = timedelta(minutes=10)
"""Runs tagged delivered this long before the last look are read again (clocks that differ)."""
AWAITING_LIMIT = 10_000
"""Failed runs waiting for their DLQ delivery that the state keeps (the newest)."""


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
    event log that was read in order; `late` finds those below it that committed after it was
    read. The totals only ever grow. `awaiting` holds the failed runs not yet seen delivered to
    the DLQ: run id → [failure time, jobs it counts for].
    """

    position: int = 0
    jobs: dict[str, JobState] = field(default_factory=dict)
    awaiting: dict[str, list[Any]] = field(default_factory=dict)
    settled_until: float = 0.0
    caught_up: bool = False
    late: LateCommits = field(default_factory=LateCommits)
    floor_pending: bool = False
    """A rebuild from history: before its first push its totals are raised to what the gateway
    holds (`floor.py`), since runs deleted by hand are counted nowhere else."""

    @classmethod
    def rebuilding(cls, retired: Mapping[str, Mapping[str, int]]) -> "MetricsState":
        """A state to rebuild from history, starting from what deleted runs counted for."""
        jobs = {
            name: JobState(
                successes=kinds.get("success", 0),
                failures=kinds.get("failure", 0),
                dlq_messages=kinds.get("dlq", 0),
            )
            for name, kinds in retired.items()
        }
        return cls(jobs=jobs, floor_pending=True)

    def raise_to(self, floors: Mapping[tuple[str, str], float]) -> None:
        """Raise each total to at least its floor: (job, success | failure | dlq) → value."""
        for (name, kind), floor in floors.items():
            job = self.jobs.setdefault(name, JobState())
            attribute = {"success": "successes", "failure": "failures", "dlq": "dlq_messages"}
            setattr(job, attribute[kind], max(getattr(job, attribute[kind]), int(floor)))
        self.floor_pending = False

    @classmethod
    def parse(cls, raw: str | None) -> "MetricsState | None":
        """The stored state, or None when there is none or it cannot be read (rebuild it)."""
        try:
            stored = json.loads(raw or "")
            if not isinstance(stored, dict) or stored.get("version") not in (1, STATE_VERSION):
                return None
            late = (
                LateCommits.from_json(stored["late"])
                if stored["version"] == STATE_VERSION
                else LateCommits.from_now()
            )
            return cls(
                position=int(stored["position"]),
                jobs={name: JobState(**values) for name, values in stored["jobs"].items()},
                awaiting={str(k): [float(v[0]), list(v[1])] for k, v in stored["awaiting"].items()},
                settled_until=float(stored["settled_until"]),
                caught_up=bool(stored["caught_up"]),
                late=late,
                floor_pending=bool(stored.get("floor_pending", False)),
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
                "late": self.late.to_json(),
                "floor_pending": self.floor_pending,
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


def advance(
    instance: dg.DagsterInstance,
    state: MetricsState,
    specs: Sequence[JobSpec],
    budget: Budget | None = None,
) -> MetricsState:
    """Count the runs that finished since `state.position`, until done or the budget is spent.

    First the recheck pass in progress (events below the position that committed late), then on
    from the position, a page at a time. Each finished run counts for the jobs it belongs to
    (§5); a run of another job is tagged with them on the way (`nova/counts_for.<job>`). Failed
    runs wait in `awaiting` until their DLQ delivery tag shows; the totals only ever grow, so
    deleting runs lowers no counter.
    """
    budget = budget if budget is not None else Budget.for_sensor()
    counter = _Counter(instance, state, specs)
    late = state.late
    late.begin_pass(time.time())

    def rechecked(event: StatusEvent) -> None:
        late.pass_after = event.storage_id

    def read(event: StatusEvent) -> None:
        state.position = event.storage_id

    while late.pass_started is not None and not budget.exhausted:
        events, more = status_events(
            instance, late.pass_after, through=state.position, stamped_after=late.horizon
        )
        if not counter.count(events, budget, rechecked, skip=late.counted):
            break
        if not more:
            late.finish_pass()
    while late.pass_started is None and not budget.exhausted:
        events, more = status_events(instance, state.position)
        if not counter.count(events, budget, read):
            break
        if not more:
            state.caught_up = True
            break
    counter.finish()
    late.bound_size()
    _settle_deliveries(instance, state)
    return state


class _Counter:
    """Adds status events to the state's totals, a chunk at a time, within a budget."""

    def __init__(
        self, instance: dg.DagsterInstance, state: MetricsState, specs: Sequence[JobSpec]
    ) -> None:
        self.instance, self.state, self.specs = instance, state, specs
        self.names = {spec.name for spec in specs}
        self.newest_success: dict[str, tuple[float, str]] = {}
        """Job → (stamp, run id) of its newest success counted in this evaluation."""

    def count(
        self,
        events: Sequence[StatusEvent],
        budget: Budget,
        mark: Callable[[StatusEvent], None],
        skip: Callable[[StatusEvent], bool] = lambda _: False,
    ) -> bool:
        """Count `events` in order, `mark`ing each once done; False if the budget ran out first."""
        for start in range(0, len(events), CHUNK):
            if budget.exhausted:
                return False
            chunk = events[start : start + CHUNK]
            records = _run_records(self.instance, [e.run_id for e in chunk if not skip(e)])
            for event in chunk:
                if not skip(event):
                    self._add(event, records.get(event.run_id))
                    self.state.late.remember(event)
                mark(event)
        return True

    def finish(self) -> None:
        """Read the items of each job's newest success, if counted in this evaluation."""
        for job, (stamp, run_id) in self.newest_success.items():
            state = self.state.jobs[job]
            if stamp >= (state.last_success_timestamp or 0.0):
                state.items_processed = items_of_run(self.instance, run_id)

    def _add(self, event: StatusEvent, record: dg.RunRecord | None) -> None:
        if record is None:  # deleted since it finished: nothing left to count
            return
        state = self.state
        jobs = _jobs_counted(self.instance, record.dagster_run, self.specs, self.names)
        for job in jobs:
            _count(state.jobs.setdefault(job, JobState()), event, record)
            newest = self.newest_success.get(job)
            if event.status == "success" and (newest is None or event.timestamp >= newest[0]):
                self.newest_success[job] = (event.timestamp, event.run_id)
        if event.status == "failure" and jobs:
            if record.dagster_run.tags.get(DELIVERED_TAG) == DELIVERED_VALUE:
                for job in jobs:
                    state.jobs[job].dlq_messages += 1
            else:
                state.awaiting[event.run_id] = [event.timestamp, jobs]


def _run_records(instance: dg.DagsterInstance, run_ids: Sequence[str]) -> dict[str, dg.RunRecord]:
    wanted = list(dict.fromkeys(run_ids))
    if not wanted:
        return {}
    found = instance.get_run_records(dg.RunsFilter(run_ids=wanted))
    return {r.dagster_run.run_id: r for r in found}


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


def _count(job: JobState, event: StatusEvent, record: dg.RunRecord) -> None:
    """Add one finished run; its end is its status event's stamp, never a missing `end_time`."""
    if record.start_time:
        job.duration_seconds = event.timestamp - record.start_time
    if event.status == "success":
        job.successes += 1
        job.consecutive_failures = 0
        # The newest stamp: an event that committed late may be counted after a newer one.
        job.last_success_timestamp = max(job.last_success_timestamp or 0.0, event.timestamp)
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
