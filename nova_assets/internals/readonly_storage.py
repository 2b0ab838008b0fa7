"""Dagster's SQLite storages opened read-only: no file is created, changed or migrated.

Dagster opens SQLite to write: it creates a database that is missing and stamps its schema, and
even a read in WAL mode leaves `-wal` and `-shm` files beside the database. These subclasses read
what is there and nothing else (`readonly_instance` chooses them from the home's config):

- every connection opens the file by URI, read-only: `mode=ro` while a writer has the database
  open (its `-wal` and `-shm` files exist, and SQLite's shared memory keeps the reads consistent
  with its writes), else `immutable=1`, which creates no file at all;
- `check_database` says what is wrong with a file before Dagster opens it (missing, not a file,
  empty, not SQLite, without its table): `UnreadableInstance`;
- a run whose own event file is gone reads as a run without events, from an empty database in
  memory, where Dagster would have created the file; a `runs.db` never created reads as no runs.

Dagster's private names used: `SqliteRunStorage` (its constructor), `InMemoryRunStorage`,
`SqliteEventLogStorage` (its constructor, `path_for_shard`, `conn_string_for_shard`, `_initdb`,
`_connect`), `ConsolidatedSqliteEventLogStorage` (its constructor, `get_db_path`, `_connect`),
`SqliteScheduleStorage` (its constructor) and `SqlEventLogStorageMetadata`;
`nova_assets_tests/test_internals_health.py` checks each of them.
"""

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import sqlalchemy as db
from dagster._core.storage.event_log import (
    ConsolidatedSqliteEventLogStorage,
    SqliteEventLogStorage,
)
from dagster._core.storage.event_log.schema import SqlEventLogStorageMetadata
from dagster._core.storage.runs import InMemoryRunStorage, SqliteRunStorage
from dagster._core.storage.schedules import SqliteScheduleStorage
from sqlalchemy.pool import NullPool, StaticPool

SQLITE_HEADER = b"SQLite format 3\x00"
WAL_FORMAT = 2
"""Bytes 18 and 19 of a SQLite header: 2 for a database in WAL mode, 1 for a rollback journal."""
INDEX_SHARD = "index"


class UnreadableInstance(Exception):
    """The folder holds no Dagster instance that can be read; the message says what is wrong."""


# --- SQLite files, opened read-only ---------------------------------------------------------------


def _read_only_uri(path: Path) -> str:
    """The SQLite URI that reads `path` without creating or changing any file.

    A WAL database read with `mode=ro` needs its `-shm` and `-wal` files, and creates them (and
    leaves them) when they are missing; they exist only while a writer has it open. So: `mode=ro`
    when they exist or the database keeps a rollback journal, `immutable=1` when nobody writes.
    """
    with path.open("rb") as header:
        wal = header.read(20)[18:20] == bytes([WAL_FORMAT, WAL_FORMAT])
    side_files = all(path.with_name(path.name + s).exists() for s in ("-wal", "-shm"))
    mode = "immutable=1" if wal and not side_files else "mode=ro"
    return f"file:{quote(str(path.resolve()))}?{mode}"


def read_only_url(path: Path) -> db.engine.URL:
    """A SQLAlchemy URL of `path` opened read-only (see `_read_only_uri`)."""
    uri, _, query = _read_only_uri(path).partition("?")
    key, _, value = query.partition("=")
    # A URL object: its database part reaches SQLite as written, never unquoted on the way.
    return db.engine.URL.create("sqlite", database=uri, query={key: value, "uri": "true"})


def check_database(path: Path, table: str) -> None:
    """Raise `UnreadableInstance` unless `path` is a SQLite database holding `table`."""
    if not path.exists():
        raise UnreadableInstance(f"{path} does not exist")
    if not path.is_file():
        raise UnreadableInstance(f"{path} is not a file")
    try:
        if path.stat().st_size == 0:
            raise UnreadableInstance(f"{path} is empty (0 bytes)")
        with path.open("rb") as file:
            header = file.read(len(SQLITE_HEADER))
        if header != SQLITE_HEADER:
            raise UnreadableInstance(f"{path} is not a SQLite database")
        with closing(sqlite3.connect(_read_only_uri(path), uri=True)) as conn:
            tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    except (OSError, sqlite3.Error) as exc:
        raise UnreadableInstance(f"{path} cannot be read: {exc}") from exc
    if table not in tables:
        raise UnreadableInstance(f"{path} holds no `{table}` table: not a Dagster database")


