"""What every resource shares: network timeouts, set once here, and the client lifecycle.

Each resource builds its client on first use and closes it at teardown (and on `close()`), so
assets and sensors never hold a client library themselves.
"""

from typing import Any

import dagster as dg
from pydantic import PrivateAttr

CONNECT_TIMEOUT_S = 10.0
"""Connecting to ClickHouse over HTTP."""
QUERY_TIMEOUT_S = 120
"""Send/receive of one ClickHouse query on a server."""
REDIS_SOCKET_TIMEOUT_S = 5.0
"""Connect and read timeout of every Redis command."""
KAFKA_METADATA_TIMEOUT_S = 10.0
"""Kafka metadata, watermark and read calls."""
KAFKA_DELIVERY_TIMEOUT_S = 10.0
"""How long a publish waits for the broker's delivery report."""
HTTP_TIMEOUT_S = 5.0
"""Posting an alert to a webhook."""
PUSH_TIMEOUT_S = 3
"""Pushing metrics to the Pushgateway."""


class ClientResource(dg.ConfigurableResource):
    """A resource owning one client: `close()` releases it, and teardown always calls `close()`."""

    _client: Any = PrivateAttr(default=None)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.close()

    def close(self) -> None:
        """Release the client, if one was made; the next use makes a new one."""
        if self._client is not None:
            client, self._client = self._client, None
            self._release(client)

    def _release(self, client: Any) -> None:
        client.close()
