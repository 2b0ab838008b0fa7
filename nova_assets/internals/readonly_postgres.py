"""A PostgreSQL instance's storage opened for reading only (`readonly_instance`'s PostgreSQL half).

Dagster's `DagsterPostgresStorage` with three differences, for a probe:

- its tables are never created (`should_autocreate_tables` off), and every transaction is
  read-only (`default_transaction_read_only`), so the server refuses any write;
- one connection is tried first with a short connect timeout: an unreachable server is one
  answer (`UnreadableInstance`) in a few seconds, not Dagster's retries with a warning each;
- a database without Dagster's tables is not an instance.

The config is the home's own `storage: postgres:` section (its `{env: …}` values resolved by
Dagster). Kept apart from `readonly_instance` so that only a PostgreSQL instance imports
`dagster_postgres`.
"""

from typing import Any

import sqlalchemy as db
from dagster._core.storage.config import pg_config
from dagster_postgres import DagsterPostgresStorage
from dagster_postgres.utils import (
    create_pg_engine,
    get_token_provider_from_config,
    pg_url_from_config,
)
from sqlalchemy.pool import NullPool

from nova_assets.internals.readonly_storage import UnreadableInstance

CONNECT_TIMEOUT_S = 3
READ_ONLY = "-c default_transaction_read_only=on"
REQUIRED_TABLES = ("runs", "event_logs")


def read_only_url(url: str) -> db.engine.URL:
    """`url` with a connect timeout and read-only transactions (its own options kept)."""
    parsed = db.engine.make_url(url)
    options = " ".join(filter(None, [str(parsed.query.get("options") or ""), READ_ONLY]))
    query = {"options": options}
    if "connect_timeout" not in parsed.query:
        query["connect_timeout"] = str(CONNECT_TIMEOUT_S)
    return parsed.update_query_dict(query)


def _where(url: db.engine.URL) -> str:
    return f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"


def check_server(url: db.engine.URL, token_provider: Any = None) -> None:
    """One connection: the server answers and holds Dagster's tables, else `UnreadableInstance`."""
    try:
        engine = create_pg_engine(
            url.render_as_string(hide_password=False), token_provider, poolclass=NullPool
        )
    except ImportError as exc:  # the URL's driver (`postgresql+psycopg2://`) is not installed
        raise UnreadableInstance(f"PostgreSQL URL for {_where(url)}: {exc}") from exc
    try:
        with engine.connect() as conn:
            tables = set(db.inspect(conn).get_table_names())
    except db.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise UnreadableInstance(
            f"cannot reach PostgreSQL at {_where(url)}: {reason[0] if reason else exc}"
        ) from exc
    finally:
        engine.dispose()
    missing = [table for table in REQUIRED_TABLES if table not in tables]
    if missing:
        raise UnreadableInstance(
            f"PostgreSQL at {_where(url)} holds no Dagster instance (no table {missing[0]})"
        )


class ReadOnlyPostgresStorage(DagsterPostgresStorage):
    """`DagsterPostgresStorage` that never creates a table and whose transactions are read-only."""

    @classmethod
    def config_type(cls) -> Any:
        return pg_config()

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Any) -> "ReadOnlyPostgresStorage":
        url = read_only_url(pg_url_from_config(config_value))
        token_provider = get_token_provider_from_config(config_value)
        check_server(url, token_provider)
        return cls(
            postgres_url=url.render_as_string(hide_password=False),
            should_autocreate_tables=False,
            inst_data=inst_data,
            token_provider=token_provider,
        )
