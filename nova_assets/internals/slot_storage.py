"""The local instance's event log: one SQLite database, with pool slots taken one at a time.

**One database.** Dagster's default SQLite event log keeps a database per run beside an index,
about 160 kB a run even for thirty events (the schema's empty pages), and copies the asset events
into the index: at `make dev`'s 4,800 runs a day a week of history would be about 7 GB. Here every
run's events go into one database, `event_log.db` (Dagster's `ConsolidatedSqliteEventLogStorage`),
created with `auto_vacuum = INCREMENTAL` so that the pages of deleted runs can be given back to the
disk (`reclaim_space`, which the run retention calls after each page it deletes). Dagster watches
that database for the UI's live run view by the file's modification, but in WAL mode a write
reaches the file only at a checkpoint: while any other process has it open, the UI would miss new
events. It is watched by polling instead, as Dagster does on PostgreSQL.

**Slot claims one process at a time.** Dagster claims a pool slot by selecting a free slot row
`FOR UPDATE` and then writing its run into it. PostgreSQL locks the row between the two; SQLite
ignores `FOR UPDATE`, so two processes that claim at the same instant (two `dagster job
execute`, two runs the daemon launched together) can both read the one free slot and both take
it, and two steps then use the embedded engine at once. Here every claim and release of a slot
holds an exclusive lock on a file beside the database, so they happen one process at a time.
The production instance (PostgreSQL) needs none of this.

A step that finds no free slot is also told when to ask again (the claim's `sleep_interval`,
which Dagster's executors honour): after 0.2 s, and later the longer it has waited, up to 5 s.
Dagster's own schedule for a claim without one (1 s, then 10 % more each time) leaves the one
slot idle for half a second on average each time it passes from one run's step to the next: the
every-minute runs of one tick take it in turn.

It subclasses Dagster's private `ConsolidatedSqliteEventLogStorage` (its constructor,
`_base_dir`, `_init_db`, `get_db_path`, `watch`, `end_watch`, `dispose`, and the three slot
methods it wraps) and uses its `SqlPollingEventWatcher`. An instance written before keeps Dagster's
database-per-run layout (`SlotLockedSqliteEventLogStorage`, the same slot locks on
`SqliteEventLogStorage`) until its folder is removed (docs/decisions.md). Only the local
instance names them (`nova-assets instance` writes it into DAGSTER_HOME/dagster.yaml);
`nova_assets_tests/test_internals.py` checks each of those.
"""

import fcntl
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dagster._core.storage.event_log import (
    ConsolidatedSqliteEventLogStorage,
    SqliteEventLogStorage,
)
from dagster._core.storage.event_log.polling_event_watcher import SqlPollingEventWatcher

LOCK_FILE = ".pool-slots.lock"
RECLAIM_PAGES = 4096
"""Free pages one `reclaim_space` gives back at most (16 MiB): a bounded hold of the database."""
RECLAIM_WAIT_S = 0.5
"""How long `reclaim_space` waits for the database before leaving the space to the next call."""
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


class _SlotLocks:
    """Pool-slot claims and releases under a file lock in the storage's folder (`_base_dir`)."""

    _base_dir: str

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
            status = super().claim_concurrency_slot(*args, **kwargs)  # type: ignore[misc]
        if status.is_claimed:
            return status
        return status.with_sleep_interval(claim_retry_s(status.enqueued_timestamp))

    def free_concurrency_slot_for_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._slots_locked():
            return super().free_concurrency_slot_for_step(*args, **kwargs)  # type: ignore[misc]

    def free_concurrency_slots_for_run(self, *args: Any, **kwargs: Any) -> Any:
        with self._slots_locked():
            return super().free_concurrency_slots_for_run(*args, **kwargs)  # type: ignore[misc]


class LocalEventLogStorage(_SlotLocks, ConsolidatedSqliteEventLogStorage):
    """Every run's events in one SQLite database that gives deleted runs' pages back."""

    _watcher: SqlPollingEventWatcher | None = None

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Any) -> "LocalEventLogStorage":
        return cls(inst_data=inst_data, **config_value)

    def _init_db(self) -> None:
        # `auto_vacuum` only takes effect before the first table is created.
        Path(self._base_dir).mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.get_db_path())
        try:
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.execute("PRAGMA journal_mode = WAL")
        finally:
            conn.close()
        super()._init_db()

    def reclaim_space(self) -> int:
        """Give the free pages of deleted runs back to the disk; the bytes the files shrank by.

        Waits at most `RECLAIM_WAIT_S` for the database and frees at most `RECLAIM_PAGES`; what
        is left goes at the next call.
        """
        path = Path(self.get_db_path())
        files = [path, path.with_name(path.name + "-wal")]
        before = sum(f.stat().st_size for f in files if f.exists())
        conn = sqlite3.connect(path, timeout=RECLAIM_WAIT_S, isolation_level=None)
        try:
            # As a script: Python's `execute` takes a single step of it, which frees one page.
            conn.executescript(f"PRAGMA incremental_vacuum({RECLAIM_PAGES});")
            # Moves the freed pages into the database file, which shrinks, without waiting for
            # readers or blocking writers.
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.OperationalError:  # busy: the next call reclaims it
            pass
        finally:
            conn.close()
        after = sum(f.stat().st_size for f in files if f.exists())
        return max(0, before - after)

    def watch(self, run_id: str, cursor: str | None, callback: Any) -> None:
        if self._watcher is None:
            self._watcher = SqlPollingEventWatcher(self)
        self._watcher.watch_run(run_id, cursor, callback)

    def end_watch(self, run_id: str, handler: Any) -> None:
        if self._watcher is not None:
            self._watcher.unwatch_run(run_id, handler)

    def dispose(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        super().dispose()


class SlotLockedSqliteEventLogStorage(_SlotLocks, SqliteEventLogStorage):
    """Dagster's database-per-run event log with the same slot locks: instances written before."""

    @classmethod
    def from_config_value(
        cls, inst_data: Any, config_value: Any
    ) -> "SlotLockedSqliteEventLogStorage":
        return cls(inst_data=inst_data, **config_value)
