"""A Dagster instance opened for reading only: nothing in its folder is created or changed.

`dg.DagsterInstance.from_config(home)` is made to run an instance, not to look at one: on a folder
that holds none it creates the SQLite databases (`history/runs.db`, `history/runs/index.db`,
`schedules/schedules.db`) and stamps their schema, and even on a whole instance every SQLite
connection leaves `-wal` and `-shm` files behind. An operator's tool must do neither
(docs/design.md §10). So the home's `dagster.yaml` is read, and a configuration of the same
storage is written in a temporary folder of its own, naming read-only classes instead:

- SQLite (`readonly_storage`): every database that exists must be a SQLite file with its table,
  else `UnreadableInstance` says what is wrong before Dagster opens anything. A database the
  config names but that was never created reads as empty: an instance configured (its
  `dagster.yaml` written) but never opened has never run. A folder with neither a `dagster.yaml`
  nor `history/runs.db` holds no instance.
- PostgreSQL (`readonly_postgres`): tables never created, every transaction read-only, and an
  unreachable server one answer at once.

The run launcher, run coordinator, compute logs and artifact storage of the home's config are
left out: reading needs none of them. Names Dagster's `InMemoryEventLogStorage` by module path
(the event log of a database never created).
"""

import os
import sqlite3
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
import yaml

from nova_assets.internals.readonly_storage import INDEX_SHARD, UnreadableInstance, check_database

__all__ = ["UnreadableInstance", "open_read_only", "read_instance"]

# --- the home's configuration, read and rewritten ----------------------------------------------


@dataclass(frozen=True)
class _Storage:
    """What to open instead of the home's storage: the config sections of the temporary file."""

    sections: Mapping[str, Any]


_HERE = "nova_assets.internals.readonly_storage"
_SHARDED = {"SqliteEventLogStorage", "SlotLockedSqliteEventLogStorage"}
_CONSOLIDATED = {"ConsolidatedSqliteEventLogStorage", "LocalEventLogStorage"}
_POSTGRES = {"PostgresRunStorage", "PostgresEventLogStorage", "PostgresScheduleStorage"}


def _value(value: Any, where: str) -> str:
    """A config string, or the environment variable it names (`{env: NAME}`)."""
    if isinstance(value, Mapping) and set(value) == {"env"}:
        name = str(value["env"])
        if not os.environ.get(name):
            raise UnreadableInstance(f"{where} names the environment variable {name}, not set")
        return os.environ[name]
    if not isinstance(value, str):
        raise UnreadableInstance(f"{where} is not a string")
    return value


def _section(module: str, cls: str, config: Mapping[str, Any]) -> dict[str, Any]:
    return {"module": module, "class": cls, "config": dict(config)}


def _postgres(config: Any) -> _Storage:
    module = "nova_assets.internals.readonly_postgres"
    return _Storage({"storage": {"custom": _section(module, "ReadOnlyPostgresStorage", config)}})


_EMPTY_EVENTS = _section("dagster._core.storage.event_log", "InMemoryEventLogStorage", {})
"""The event log of an instance whose databases were never created: no events."""


def _exists(path: Path) -> bool:
    """Whether `path` is there (a broken link too), so that `check_database` judges it."""
    return path.exists() or path.is_symlink()


def _sqlite(runs: Path, events: Mapping[str, Any], schedules: Path) -> _Storage:
    if _exists(runs):
        check_database(runs, "runs")
        run_storage = _section(_HERE, "ReadOnlySqliteRunStorage", {"path": str(runs)})
    else:  # configured but never opened: an instance that has never run
        run_storage = _section(_HERE, "EmptyRunStorage", {})
    return _Storage(
        {
            "run_storage": run_storage,
            "event_log_storage": events,
            "schedule_storage": _section(
                _HERE, "ReadOnlySqliteScheduleStorage", {"path": str(schedules)}
            ),
        }
    )


def _sharded(base_dir: Path) -> dict[str, Any]:
    index = base_dir / f"{INDEX_SHARD}.db"
    if not _exists(index):
        return _EMPTY_EVENTS
    check_database(index, "event_logs")
    return _section(_HERE, "ReadOnlySqliteEventLogStorage", {"base_dir": str(base_dir)})


def _consolidated(base_dir: Path) -> dict[str, Any]:
    database = base_dir / "event_log.db"
    if not _exists(database):
        return _EMPTY_EVENTS
    check_database(database, "event_logs")
    return _section(_HERE, "ReadOnlyConsolidatedSqliteEventLogStorage", {"base_dir": str(base_dir)})


