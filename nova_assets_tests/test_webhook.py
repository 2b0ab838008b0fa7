"""Outbound HTTP from a tick has one deadline for the whole request: a slow endpoint costs it once.

The endpoint is a real HTTP server on 127.0.0.1 that answers one byte every 2 s (its status line,
or its body after prompt headers): each read gets a byte within the 5 s a socket timeout allows,
so only a deadline on the whole request stops it. The alert webhook and the Pushgateway push
each return False with the reason logged within that deadline (the resource's, or less when the
caller's budget has less left), the endpoint sees the connection end soon after (no request is
left dripping in the background), and the next request to an endpoint that answers goes through.
"""

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import prometheus_client
import pytest

from nova_assets.core.budget import Budget
from nova_assets.core.resources import AlertWebhookResource, JobMetricsResource
from nova_assets.core.resources.base import HTTP_TIMEOUT_S, PUSH_TIMEOUT_S

DRIP_EVERY_S = 2.0
"""Below every deadline here, so each socket read gets its byte in time: only the whole counts."""
BUDGET_S = 3.0
"""What a caller's budget has left, less than the resource's own deadline."""
MARGIN_S = 1.5
"""What returning "within the deadline" may take beyond it: a thread's start and a log line."""
ANSWER = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 24\r\n\r\n"
BODY = b"ok, the alert was posted"
FAILURE = {
    "run_id": "r-drip",
    "job_name": "cache_warmer",
    "asset_keys": ["warmed_feeds"],
    "retry_count": 5,
    "error": {"type": "ConnectionError", "message": "redis went away"},
}


@dataclass
class Endpoint:
    """The server's address and what it saw: requests by path, and connections the caller ended."""

    port: int
    requests: list[str] = field(default_factory=list)
    hung_up: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    """An HTTP server that drips its answers, one byte every 2 s, on paths holding `/drip`.

    `/drip-body` sends the headers at once and drips the body; other `/drip` paths drip the whole
    answer from its status line. Any other path answers at once.
    """
    stop = threading.Event()
    seen = Endpoint(0)

    class Dripping(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            seen.requests.append(self.path)
            if "/drip" not in self.path:
                self.wfile.write(ANSWER + BODY)
                return
            prompt, dripped = (ANSWER, BODY) if "/drip-body" in self.path else (b"", ANSWER + BODY)
            try:
                self.wfile.write(prompt)
                for byte in dripped:
                    self.wfile.write(bytes([byte]))
                    if stop.wait(DRIP_EVERY_S):
                        return
            except OSError:  # the caller ended the connection
                seen.hung_up.set()

        do_PUT = do_POST

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the test reads what the server saw, not its access log."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Dripping)
    server.daemon_threads = True
    seen.port = server.server_port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join()


HANG_UP_BOUND_S = 4 * DRIP_EVERY_S + 2
"""By when the server, writing a byte every 2 s, has found the ended connection gone."""


@pytest.mark.parametrize("path", ["/drip/T0/B0/s3cr3t", "/drip-body/T0/B0/s3cr3t"])
def test_a_dripping_webhook_costs_one_deadline_and_the_next_alert_goes_through(
    endpoint, caplog, path
):
    alerts = AlertWebhookResource(url=endpoint.url(path))
    started = time.monotonic()
    assert alerts.notify_failure(FAILURE) is False
    took = time.monotonic() - started
    assert took < HTTP_TIMEOUT_S + MARGIN_S, f"the post held the caller {took:.1f} s"
    assert f"Could not post the failure alert to http://127.0.0.1:{endpoint.port}/…" in caplog.text
    assert "no answer within 5.0 s (the deadline of the whole request)" in caplog.text
    assert "s3cr3t" not in caplog.text
    # The request was ended, not abandoned to drip on: the server's next byte finds it gone.
    assert endpoint.hung_up.wait(HANG_UP_BOUND_S), "the dripping request kept going"

    good = AlertWebhookResource(url=endpoint.url("/good/T0/B0/s3cr3t"))
    assert good.notify_failure(FAILURE) is True
    assert endpoint.requests == [path, "/good/T0/B0/s3cr3t"]


def test_the_callers_budget_caps_the_webhooks_deadline(endpoint, caplog):
    alerts = AlertWebhookResource(url=endpoint.url("/drip"), timeout_s=30)
    budget = Budget(BUDGET_S)
    assert alerts.notify_failure(FAILURE, timeout_s=budget.left()) is False
    assert budget.spent() < BUDGET_S + MARGIN_S, f"the post took {budget.spent():.1f} s"
    assert "the deadline of the whole request" in caplog.text


def test_a_spent_budget_sends_nothing(endpoint, caplog):
    alerts = AlertWebhookResource(url=endpoint.url("/good"))
    assert alerts.notify_failure(FAILURE, timeout_s=0) is False
    assert "no time left" in caplog.text
    assert endpoint.requests == []
    assert alerts.notify_failure(FAILURE, timeout_s=BUDGET_S) is True


def _metrics(gateway: str, timeout: int = PUSH_TIMEOUT_S) -> JobMetricsResource:
    metrics = JobMetricsResource(gateway=gateway, timeout=timeout)
    metrics.setup_for_execution(None)
    gauge = prometheus_client.Gauge(
        "nova_webhook_test_value", "test gauge", ["job_name"], registry=metrics.registry
    )
    gauge.labels(job_name="cache_warmer").set(1)
    return metrics


def test_a_dripping_gateway_costs_one_deadline_and_the_next_push_goes_through(
    endpoint, pushgateway, caplog
):
    metrics = _metrics(endpoint.url("/drip"))
    started = time.monotonic()
    assert metrics.push(job="nova_webhook_test") is False
    took = time.monotonic() - started
    assert took < PUSH_TIMEOUT_S + MARGIN_S, f"the push held the caller {took:.1f} s"
    assert "Could not push metrics" in caplog.text
    assert "the deadline of the whole request" in caplog.text
    assert endpoint.hung_up.wait(HANG_UP_BOUND_S), "the dripping push kept going"

    assert _metrics(pushgateway).push(job="nova_webhook_test") is True
    prometheus_client.delete_from_gateway(pushgateway, job="nova_webhook_test", timeout=5)


def test_a_push_takes_the_callers_budget_when_it_is_less(endpoint, caplog):
    metrics = _metrics(endpoint.url("/drip"), timeout=30)
    budget = Budget(BUDGET_S)
    assert metrics.push(job="nova_webhook_test", timeout_s=budget.left()) is False
    assert budget.spent() < BUDGET_S + MARGIN_S, f"the push took {budget.spent():.1f} s"
    assert "the deadline of the whole request" in caplog.text
