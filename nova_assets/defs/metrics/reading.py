"""The run status events in storage order, and the ones that committed after a higher id was read.

The metrics read the event log's RUN_SUCCESS and RUN_FAILURE events past a position, a storage
id. But a storage id is taken when an event's row is inserted, not when its transaction commits:
on PostgreSQL, event A can take id 10 and event B id 11, B commits first, and a reader that saw 11
and moved past it would never see A. (SQLite lets one writer in at a time, so there ids commit in
order; the same code serves both.) So the reader looks back as well as forward (`LateCommits`):

- Each evaluation first runs a *recheck pass*, or goes on with the one in progress: the status
  events up to the position whose timestamps are after a horizon, in storage order, a page at a
  time. Those not counted yet (by storage id) are the late commits, and are counted now.
- When a pass completes, the next one's horizon is the time that pass began, less
  COMMIT_WINDOW_S. An event is stamped when it is made, before its row is inserted, and commits
  within COMMIT_WINDOW_S of that stamp. Take the first pass that begins after event A commits:
  the pass before it began before the commit, so before A's stamp plus COMMIT_WINDOW_S, and its
  start less COMMIT_WINDOW_S, the horizon, is before A's stamp: the pass finds A.
- `recent` holds the storage id and stamp of every counted event stamped after the horizon, so
  nothing is counted twice; it is pruned as the horizon moves and holds at most RECENT_LIMIT ids
  (beyond that, the horizon moves up to the oldest one kept).
"""

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

EVENTS_PER_PAGE = 1000
"""Status events of each kind read per query."""
COMMIT_WINDOW_S = 300.0
"""The longest an event may take from its stamp to its commit, clock differences between the
hosts that stamp and that read included. Events stamped this long before a pass began are not
looked at again."""
RECENT_LIMIT = 10_000
"""Counted events remembered for the recheck: far more than finish within COMMIT_WINDOW_S."""
PRUNE_MARGIN_S = 1.0
"""Ids are forgotten only once stamped this far below the horizon: the event log stores stamps
to the microsecond, so an event right at the horizon may compare either way."""
STATUS_EVENTS = {
    dg.DagsterEventType.RUN_SUCCESS: "success",
    dg.DagsterEventType.RUN_FAILURE: "failure",
}


@dataclass(frozen=True)
class StatusEvent:
    """One run status event: where it is in the log, what it says, and when it was stamped."""

    storage_id: int
    status: str
    """"success" or "failure"."""
    run_id: str
    timestamp: float


def status_events(
    instance: dg.DagsterInstance,
    after: int,
    *,
    through: int | None = None,
    stamped_after: float | None = None,
) -> tuple[list[StatusEvent], bool]:
    """The status events with storage ids in (`after`, `through`], in storage order, one page.

    `stamped_after` keeps only events stamped after it. Returns the events and whether more
    follow (a page was full: the events returned run up to the last id both kinds reached).
    """
    events: list[StatusEvent] = []
    bound: int | None = None
    for event_type, status in STATUS_EVENTS.items():
        records = instance.fetch_run_status_changes(
            dg.RunStatusChangeRecordsFilter(
                event_type=event_type,
                after_storage_id=after,
                before_storage_id=None if through is None else through + 1,
                after_timestamp=stamped_after or None,
            ),
            limit=EVENTS_PER_PAGE,
            ascending=True,
        ).records
        events += [StatusEvent(r.storage_id, status, r.run_id, r.timestamp) for r in records]
        if len(records) == EVENTS_PER_PAGE:
            last = records[-1].storage_id
            bound = last if bound is None else min(bound, last)
    events.sort(key=lambda event: event.storage_id)
    return [e for e in events if bound is None or e.storage_id <= bound], bound is not None


@dataclass
class LateCommits:
    """The recheck's state, kept in the metrics cursor: horizon, pass in progress, recent ids."""

    horizon: float = 0.0
    """The pass in progress looks at events stamped after this (unix time)."""
    pass_started: float | None = None
    """When the pass in progress began; None between passes."""
    pass_after: int = 0
    """The storage id the pass in progress has reached."""
    recent: dict[int, float] = field(default_factory=dict)
    """Storage id → stamp of each counted event stamped after the horizon."""

    def begin_pass(self, now: float) -> None:
        """Begin a pass unless one is in progress (it goes on where it stopped)."""
        if self.pass_started is None:
            self.pass_started, self.pass_after = now, 0

    def finish_pass(self) -> None:
        """The pass reached the position: the next one looks back from when this one began."""
        if self.pass_started is not None:
            self.horizon = max(self.horizon, self.pass_started - COMMIT_WINDOW_S)
        self.pass_started, self.pass_after = None, 0
        self._prune()

    def counted(self, event: StatusEvent) -> bool:
        return event.storage_id in self.recent

    def remember(self, event: StatusEvent) -> None:
        """Note a counted event, if a later pass could come across it."""
        if event.timestamp > self.horizon - PRUNE_MARGIN_S:
            self.recent[event.storage_id] = event.timestamp

    def bound_size(self) -> None:
        """Keep at most RECENT_LIMIT ids, the newest; the horizon moves above the others."""
        if len(self.recent) <= RECENT_LIMIT:
            return
        ordered = sorted(self.recent.items(), key=lambda item: item[1])
        dropped, kept = ordered[:-RECENT_LIMIT], ordered[-RECENT_LIMIT:]
        # A dropped event must never come up in a pass again: the horizon goes past its stamp,
        # by the margin an event at the horizon may compare with.
        self.horizon = max(self.horizon, dropped[-1][1] + PRUNE_MARGIN_S)
        self.recent = dict(kept)
        self._prune()

    def _prune(self) -> None:
        floor = self.horizon - PRUNE_MARGIN_S
        self.recent = {k: v for k, v in self.recent.items() if v > floor}

    def to_json(self) -> dict[str, Any]:
        return {
            "horizon": self.horizon,
            "pass_started": self.pass_started,
            "pass_after": self.pass_after,
            "recent": [[k, v] for k, v in sorted(self.recent.items())],
        }

    @classmethod
    def from_json(cls, stored: Mapping[str, Any]) -> "LateCommits":
        started = stored["pass_started"]
        recent: Sequence[Sequence[Any]] = stored["recent"]
        return cls(
            horizon=float(stored["horizon"]),
            pass_started=None if started is None else float(started),
            pass_after=int(stored["pass_after"]),
            recent={int(k): float(v) for k, v in recent},
        )

    @classmethod
    def from_now(cls) -> "LateCommits":
        """For a count kept before the recheck existed: nothing stamped until now is rechecked.

        Its ids were not remembered, so an event counted before would be counted again.
        """
        return cls(horizon=time.time())