def _class_section(config: Mapping[str, Any], key: str) -> tuple[str, Mapping[str, Any]] | None:
    section = config.get(key)
    if section is None:
        return None
    if not isinstance(section, Mapping) or "class" not in section:
        raise UnreadableInstance(f"dagster.yaml: `{key}` names no class")
    return str(section["class"]), section.get("config") or {}


def plan_storage(home: Path, config: Mapping[str, Any]) -> _Storage:
    """The read-only storage for the home's config; `UnreadableInstance` if there is none."""
    storage = config.get("storage")
    if storage is not None:
        if not isinstance(storage, Mapping) or len(storage) != 1:
            raise UnreadableInstance("dagster.yaml: `storage` names no storage")
        ((kind, body),) = storage.items()
        if kind == "postgres":
            return _postgres(body)
        if kind == "sqlite":
            base = Path(_value((body or {}).get("base_dir"), "storage.sqlite.base_dir"))
            return _sqlite(
                base / "history" / "runs.db",
                _sharded(base / "history" / "runs"),
                base / "schedules" / "schedules.db",
            )
        raise UnreadableInstance(f"dagster.yaml: `storage: {kind}` is not SQLite or PostgreSQL")

    run = _class_section(config, "run_storage")
    events = _class_section(config, "event_log_storage")
    if run is not None and run[0] in _POSTGRES:
        return _postgres(run[1])
    if run is not None and run[0] != "SqliteRunStorage":
        raise UnreadableInstance(f"dagster.yaml: the run storage {run[0]} is not SQLite")
    runs_dir = Path(_value(run[1]["base_dir"], "run_storage.base_dir")) if run else home / "history"
    if events is None:
        event_log = _sharded(home / "history" / "runs")
    elif events[0] in _SHARDED | _CONSOLIDATED:
        base = Path(_value(events[1].get("base_dir"), "event_log_storage.base_dir"))
        event_log = _sharded(base) if events[0] in _SHARDED else _consolidated(base)
    else:
        raise UnreadableInstance(f"dagster.yaml: the event log storage {events[0]} is not SQLite")
    return _sqlite(runs_dir / "runs.db", event_log, home / "schedules" / "schedules.db")


def _home_config(home: Path) -> dict[str, Any]:
    if not home.exists():
        raise UnreadableInstance(f"the instance folder {home} does not exist")
    if not home.is_dir():
        raise UnreadableInstance(f"{home} is not a folder")
    path = home / "dagster.yaml"
    if not path.exists():
        if not (home / "history" / "runs.db").exists():
            raise UnreadableInstance(
                f"{home} holds no Dagster instance (no dagster.yaml, no history/runs.db)"
            )
        return {}
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnreadableInstance(f"{path} cannot be read: {reason}") from exc
    if not isinstance(config, dict):
        raise UnreadableInstance(f"{path} is not a mapping of settings")
    return config


@contextmanager
def open_read_only(home: Path) -> Iterator[dg.DagsterInstance]:
    """The instance in `home`, for reading: no file in `home` is created or changed.

    Raises `UnreadableInstance` when the folder holds no instance that can be read (missing,
    empty, a database that is empty, corrupt or not a file, a server that does not answer).
    """
    storage = plan_storage(home, _home_config(home))
    with tempfile.TemporaryDirectory(prefix="nova-read-") as scratch:
        config = {**storage.sections, "telemetry": {"enabled": False}}
        (Path(scratch) / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        with dg.DagsterInstance.from_config(scratch) as instance:
            yield instance


READ_ATTEMPTS = 3
"""Reads of an instance a writer changed under them, before its file is reported unreadable."""
T = TypeVar("T")


def _from_sqlite(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, sqlite3.DatabaseError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def read_instance(home: Path, read: Callable[[dg.DagsterInstance], T]) -> T:
    """`read(instance)` on the instance in `home` opened read-only (`open_read_only`).

    A SQLite database nobody had open is read `immutable`: no lock, no file. Should a writer
    start in the middle and move a page, SQLite finds what it did not expect ("database disk
    image is malformed"); the read then starts over, and only a file that stays unreadable over
    `READ_ATTEMPTS` reads is reported.
    """
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            with open_read_only(home) as instance:
                return read(instance)
        except Exception as exc:
            if attempt == READ_ATTEMPTS or not _from_sqlite(exc):
                raise
    raise AssertionError("unreachable")  # the loop returns or raises
