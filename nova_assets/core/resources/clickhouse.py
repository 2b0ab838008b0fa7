"""ClickHouse through clickhouse-connect: the embedded chdb engine or a server over HTTP(S)."""

import time
from collections.abc import Mapping
from typing import Any

import clickhouse_connect
import pandas as pd
from clickhouse_connect.driver.client import Client as ClickHouseClient
from clickhouse_connect.driver.exceptions import ProgrammingError
from pydantic import Field

from nova_assets.core.resources.base import CONNECT_TIMEOUT_S, QUERY_TIMEOUT_S, ClientResource
from nova_assets.core.settings import redact_url

CLICKHOUSE_POOL = "clickhouse"
"""Dagster pool of every step that touches ClickHouse (one slot for the embedded engine)."""

# chdb admits one process per data directory; another process holding it shows up as this error.
_CHDB_BUSY_MARKER = "Unable to open the chdb engine"


class ClickHouseResource(ClientResource):
    """ClickHouse through clickhouse-connect: the embedded chdb engine or a server over HTTP(S).

    Closing it (`close()`, or teardown) releases the embedded engine's data directory.
    """

    url: str = Field(
        description="chdb:///path/to/data for the embedded engine, or http(s)://user:pass@host:8123/"
    )
    query_timeout_s: int = Field(
        default=QUERY_TIMEOUT_S, description="Send/receive timeout of server queries."
    )
    engine_wait_s: float = Field(
        default=60.0,
        description="How long to wait for another process to release the embedded engine.",
    )

    @property
    def embedded(self) -> bool:
        return self.url.startswith("chdb:")

    def client(self) -> ClickHouseClient:
        """The resource's client, connected on first use."""
        if self._client is None:
            self._client = self._connect()
        return self._client

    def _connect(self) -> ClickHouseClient:
        if not self.embedded:
            return clickhouse_connect.get_client(
                dsn=self.url,
                connect_timeout=CONNECT_TIMEOUT_S,
                send_receive_timeout=self.query_timeout_s,
            )
        deadline = time.monotonic() + self.engine_wait_s
        while True:
            try:
                return clickhouse_connect.get_client(dsn=self.url)
            except ProgrammingError as exc:
                # Another process (a run, the seed command) holds the engine: wait our turn.
                if _CHDB_BUSY_MARKER not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    def query_df(self, sql: str, parameters: Mapping[str, Any] | None = None) -> pd.DataFrame:
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
