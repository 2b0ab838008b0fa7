"""The local instance's event log: Dagster's SQLite storage, with pool slots taken one at a time.

Dagster claims a pool slot by selecting a free slot row `FOR UPDATE` and then writing its run into
it. PostgreSQL locks the row between the two; SQLite ignores `FOR UPDATE`, so two processes that
claim at the same instant (two `dagster job execute`, two runs the daemon launched together) can
both read the one free slot and both take it, and two steps then use the embedded engine at once.
Here every claim and release of a slot holds an exclusive lock on a file beside the database, so
they happen one process at a time. The production instance (PostgreSQL) needs none of this.
"""

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dagster._core.storage.event_log import SqliteEventLogStorage

LOCK_FILE = ".pool-slots.lock"


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
            return super().claim_concurrency_slot(*args, **kwargs)

    def free_concurrency_slot_for_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._slots_locked():
            return super().free_concurrency_slot_for_step(*args, **kwargs)

    def free_concurrency_slots_for_run(self, *args: Any, **kwargs: Any) -> Any:
        with self._slots_locked():
            return super().free_concurrency_slots_for_run(*args, **kwargs)
