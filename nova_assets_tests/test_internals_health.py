"""Contract tests for the read-only instance (`nova_assets.internals.readonly_*`).

One test per private Dagster name the read-only storages rely on: it exists, with the signature
the subclass calls and the behaviour it overrides (a run storage and a schedule storage built from
a connection string; an event log whose every connection goes through `_connect`, and whose
constructor creates nothing when its index exists; the in-memory storages of an instance never
opened; the PostgreSQL storage's config and constructor). And the two ways a SQLite file is read:
`immutable` when nobody writes, `mode=ro` beside a writer that holds the database open, whose
latest writes are then seen; a read a writer disturbed starts over.
"""

import inspect
import sqlite3

import dagster as dg
import pytest
from dagster._core.storage.event_log import (
    ConsolidatedSqliteEventLogStorage,
    InMemoryEventLogStorage,
    SqliteEventLogStorage,
)
from dagster._core.storage.event_log.schema import SqlEventLogStorageMetadata
from dagster._core.storage.runs import InMemoryRunStorage, SqliteRunStorage
from dagster._core.storage.schedules import SqliteScheduleStorage

from nova_assets.internals import readonly_postgres
from nova_assets.internals.readonly_instance import READ_ATTEMPTS, open_read_only, read_instance
from nova_assets.internals.readonly_storage import (
    EmptyRunStorage,
    ReadOnlySqliteEventLogStorage,
    read_only_url,
)
from nova_assets.local.instance import write_instance
from nova_assets_tests.history import history_instance
from nova_assets_tests.layouts import write_per_run_instance


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_the_sqlite_run_and_schedule_storages_are_built_from_a_connection_string():
    assert _parameters(SqliteRunStorage.__init__) == ["self", "conn_string", "inst_data"]
    assert _parameters(SqliteScheduleStorage.__init__) == ["self", "conn_string", "inst_data"]
    assert inspect.isfunction(SqliteRunStorage.connect)
    assert inspect.isfunction(SqliteScheduleStorage.connect)


def test_the_in_memory_storages_start_empty_and_load_from_a_config():
    assert _parameters(InMemoryRunStorage.__init__) == ["self", "preload"]
    assert EmptyRunStorage.from_config_value(None, {}).get_runs_count() == 0
    events = InMemoryEventLogStorage.from_config_value(None, {})
    assert not any(events.get_latest_materialization_events([dg.AssetKey("a")]).values())


def test_the_sqlite_event_log_routes_every_connection_through_connect(tmp_path):
    assert _parameters(SqliteEventLogStorage.__init__) == ["self", "base_dir", "inst_data"]
    assert _parameters(SqliteEventLogStorage._initdb) == ["self", "engine", "for_index_shard"]  # noqa: SLF001
    assert _parameters(SqliteEventLogStorage._connect) == ["self", "shard"]  # noqa: SLF001
    assert _parameters(SqliteEventLogStorage.conn_string_for_shard) == ["self", "shard_name"]
    write_per_run_instance(tmp_path)
    base = tmp_path / "history" / "runs"
    before = sorted(base.iterdir())
    storage = ReadOnlySqliteEventLogStorage(str(base))
    # The constructor found the index: nothing created, nothing indexed.
    assert sorted(base.iterdir()) == before
    assert storage.path_for_shard("r") == str(base / "r.db")
    # A run's events are read through `_connect` (a run without a file reads as no events).
    assert storage.get_records_for_run("no-such-run").records == []
    assert storage.has_table("event_logs")
    assert sorted(base.iterdir()) == before


def test_the_consolidated_event_log_names_its_file_and_connects_in_one_place(tmp_path):
    assert _parameters(ConsolidatedSqliteEventLogStorage.__init__) == [
        "self",
        "base_dir",
        "inst_data",
    ]
    assert _parameters(ConsolidatedSqliteEventLogStorage._connect) == ["self"]  # noqa: SLF001
    with history_instance(tmp_path):
        pass
    storage = ConsolidatedSqliteEventLogStorage(str(tmp_path / "history"))
    assert storage.get_db_path() == str(tmp_path / "history" / "event_log.db")
    assert set(SqlEventLogStorageMetadata.tables) >= {"event_logs", "asset_keys"}


def test_a_database_a_writer_holds_open_is_read_with_its_latest_writes(tmp_path):
    write_instance(tmp_path, 5)
    runs = tmp_path / "history" / "runs.db"
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        holder = sqlite3.connect(runs)  # keeps the -wal and -shm files while it is open
        try:
            holder.execute("SELECT count(*) FROM runs").fetchall()
            instance.add_run(dg.DagsterRun(job_name="a_job"))
            assert "mode=ro" in str(read_only_url(runs))
            names = sorted(path.name for path in runs.parent.iterdir())
            with open_read_only(tmp_path) as reader:
                assert reader.get_runs_count() == 1
            assert sorted(path.name for path in runs.parent.iterdir()) == names
        finally:
            holder.close()
    assert not runs.with_name("runs.db-wal").exists()
    assert "immutable=1" in str(read_only_url(runs))
    with open_read_only(tmp_path) as reader:
        assert reader.get_runs_count() == 1


def test_the_postgres_storage_takes_its_config_and_never_creates_tables():
    config = readonly_postgres.pg_config()
    assert {"postgres_url", "postgres_db", "should_autocreate_tables"} <= set(config)
    assert _parameters(readonly_postgres.DagsterPostgresStorage.__init__) == [
        "self",
        "postgres_url",
        "should_autocreate_tables",
        "inst_data",
        "token_provider",
    ]
    url = "postgresql+psycopg2://u:p@db:5432/dagster?options=-c%20search_path%3Dx"
    assert readonly_postgres.pg_url_from_config({"postgres_url": url}) == url
    assert readonly_postgres.get_token_provider_from_config({"postgres_url": url}) is None
    read_only = readonly_postgres.read_only_url(url)
    assert read_only.query["options"] == "-c search_path=x -c default_transaction_read_only=on"
    assert read_only.query["connect_timeout"] == "3"


def test_a_read_a_writer_disturbed_starts_over_and_a_lasting_fault_is_reported(tmp_path):
    """SQLite's "malformed" under a read that began `immutable` is retried; other faults are not."""
    write_instance(tmp_path, 5)
    calls: list[int] = []

    def disturbed_once(instance: dg.DagsterInstance) -> int:
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.DatabaseError("database disk image is malformed")
        return instance.get_runs_count()

    assert read_instance(tmp_path, disturbed_once) == 0
    assert len(calls) == 2

    def always(instance: dg.DagsterInstance) -> int:
        calls.append(1)
        raise sqlite3.DatabaseError("database disk image is malformed")

    calls.clear()
    with pytest.raises(sqlite3.DatabaseError):
        read_instance(tmp_path, always)
    assert len(calls) == READ_ATTEMPTS

    def wrong(instance: dg.DagsterInstance) -> int:
        calls.append(1)
        raise ValueError("not SQLite's")

    calls.clear()
    with pytest.raises(ValueError):
        read_instance(tmp_path, wrong)
    assert len(calls) == 1
