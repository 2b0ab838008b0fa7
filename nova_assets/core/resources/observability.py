"""Where job health goes out: the Pushgateway's metrics and an optional failure webhook.

Both URLs may carry secrets (the gateway's user info, the webhook's path), so both reach these
resources through `dg.EnvVar`, and a failure is logged with the URL through `redact_url` and the
exception's text only where that text cannot quote the URL.

Both are called from sensor evaluations, so each request has one deadline for the whole of it,
connect, send and the whole answer (`nova_assets.core.outbound`): the resource's timeout, or less
when the caller has less left of its budget. A slow or dripping endpoint costs that deadline once.
"""

import json
import urllib.error
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import dagster as dg
import prometheus_client
from dagster_prometheus import PrometheusResource
from pydantic import Field

from nova_assets.core.outbound import Handler, WaitExceeded, deadline_handler, send
from nova_assets.core.resources.base import HTTP_TIMEOUT_S, PUSH_TIMEOUT_S
from nova_assets.core.urls import redact_url


def failure_reason(exc: BaseException) -> str:
    """What went wrong with a request, safe to log: never text that may quote the URL.

    Socket and HTTP status errors say what happened without the URL. Other exceptions
    (`ValueError` or `http.client.InvalidURL` for a bad URL) may quote the URL, path and user
    info included, so only their type is given.
    """
    if isinstance(exc, WaitExceeded):
        return f"{exc} (the deadline of the whole request)"
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        return failure_reason(reason) if isinstance(reason, BaseException) else "URLError"
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__


def split_credentials(gateway: str) -> tuple[str, Handler]:
    """The gateway URL without user info, and the handler that sends a push within its deadline.

    urllib refuses user info in a URL, so it is taken out of the address and sent as an
    `Authorization: Basic …` header instead (percent-escapes decoded, as the user typed them).
    The handler takes the push's timeout as the deadline of the whole request.
    """
    parts = urlsplit(gateway)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at:
        return gateway, deadline_handler()
    user, _, password = userinfo.partition(":")
    credentials = (unquote(user), unquote(password))
    return urlunsplit(parts._replace(netloc=hostport)), deadline_handler(credentials)


def _within(limit: float, timeout_s: float | None) -> float:
    """The request's deadline: the resource's `limit`, or the caller's `timeout_s` when less."""
    return limit if timeout_s is None else min(limit, timeout_s)


class AlertWebhookResource(dg.ConfigurableResource):
    """Posts a Slack-compatible message for each final failure, when a webhook URL is set."""

    url: str | None = Field(default=None, description="ALERT_WEBHOOK_URL; unset sends nothing.")
    ui_url: str = Field(default="http://127.0.0.1:3000", description="Base URL of the Dagster UI.")
    timeout_s: float = Field(
        default=HTTP_TIMEOUT_S,
        description="Seconds one post may take in all: connect, send and the whole answer.",
    )

    def notify_failure(self, message: Mapping[str, Any], timeout_s: float | None = None) -> bool:
        """Post one failure; returns whether it was posted. Never raises: alerts are best effort.

        The post has one deadline for the whole request: the resource's `timeout_s`, or the
        caller's `timeout_s` when that is less (a sensor passes what its budget has left; zero or
        less sends nothing). A failure, the deadline included, is logged with its reason and
        returns False.
        """
        if not self.url:
            return False
        try:
            error = message.get("error") or {}
            run_link = f"{self.ui_url.rstrip('/')}/runs/{message['run_id']}"
            text = (
                f":rotating_light: *{message['job_name']}* failed after "
                f"{message.get('retry_count', 0)} retries — assets "
                f"{', '.join(message['asset_keys'])}\n"
                f"{error.get('type', 'Error')}: {str(error.get('message', ''))[:500]}\n"
                f"<{run_link}|Open the run>"
            )
            send(
                self.url,
                seconds=_within(self.timeout_s, timeout_s),
                data=json.dumps({"text": text}).encode(),
                headers=[("Content-Type", "application/json")],
            )
            return True
        # Anything at all (a refused connection, a garbled answer, a URL urllib cannot use): the
        # alert is lost, the sensor reporting the failure carries on.
        except Exception as exc:
            dg.get_dagster_logger().warning(
                "Could not post the failure alert to "
                f"{redact_url(self.url, secret_path=True)}: {failure_reason(exc)}"
            )
            return False


class JobMetricsResource(PrometheusResource):
    """dagster-prometheus' resource with a short deadline, basic auth and pushes that never raise.

    Every request to the gateway has one deadline for the whole of it (`timeout`). A gateway URL
    with user info (`http://user:password@host:9091`) pushes with HTTP basic auth; the user info
    never reaches the request's address or a log line.
    """

    timeout: int = Field(
        default=PUSH_TIMEOUT_S,
        description="Seconds one request to the gateway may take in all: connect, send, answer.",
    )

    def push_to_gateway(
        self, job: str, grouping_key: dict[str, str] | None = None, handler: Handler | None = None
    ) -> None:
        """Replace the metrics of `job` and `grouping_key` with the registry's (HTTP PUT)."""
        gateway, auth = split_credentials(self.gateway)
        prometheus_client.push_to_gateway(
            gateway, job, self.registry, grouping_key, self.timeout, handler or auth
        )

    def pushadd_to_gateway(
        self, job: str, grouping_key: dict[str, str] | None = None, handler: Handler | None = None
    ) -> None:
        """Replace only the registry's metric names under `job` and `grouping_key` (HTTP POST)."""
        gateway, auth = split_credentials(self.gateway)
        prometheus_client.pushadd_to_gateway(
            gateway, job, self.registry, grouping_key, self.timeout, handler or auth
        )

    def delete_from_gateway(
        self, job: str, grouping_key: dict[str, str] | None = None, handler: Handler | None = None
    ) -> None:
        """Delete the metrics of `job` and `grouping_key` (HTTP DELETE)."""
        gateway, auth = split_credentials(self.gateway)
        prometheus_client.delete_from_gateway(
            gateway, job, grouping_key, self.timeout, handler or auth
        )

    def push(
        self,
        job: str,
        grouping_key: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> bool:
        """Push the registry; on failure log a warning and return False instead of raising.

        The push's deadline is the resource's `timeout`, or `timeout_s` when that is less (what a
        sensor's budget has left; zero or less sends nothing).
        """
        try:
            gateway, handler = split_credentials(self.gateway)
            prometheus_client.push_to_gateway(
                gateway,
                job,
                self.registry,
                dict(grouping_key or {}),
                _within(float(self.timeout), timeout_s),
                handler,
            )
        except Exception as exc:  # a metrics outage must never fail a run or a sensor
            dg.get_dagster_logger().warning(
                f"Could not push metrics to the Pushgateway at {redact_url(self.gateway)}: "
                f"{failure_reason(exc)}"
            )
            return False
        return True
