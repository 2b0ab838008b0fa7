"""ClickHouse through clickhouse-connect: the embedded chdb engine or a server over HTTP(S).

A server is reached with `clickhouse-connect` alone. The embedded engine (chdb) is the `local`
extra of the package, imported by clickhouse-connect only when a `chdb://` client is made, so a
production install without it loads and runs everything against a server. clickhouse-connect
itself (and pandas, which it imports) is imported on first connect, not when the code location
loads: together they are about half of the location's import time, and most Dagster processes
(the webserver, the daemon, a sensor's evaluation) never query ClickHouse.

The URL is read the way the settings judged it (`nova_assets.core.urls`), never left to the
library's own reading: the scheme in any case (`CHDB:///…`, `HTTPS://…`) picks the engine or the
protocol, and the embedded engine opens exactly the directory the settings validated.
"""

import importlib.util
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from pydantic import Field

from nova_assets.core.contract import clickhouse_error_code, within
from nova_assets.core.resources.base import CONNECT_TIMEOUT_S, QUERY_TIMEOUT_S, ClientResource
from nova_assets.core.settings import SettingsError
from nova_assets.core.urls import embedded_path, is_embedded, redact_url, scheme_of
from nova_assets.internals.pool_wait import fix_pool_wait

if TYPE_CHECKING:
    import pandas as pd
    from clickhouse_connect.driver.client import Client as ClickHouseClient

CLICKHOUSE_POOL = "clickhouse"
"""Dagster pool of every step that touches ClickHouse (one slot for the embedded engine)."""

# Every step on a pool of ours names it from here, so any process that can run one (a run's
# worker, `dagster job execute`, a test) has imported this module before its steps wait.
fix_pool_wait()

UNKNOWN_TABLE = 60
_ERROR_SCOPE = re.compile(r"\s+in scope\s+", re.IGNORECASE)
_NAME = re.compile(r"\w+")
SESSION_LOST_CODES = {372: "SESSION_NOT_FOUND", 373: "SESSION_IS_LOCKED"}
"""ClickHouse errors that mean the session is gone or taken, whatever the query."""

# chdb admits one process per data directory; another process holding it shows up as this error.
_CHDB_BUSY_MARKER = "Unable to open the chdb engine"

P = ParamSpec("P")
R = TypeVar("R")

GIB = 1 << 30
MAX_MEMORY_USAGE_BYTES = 4 * GIB
"""What one query may use on a server: about twice the heaviest query measured (deploy/README)."""
SERVER_WAITS_EXTRA_S = 10
"""The client waits this much longer than the server's own limit, so the server stops a long query
itself (TIMEOUT_EXCEEDED) rather than the client hanging up and leaving it running."""


def server_settings(
    query_timeout_s: int = QUERY_TIMEOUT_S, max_memory_bytes: int = MAX_MEMORY_USAGE_BYTES
) -> dict[str, int]:
    """The ClickHouse settings every query to a server carries (deploy/README.md, "Limits").

    `max_execution_time` stops a query at the resource's timeout; `max_memory_usage` caps one
    query's memory, and aggregations and sorts spill to disk at half of it instead of failing.
    The embedded engine takes none of them: it runs in the run's own process, on a laptop.
    """
    return {
        "max_execution_time": query_timeout_s,
        "max_memory_usage": max_memory_bytes,
        "max_bytes_before_external_group_by": max_memory_bytes // 2,
        "max_bytes_before_external_sort": max_memory_bytes // 2,
    }


class EmbeddedEngineMissingError(SettingsError):
    """CLICKHOUSE_URL asks for the embedded engine, and this installation has none."""


def embedded_engine_installed() -> bool:
    """Whether chdb can be imported (without importing it: it maps half a gigabyte)."""
    return importlib.util.find_spec("chdb") is not None


def require_embedded_engine(url: str) -> None:
    """Raise `EmbeddedEngineMissingError`, naming the fix, for a chdb:// URL without chdb."""
    if is_embedded(url) and not embedded_engine_installed():
        raise EmbeddedEngineMissingError(
            f"CLICKHOUSE_URL={redact_url(url)} is the embedded ClickHouse engine (chdb), which is "
            "not installed: it comes with the package's `local` extra (`pip install -e "
            "'.[local]'` in a checkout, as `make dev` does). In production, set CLICKHOUSE_URL "
            "to the server, http(s)://user:password@host:port/."
        )


