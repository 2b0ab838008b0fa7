"""What the run retention needs of Dagster's storage beyond its public API.

- The instance's key-value store (`RunStorage.get_cursor_values` / `set_cursor_values`, the table
  Dagster's daemons keep their own cursors in): the retention's ledger lives there, in the run
  storage itself, so it is as durable as the runs it accounts for and one write records it.
  `set_cursor_values` is given one key at a time: with several, an existing key makes its insert
  fail and the update that follows skips the keys that did not exist.
- The files of one run's events on SQLite (`SqliteEventLogStorage.path_for_shard`): Dagster's
  `delete_run` empties a run's database file but leaves the file, about 160 kB a run. On the
  local instance's single event database (`slot_storage.LocalEventLogStorage`), the bytes of a
  run's events (`SqlEventLogStorageTable`) and the pages its deletion frees (`reclaim_space`).
- A successful run's detail events, removed a day after the run (`delete_events`): the rows of
  `SqlEventLogStorageTable` of given types, through the storage's `run_connection(run_id)` (the
  one database on the local instance and PostgreSQL, the run's own file on a home with a database
  per run). Dagster has no public call that deletes some of a run's events.
- For `nova-assets history size`: the number of stored events (`SqlEventLogStorageTable`, read
  through the storage's `index_connection()`), and on PostgreSQL the database's size (through the
  run storage's `connect()`).

Every name is looked up on the storage object at run time, so a storage without it (PostgreSQL
has no per-run files) simply has nothing to remove; `nova_assets_tests/test_internals.py` checks
that the SQLite storage still has both.
"""

from collections.abc import Collection
from pathlib import Path

import dagster as dg
import sqlalchemy as db
from dagster._core.storage.event_log.schema import SqlEventLogStorageTable

SQLITE_SIDE_FILES = ("", "-wal", "-shm", "-journal")
"""A SQLite database file and the files SQLite may keep beside it."""


def read_value(instance: dg.DagsterInstance, key: str) -> str | None:
    """The value stored under `key` in the instance's key-value store, if any."""
    return instance.run_storage.get_cursor_values({key}).get(key)


def write_value(instance: dg.DagsterInstance, key: str, value: str) -> None:
    """Store `value` under `key`, in one statement of the run storage."""
    instance.run_storage.set_cursor_values({key: value})


def event_files(instance: dg.DagsterInstance, run_id: str) -> list[Path]:
    """The files holding one run's events, on an event log that keeps a file per run."""
    path_for_shard = getattr(instance.event_log_storage, "path_for_shard", None)
    if path_for_shard is None:
        return []
    database = Path(path_for_shard(run_id))
    candidates = (database.with_name(database.name + suffix) for suffix in SQLITE_SIDE_FILES)
    return [path for path in candidates if path.is_file()]


def event_bytes(instance: dg.DagsterInstance, run_id: str) -> int:
    """Bytes of one run's stored events (their serialized entries), on a SQL event log."""
    with instance.event_log_storage.index_connection() as conn:  # type: ignore[attr-defined]
        query = db.select(db.func.sum(db.func.length(SqlEventLogStorageTable.c.event))).where(
            SqlEventLogStorageTable.c.run_id == run_id
        )
        return int(conn.execute(query).scalar() or 0)


def delete_events(
    instance: dg.DagsterInstance, run_id: str, types: Collection[str], *, dry_run: bool = False
) -> int:
    """Delete one run's events of `types` (`DagsterEventType` values) and its plain log lines.

    Returns the bytes of their serialized entries; dry, deletes nothing. None of these types is
    an asset event, so the asset index and its tags are left as they are.
    """
    table = SqlEventLogStorageTable
    chosen = db.and_(
        table.c.run_id == run_id,
        db.or_(table.c.dagster_event_type.in_(list(types)), table.c.dagster_event_type.is_(None)),
    )
    with instance.event_log_storage.run_connection(run_id) as conn:  # type: ignore[attr-defined]
        size = int(
            conn.execute(
                db.select(db.func.sum(db.func.length(table.c.event))).where(chosen)
            ).scalar()
            or 0
        )
        if not dry_run:
            conn.execute(table.delete().where(chosen))
    return size


def reclaim(instance: dg.DagsterInstance) -> int:
    """Give deleted events' pages back to the disk, where the event log can; the bytes freed."""
    reclaim_space = getattr(instance.event_log_storage, "reclaim_space", None)
    return int(reclaim_space()) if reclaim_space is not None else 0


def event_count(instance: dg.DagsterInstance) -> int:
    """Events the event log's index lists (on SQLite, not those only in each run's own file)."""
    with instance.event_log_storage.index_connection() as conn:  # type: ignore[attr-defined]
        query = db.select(db.func.count()).select_from(SqlEventLogStorageTable)
        return int(conn.execute(query).scalar() or 0)


def database_bytes(instance: dg.DagsterInstance) -> int | None:
    """The size of the PostgreSQL database the instance stores in; None for other storage."""
    with instance.run_storage.connect() as conn:  # type: ignore[attr-defined]
        if conn.dialect.name != "postgresql":
            return None
        return int(conn.execute(db.text("SELECT pg_database_size(current_database())")).scalar())