def _engine(path: Path) -> db.engine.Engine:
    return db.create_engine(read_only_url(path), poolclass=NullPool)


@contextmanager
def _connection(path: Path) -> Iterator[db.engine.Connection]:
    engine = _engine(path)
    try:
        with engine.connect() as conn, conn.begin():
            yield conn
    finally:
        engine.dispose()


class ReadOnlySqliteRunStorage(SqliteRunStorage):
    """Dagster's SQLite run storage on an existing `runs.db`, every connection read-only."""

    def __init__(self, path: str, inst_data: Any = None) -> None:
        self._path = Path(path)
        super().__init__(str(read_only_url(self._path)), inst_data)

    @classmethod
    def config_type(cls) -> Any:
        return {"path": str}

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Any) -> "ReadOnlySqliteRunStorage":
        return cls(inst_data=inst_data, **config_value)

    @contextmanager
    def connect(self) -> Iterator[db.engine.Connection]:
        with _connection(self._path) as conn:
            yield conn


class EmptyRunStorage(InMemoryRunStorage):
    """No runs: the run storage of an instance whose `runs.db` was never created.

    Dagster's in-memory run storage, made loadable from a config file.
    """

    def __init__(self, inst_data: Any = None) -> None:
        super().__init__()
        self._inst_data = inst_data

    @property
    def inst_data(self) -> Any:
        return self._inst_data

    @classmethod
    def config_type(cls) -> Any:
        return {}

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Any) -> "EmptyRunStorage":
        return cls(inst_data)


class ReadOnlySqliteEventLogStorage(SqliteEventLogStorage):
    """Dagster's SQLite event log (an index and a database per run), read-only.

    The index must exist (checked before). A run whose database is gone reads as one without
    events, from an empty database in memory, where Dagster would have created the file.
    """

    def __init__(self, base_dir: str, inst_data: Any = None) -> None:
        super().__init__(base_dir, inst_data)  # the index exists: it neither creates nor indexes
        self._empty = db.create_engine(
            "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
        SqlEventLogStorageMetadata.create_all(self._empty)

    @classmethod
    def from_config_value(
        cls, inst_data: Any, config_value: Any
    ) -> "ReadOnlySqliteEventLogStorage":
        return cls(inst_data=inst_data, **config_value)

    def conn_string_for_shard(self, shard_name: str) -> Any:
        return read_only_url(Path(self.path_for_shard(shard_name)))

    def _initdb(self, engine: Any, for_index_shard: bool = False) -> None:
        """Nothing to create or stamp: the databases are read as they are."""

    @contextmanager
    def _connect(self, shard: str) -> Iterator[db.engine.Connection]:
        path = Path(self.path_for_shard(shard))
        if not path.is_file():
            with self._empty.connect() as conn, conn.begin():
                yield conn
            return
        with _connection(path) as conn:
            yield conn

    def dispose(self) -> None:
        super().dispose()
        self._empty.dispose()


class ReadOnlyConsolidatedSqliteEventLogStorage(ConsolidatedSqliteEventLogStorage):
    """Dagster's single-file SQLite event log (`event_log.db`), read-only."""

    @classmethod
    def from_config_value(
        cls, inst_data: Any, config_value: Any
    ) -> "ReadOnlyConsolidatedSqliteEventLogStorage":
        return cls(inst_data=inst_data, **config_value)

    @contextmanager
    def _connect(self) -> Iterator[db.engine.Connection]:
        with _connection(Path(self.get_db_path())) as conn:
            yield conn

    def has_table(self, table_name: str) -> bool:
        with self._connect() as conn:
            return bool(conn.dialect.has_table(conn, table_name))


class ReadOnlySqliteScheduleStorage(SqliteScheduleStorage):
    """Dagster's SQLite schedule storage, read-only; never opened unless read (health does not)."""

    def __init__(self, path: str, inst_data: Any = None) -> None:
        self._path = Path(path)
        super().__init__(f"sqlite:///{quote(path)}", inst_data)

    @classmethod
    def config_type(cls) -> Any:
        return {"path": str}

    @classmethod
    def from_config_value(
        cls, inst_data: Any, config_value: Any
    ) -> "ReadOnlySqliteScheduleStorage":
        return cls(inst_data=inst_data, **config_value)

    @contextmanager
    def connect(self) -> Iterator[db.engine.Connection]:
        check_database(self._path, "jobs")
        with _connection(self._path) as conn:
            yield conn