class ClickHouseResource(ClientResource):
    """ClickHouse through clickhouse-connect: the embedded chdb engine or a server over HTTP(S).

    Every client is one ClickHouse session (temporary tables live in it): for a server, a session
    id of its own over a connection pool of its own, so the session's requests follow each other
    on one keep-alive connection; for the embedded engine, its connection handle. Closing it
    (`close()`, or teardown) releases the embedded engine's data directory.
    """

    url: str = Field(
        description="chdb:///path/to/data for the embedded engine, or http(s)://user:pass@host:8123/"
    )
    query_timeout_s: int = Field(
        default=QUERY_TIMEOUT_S,
        description="How long one server query may run (the server's max_execution_time).",
    )
    max_memory_bytes: int = Field(
        default=MAX_MEMORY_USAGE_BYTES,
        description="Memory one server query may use (max_memory_usage); spills at half.",
    )
    engine_wait_s: float = Field(
        default=60.0,
        description="How long to wait for another process to release the embedded engine.",
    )

    @property
    def embedded(self) -> bool:
        return is_embedded(self.url)

    def embedded_path(self) -> str:
        """The directory the embedded engine opens: the URL's path exactly as the settings took it.

        Raises `SettingsError` (naming CLICKHOUSE_URL and the accepted form) for a URL that names
        no absolute directory, such as one with a host.
        """
        try:
            return embedded_path(self.url)
        except ValueError as exc:
            raise SettingsError(
                f"CLICKHOUSE_URL={redact_url(self.url)} is invalid: {exc}"
            ) from None

    def client(self) -> "ClickHouseClient":
        """The resource's client, connected on first use."""
        if self._client is None:
            self._client = self._connect()
        return self._client

    def server_client_options(self) -> dict[str, Any]:
        """What `clickhouse_connect.get_client` is given for a server URL.

        Kept apart from connecting (which contacts the server at once) so it can be inspected.
        """
        return {
            "dsn": self.url,
            # The scheme, in any case, picks the protocol: clickhouse-connect itself reads it
            # from the port alone, and would speak plain HTTP to https://host/ on port 8123.
            "interface": scheme_of(self.url),
            "connect_timeout": CONNECT_TIMEOUT_S,
            "send_receive_timeout": self.query_timeout_s + SERVER_WAITS_EXTRA_S,
            "settings": server_settings(self.query_timeout_s, self.max_memory_bytes),
            # A session for the temporary tables of suggestions, on connections of this client's
            # own: its requests go one after the other over one keep-alive connection.
            "autogenerate_session_id": True,
            "dedicated_pool": True,
        }

    def _connect(self) -> "ClickHouseClient":
        import clickhouse_connect
        from clickhouse_connect.driver.exceptions import ProgrammingError

        if not self.embedded:
            return clickhouse_connect.get_client(**self.server_client_options())
        path = self.embedded_path()
        require_embedded_engine(self.url)
        deadline = time.monotonic() + self.engine_wait_s
        while True:
            try:
                # The directory itself, not the URL: the library would take `chdb://host/` for a
                # relative folder and would not know `CHDB://` for its own.
                return clickhouse_connect.get_client(interface="chdb", path=path)
            except ProgrammingError as exc:
                # Another process (a run, the seed command) holds the engine: wait our turn.
                if _CHDB_BUSY_MARKER not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    def renew_session(self) -> None:
        """Go on in a new ClickHouse session: a new client, the old one's temporary tables gone.

        The new client is made before the old one is closed, so the embedded engine stays held.
        """
        old, self._client = self._client, None
        self.client()
        if old is not None:
            self._release(old)

    def query_df(self, sql: str, parameters: Mapping[str, Any] | None = None) -> "pd.DataFrame":
        """Run a parameterised query (`{name:Type}` placeholders) and return a DataFrame."""
        return self.client().query_df(sql, parameters=dict(parameters or {}))

    def query_rows(self, sql: str, parameters: Mapping[str, Any] | None = None) -> list[tuple]:
        """Run a parameterised query and return its rows as tuples."""
        return list(self.client().query(sql, parameters=dict(parameters or {})).result_rows)

    def command(self, sql: str, parameters: Mapping[str, Any] | None = None) -> Any:
        """Run a parameterised statement (DDL, INSERT … SELECT) and return its summary."""
        return self.client().command(sql, parameters=dict(parameters or {}))

    def describe(self) -> str:
        """Where the data lives, safe to show (no password)."""
        return redact_url(self.url)


def session_tables_lost(exc: BaseException, tables: Iterable[str]) -> str | None:
    """Why `exc` means the session holding the temporary `tables` is gone (for the log), or None.

    A session lives on the server that opened it: a request a balancer sends to another server,
    or one after the server restarted, finds no session or none of its tables. `UNKNOWN_TABLE`
    counts only when it names one of `tables`: a missing source table (`nova.follows`) stays the
    permanent schema fault it is.
    """
    code = clickhouse_error_code(exc)
    if code in SESSION_LOST_CODES:
        return SESSION_LOST_CODES[code]
    if code == UNKNOWN_TABLE and not names_in_error(exc).isdisjoint(tables):
        return "UNKNOWN_TABLE: the session's temporary tables are gone"
    return None


def names_in_error(exc: BaseException) -> set[str]:
    """The names in a ClickHouse error's own words, before the query text it may go on to quote.

    A query that reads a source table and the session's tables names both: only the table the
    error is about counts.
    """
    head = _ERROR_SCOPE.split(str(exc), maxsplit=1)[0]
    return set(_NAME.findall(head))


def releases_engine(step: Callable[P, R]) -> Callable[P, R]:
    """A step on the `clickhouse` pool: the ClickHouse clients it was given close with it.

    Dagster frees the step's slot when the step ends, and before each retry; the resources live
    as long as the run (the in-process executor runs every step in the run's own process). Without
    this, a run waiting to retry, or doing its run-end work, would still hold the embedded engine
    while another run's step, holding the slot, could not open it (docs/design.md §5).
    """

    @contextmanager
    def released(args: tuple, kwargs: dict) -> Iterator[None]:
        try:
            yield
        finally:
            for value in (*args, *kwargs.values()):
                if isinstance(value, ClickHouseResource):
                    value.close()

    return within(step, released)
