"""The local instance's event log: Dagster's SQLite storage, with pool slots taken one at a time.

Dagster claims a pool slot by selecting a free slot row `FOR UPDATE` and then writing its run into
it. PostgreSQL locks the row between the two; SQLite ignores `FOR UPDATE`, so two processes that
claim at the same instant (two `dagster job execute`, two runs the daemon launched together) can
both read the one free slot and both take it, and two steps then use the embedded engine at once.
Here every claim and release of a slot holds an exclusive lock on a file beside the database, so
they happen one process at a time. The production instance (PostgreSQL) needs none of this.

A step that finds no free slot is also told when to ask again (the claim's `sleep_interval`,
which Dagster's executors honour): after 0.2 s, and later the longer it has waited, up to 5 s.
Dagster's own schedule for a claim without one (1 s, then 10 % more each time) leaves the one
slot idle for half a second on average each time it passes from one run's step to the next: the
every-minute runs of one tick take it in turn.

It subclasses Dagster's private `SqliteEventLogStorage` (its constructor, `_base_dir`, and the
three slot methods it wraps). Only the local instance names it (`nova-assets instance` writes it
into DAGSTER_HOME/dagster.yaml); `nova_assets_tests/test_internals.py` checks each of those.
"""

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dagster._core.storage.event_log import SqliteEventLogStorage

LOCK_FILE = ".pool-slots.lock"
FIRST_RETRY_S = 0.2
LAST_RETRY_S = 5.0
RETRY_PER_WAITED = 0.1
"""A waiting step asks again after this fraction of the time it has waited (within the bounds)."""


def claim_retry_s(enqueued: datetime | None, now: datetime | None = None) -> float:
    """How long a step that has waited since `enqueued` (UTC) sleeps before asking again."""
    if enqueued is None:
        return FIRST_RETRY_S
    if enqueued.tzinfo is None:  # SQLite's timestamps are UTC, without a zone
        enqueued = enqueued.replace(tzinfo=UTC)
    waited_s = ((now or datetime.now(UTC)) - enqueued).total_seconds()
    return min(LAST_RETRY_S, max(FIRST_RETRY_S, RETRY_PER_WAITED * waited_s))


class SlotLockedSqliteEventLogStorage(SqliteEventLogStorage):
    """`SqliteEventLogStorage` whose pool-slot claims and releases take a file lock."""

    @classmethod
    def from_config_value(
        cls, inst_data: Any, config_value: Any
    ) -> "SlotLockedSqliteEventLogStorage":
        return cls(inst_data=inst_data, **config_value)

    @contextmanager
    def _slots_locked(self) -> Iterator[None]:
        with (Path(self._base_dir) / LOCK_FILE).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def claim_concurrency_slot(self, *args: Any, **kwargs: Any) -> Any:
        with self._slots_locked():
            status = super().claim_concurrency_slot(*args, **kwargs)
        if status.is_claimed:
            return status
        return status.with_sleep_interval(claim_retry_s(status.enqueued_timestamp))

    def free_concurrency_slot_for_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._slots_locked():
            return super().free_concurrency_slot_for_step(*args, **kwargs)

    def free_concurrency_slots_for_run(self, *args: Any, **kwargs: Any) -> Any:
        with self._slots_locked():
            return super().free_concurrency_slots_for_run(*args, **kwargs)
