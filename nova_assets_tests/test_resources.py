"""Resources against the real services: parameterised ClickHouse, atomic Redis, Kafka, Pushgateway.

Proves that injection strings bound as parameters change nothing, that a ClickHouse server client
carries the query timeout and memory limits (seen in the options it is given, which
clickhouse-connect takes as far as connecting: no server runs here) while the embedded engine
carries none, that a reader never sees a cache key missing, partial or without TTL while it is
replaced, that a DLQ message round-trips byte for byte and that publishing to a dead broker
answers "not delivered" in bounded time, and that a metrics push reaches the Pushgateway while a
push to a dead one does not raise. A gateway URL with user info pushes with HTTP basic auth, and
a refused push or a webhook answering garbage returns False with a log line that shows neither
password nor webhook token. An UNKNOWN_TABLE error means a lost session only when the table it is
about is one of the session's, whatever query text follows.
"""

import base64
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import quote

import prometheus_client
import pytest
from clickhouse_connect.driver.exceptions import OperationalError
from hypothesis import given
from hypothesis import strategies as st

from nova_assets.core.resources import (
    AlertWebhookResource,
    ClickHouseResource,
    JobMetricsResource,
    KafkaDLQResource,
    session_tables_lost,
)
from nova_assets.local import seed
from nova_assets.local.stack import down
from nova_assets_tests.conftest import free_ports, kafka_for

INJECTIONS = ["x' OR 1=1 --", "1; DROP TABLE nova.posts", "'; TRUNCATE TABLE nova.posts; --"]


@pytest.fixture
def posts(clickhouse):
    seed.create_schema(clickhouse)
    seed.truncate(clickhouse)
    clickhouse.command(
        "INSERT INTO nova.posts VALUES "
        "(1, 10, '2026-11-28 10:00:00', 0, '2026-11-28 10:00:00'), "
        "(2, 11, '2026-11-28 10:00:00', 0, '2026-11-28 10:00:00')"
    )
    return clickhouse


SESSION_TABLES = ["feeds_warmed", "feeds_edges"]
UNKNOWN_TABLE_MESSAGES = [
    "Code: 60. DB::Exception: Unknown table expression identifier '{}'. In scope {}",
    "Code: 60. DB::Exception: Table default.{} does not exist: In scope {}",
    # clickhouse-connect's wording of a server's answer over HTTP.
    "Received ClickHouse exception, code: 60, server response: Code: 60. DB::Exception: Unknown "
    "table expression identifier '{}' in scope {}. (UNKNOWN_TABLE) (for url https://ch:8443)",
]


@given(
    form=st.sampled_from(UNKNOWN_TABLE_MESSAGES),
    table=st.sampled_from([*SESSION_TABLES, "nova.follows", "follows", "feeds_warmed_old"]),
    query=st.text(),
)
def test_unknown_table_means_a_lost_session_only_for_the_sessions_own_tables(form, table, query):
    # The query text the error quotes may name the session's tables: only the missing one counts.
    exc = RuntimeError(form.format(table, f"SELECT * FROM feeds_edges, {query}"))
    lost = session_tables_lost(exc, SESSION_TABLES)
    assert (lost is not None) == (table in SESSION_TABLES)


@pytest.mark.parametrize(("code", "name"), [(372, "SESSION_NOT_FOUND"), (373, "SESSION_IS_LOCKED")])
def test_a_session_error_is_a_lost_session_whatever_the_query(code, name):
    exc = RuntimeError(f"Code: {code}. DB::Exception: Session not found. ({name})")
    assert session_tables_lost(exc, SESSION_TABLES) == name


@pytest.mark.parametrize("hostile", INJECTIONS)
def test_injection_strings_are_only_values(posts, hostile):
    rows = posts.query_rows(
        "SELECT post_id FROM nova.posts WHERE toString(post_id) = {value:String}",
        {"value": hostile},
    )
    assert rows == []
    assert posts.query_rows("SELECT count() FROM nova.posts") == [(2,)]
    assert posts.query_rows("EXISTS TABLE nova.posts") == [(1,)]


def test_injection_strings_in_arrays_are_only_values(posts):
    rows = posts.query_rows(
        "SELECT post_id FROM nova.posts WHERE has({values:Array(String)}, toString(post_id))",
        {"values": INJECTIONS},
    )
    assert rows == []
    assert posts.query_rows("SELECT count() FROM nova.posts") == [(2,)]


def test_query_df_returns_typed_columns(posts):
    frame = posts.query_df("SELECT post_id, author_id FROM nova.posts ORDER BY post_id")
    assert frame["post_id"].tolist() == [1, 2]
    assert frame["author_id"].tolist() == [10, 11]


GIB = 1 << 30


def test_a_server_client_carries_the_query_timeout_and_memory_limits():
    options = ClickHouseResource(
        url="https://nova:secret@ch.internal:8443/"
    ).server_client_options()
    assert options["settings"] == {
        "max_execution_time": 120,
        "max_memory_usage": 4 * GIB,
        "max_bytes_before_external_group_by": 2 * GIB,
        "max_bytes_before_external_sort": 2 * GIB,
    }
    # The server stops a long query itself; the client waits a little longer for its answer.
    assert options["send_receive_timeout"] > options["settings"]["max_execution_time"]
    # One session per client (suggestions' temporary tables), on connections of its own.
    assert options["autogenerate_session_id"] is True
    assert options["dedicated_pool"] is True

    tuned = ClickHouseResource(
        url="https://nova:secret@ch.internal:8443/", query_timeout_s=600, max_memory_bytes=16 * GIB
    ).server_client_options()
    assert tuned["settings"] == {
        "max_execution_time": 600,
        "max_memory_usage": 16 * GIB,
        "max_bytes_before_external_group_by": 8 * GIB,
        "max_bytes_before_external_sort": 8 * GIB,
    }


def test_clickhouse_connect_takes_every_server_option_as_far_as_connecting():
    """An option get_client did not know would fail at once; here only the connection can."""
    [port] = free_ports(1)
    resource = ClickHouseResource(url=f"http://nova:secret@127.0.0.1:{port}/")
    with pytest.raises(OperationalError, match=f"127.0.0.1:{port}"):
        resource.client()


def test_the_embedded_engine_runs_without_the_server_limits(clickhouse):
    changed = clickhouse.query_rows(
        "SELECT name FROM system.settings WHERE changed AND name IN "
        "('max_execution_time', 'max_memory_usage', 'max_bytes_before_external_group_by')"
    )
    assert changed == []


def test_set_json_writes_value_and_ttl_in_one_command(redis_cache):
    key = redis_cache.key("feed", 42)
    redis_cache.set_json(key, {"user_id": 42, "items": [{"post_id": 7, "score": 0.1}]}, 120)
    assert redis_cache.get_json(key) == {"user_id": 42, "items": [{"post_id": 7, "score": 0.1}]}
    assert 0 < redis_cache.ttl(key) <= 120


def test_set_many_json_writes_every_key_with_its_ttl(redis_cache, raw_redis):
    entries = [(redis_cache.key("suggested_users", u), {"user_id": u}, 86400) for u in range(250)]
    assert redis_cache.set_many_json(entries) == 250
    with raw_redis.pipeline() as pipe:
        for key, _, _ in entries:
            pipe.get(key)
            pipe.ttl(key)
        replies = pipe.execute()
    values, ttls = replies[::2], replies[1::2]
    assert [json.loads(v)["user_id"] for v in values] == list(range(250))
    assert all(0 < t <= 86400 for t in ttls)


def test_set_many_json_never_replaces_a_non_empty_list_with_an_empty_one(redis_cache, raw_redis):
    key = redis_cache.key
    previous = {"user_id": 1, "items": [{"post_id": 7}]}
    raw_redis.set(key("feed", 1), json.dumps(previous), ex=50)
    raw_redis.set(key("feed", 2), json.dumps({"user_id": 2, "items": []}), ex=50)
    entries = [
        (key("feed", 1), {"user_id": 1, "items": []}, 120),  # kept: the previous one has items
        (key("feed", 2), {"user_id": 2, "items": []}, 120),  # written over an empty list
        (key("feed", 3), {"user_id": 3, "items": []}, 120),  # written: nothing there
        (key("feed", 4), {"user_id": 4, "items": [{"post_id": 8}]}, 120),
    ]
    assert redis_cache.set_many_json(entries) == 3
    assert redis_cache.get_json(key("feed", 1)) == previous
    assert 0 < redis_cache.ttl(key("feed", 1)) <= 50
    for user_id in (2, 3, 4):
        assert redis_cache.get_json(key("feed", user_id)) == entries[user_id - 1][1]
        assert 50 < redis_cache.ttl(key("feed", user_id)) <= 120


def test_empty_ranking_never_replaces_a_non_empty_one(redis_cache):
    key = redis_cache.key("trending", "1h")
    full = {"window": "1h", "items": [{"rank": 1, "post_id": 7, "author_id": 3, "score": 1.5}]}
    assert redis_cache.replace_ranking(key, full, 600)
    assert not redis_cache.replace_ranking(key, {"window": "1h", "items": []}, 600)
    assert redis_cache.get_json(key) == full
    # An empty ranking may replace an empty one or a missing key.
    other = redis_cache.key("trending", "24h")
    assert redis_cache.replace_ranking(other, {"items": []}, 600)
    assert redis_cache.replace_ranking(other, {"items": []}, 600)
    assert redis_cache.get_json(other) == {"items": []}


def test_a_reader_never_sees_a_missing_partial_or_ttl_less_value(redis_cache, raw_redis):
    key = redis_cache.key("trending", "7d")
    ttl = 36000

    def ranking(generation: int) -> dict:
        items = [
            {"rank": r, "post_id": generation * 100 + r, "author_id": r, "score": 1.0 / r}
            for r in range(1, 51)
        ]
        return {"window": "7d", "generation": generation, "items": items}

    redis_cache.replace_ranking(key, ranking(0), ttl)
    problems: list[str] = []
    seen: set[int] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            with raw_redis.pipeline(transaction=True) as pipe:
                raw, remaining = pipe.get(key).ttl(key).execute()
            if raw is None:
                problems.append("missing")
                continue
            value = json.loads(raw)
            seen.add(value["generation"])
            if len(value["items"]) != 50:
                problems.append(f"partial: {len(value['items'])} items")
            if not 0 < remaining <= ttl:
                problems.append(f"ttl {remaining}")

    reader = threading.Thread(target=read)
    reader.start()
    for generation in range(1, 51):
        assert redis_cache.replace_ranking(key, ranking(generation), ttl)
        time.sleep(0.002)
    stop.set()
    reader.join()
    assert problems == []
    assert len(seen) > 1
    assert redis_cache.get_json(key)["generation"] == 50


def test_a_replacement_after_a_dropped_connection_is_retried_and_whole(redis_cache, raw_redis):
    key = redis_cache.key("trending", "24h")
    first = {"window": "24h", "items": [{"rank": 1, "post_id": 1, "author_id": 1, "score": 2.0}]}
    second = {"window": "24h", "items": [{"rank": 1, "post_id": 2, "author_id": 2, "score": 3.0}]}
    assert redis_cache.replace_ranking(key, first, 3000)
    killed = [
        raw_redis.client_kill(client["addr"])
        for client in raw_redis.client_list()
        if client["name"] == "nova_assets"
    ]
    assert killed
    # The resource's pooled connection is dead; redis-py reconnects and sends the script again.
    assert redis_cache.replace_ranking(key, second, 3000)
    assert redis_cache.get_json(key) == second
    assert 0 < redis_cache.ttl(key) <= 3000


def test_kafka_message_round_trips_byte_identical(kafka_dlq):
    payload = json.dumps({"schema": "nova.jobs.dlq.v1", "note": "ünïcode ✓"}).encode()
    assert kafka_dlq.publish("trending_1h", payload)
    assert kafka_dlq.publish("cache_warmer", b"\x00\x01binary\xff")
    records = kafka_dlq.read()
    assert [(r.key, r.value) for r in records] == [
        ("trending_1h", payload),
        ("cache_warmer", b"\x00\x01binary\xff"),
    ]
    assert [r.offset for r in kafka_dlq.read({0: 1})] == [1]
    kafka_dlq.close()


def test_publishing_to_a_dead_broker_says_not_delivered_in_bounded_time():
    dead = KafkaDLQResource(brokers="127.0.0.1:1", topic="jobs-dlq", delivery_timeout_s=2.0)
    started = time.monotonic()
    delivery = dead.publish("trending_1h", b"{}")
    assert not delivery and not delivery.permanent
    assert time.monotonic() - started < 2.0 + 2.0


def test_publishing_while_the_broker_is_stopped_says_not_delivered(private_kafka):
    dlq = kafka_for(private_kafka)
    assert dlq.publish("trending_1h", b"delivered")
    down(private_kafka, services=("kafka",))
    started = time.monotonic()
    delivery = dlq.publish("trending_1h", b"not delivered")
    assert not delivery and not delivery.permanent
    assert time.monotonic() - started < 3.0 + 2.0


def _gateway_metrics(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        return response.read().decode()


def test_a_push_can_be_read_back_from_the_gateway(pushgateway):
    metrics = JobMetricsResource(gateway=pushgateway)
    metrics.setup_for_execution(None)
    gauge = prometheus_client.Gauge(
        "nova_resource_test_value", "test gauge", ["job_name"], registry=metrics.registry
    )
    gauge.labels(job_name="trending_1h").set(42.5)
    assert metrics.push(job="nova_resource_test")
    assert (
        'nova_resource_test_value{instance="",job="nova_resource_test",job_name="trending_1h"} 42.5'
        in (_gateway_metrics(pushgateway))
    )
    urllib.request.urlopen(
        urllib.request.Request(f"{pushgateway}/metrics/job/nova_resource_test", method="DELETE"),
        timeout=5,
    )


def test_a_push_to_a_dead_gateway_does_not_raise(caplog):
    metrics = JobMetricsResource(gateway="http://127.0.0.1:1", timeout=1)
    metrics.setup_for_execution(None)
    assert metrics.push(job="nova_resource_test") is False
    assert "Could not push metrics" in caplog.text


GATEWAY_USER = "metrics"
GATEWAY_PASSWORD = "s3cr/t?#@:pw"
"""Every character that ends a URL's authority: the URL carries it percent-encoded."""


@pytest.fixture
def auth_gateway() -> Iterator[tuple[str, list[tuple[str, str | None, bytes]]]]:
    """A Pushgateway stand-in behind basic auth: 401 without the right `Authorization` header.

    Yields its `host:port` and the pushes it received: (path, Authorization header, body).
    """
    expected = "Basic " + base64.b64encode(f"{GATEWAY_USER}:{GATEWAY_PASSWORD}".encode()).decode()
    pushes: list[tuple[str, str | None, bytes]] = []

    class Gateway(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            authorization = self.headers.get("Authorization")
            pushes.append((self.path, authorization, body))
            self.send_response(200 if authorization == expected else 401)
            if authorization != expected:
                self.send_header("WWW-Authenticate", 'Basic realm="pushgateway"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the test reads the pushes, not the access log."""

    server = HTTPServer(("127.0.0.1", 0), Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_port}", pushes
    server.shutdown()
    server.server_close()
    thread.join()


def _metrics_for(gateway: str) -> JobMetricsResource:
    metrics = JobMetricsResource(gateway=gateway, timeout=2)
    metrics.setup_for_execution(None)
    gauge = prometheus_client.Gauge(
        "nova_auth_test_value", "test gauge", ["job_name"], registry=metrics.registry
    )
    gauge.labels(job_name="trending_1h").set(42.5)
    return metrics


def test_a_gateway_url_with_user_info_pushes_with_basic_auth(auth_gateway):
    address, pushes = auth_gateway
    metrics = _metrics_for(f"http://{GATEWAY_USER}:{quote(GATEWAY_PASSWORD, safe='')}@{address}")
    assert metrics.push(job="nova_resource_test")
    [(path, authorization, body)] = pushes
    assert path == "/metrics/job/nova_resource_test"
    assert base64.b64decode(authorization.removeprefix("Basic ")).decode() == (
        f"{GATEWAY_USER}:{GATEWAY_PASSWORD}"
    )
    assert b'nova_auth_test_value{job_name="trending_1h"} 42.5' in body


def test_a_push_with_the_wrong_password_returns_false_and_logs_no_secret(auth_gateway, caplog):
    address, pushes = auth_gateway
    metrics = _metrics_for(f"http://{GATEWAY_USER}:not-the-s3cret@{address}")
    assert metrics.push(job="nova_resource_test") is False
    assert len(pushes) == 1 and pushes[0][1] is not None
    assert f"Could not push metrics to the Pushgateway at http://***@{address}" in caplog.text
    assert "HTTP 401" in caplog.text
    assert "not-the-s3cret" not in caplog.text


def _read_request(connection: socket.socket) -> None:
    """Read one HTTP request whole, so closing the socket afterwards sends no reset."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    while len(body) < length:
        chunk = connection.recv(65536)
        if not chunk:
            return
        body += chunk


@contextmanager
def answering(reply: bytes) -> Iterator[int]:
    """A local TCP server answering every request with `reply`, then hanging up; yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(5)
                _read_request(connection)
                connection.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        listener.close()


FAILURE = {"run_id": "r1", "job_name": "trending_1h", "asset_keys": ["trending_posts_1h"]}
TOKEN = "T0/B0/s3cr3t-token"


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (b"garbage\r\n\r\n", "BadStatusLine"),  # http.client.HTTPException, not an OSError
        (b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n", "LineTooLong"),
        (b"", "RemoteDisconnected"),
        (b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n", "HTTP 500"),
    ],
)
def test_a_webhook_answering_garbage_never_raises(caplog, reply, reason):
    with answering(reply) as port:
        alerts = AlertWebhookResource(url=f"http://127.0.0.1:{port}/{TOKEN}", timeout_s=2)
        assert alerts.notify_failure(FAILURE) is False
    assert f"Could not post the failure alert to http://127.0.0.1:{port}/…" in caplog.text
    assert reason in caplog.text
    assert "s3cr3t" not in caplog.text


@pytest.mark.parametrize(
    "url",
    [
        f"http://127.0.0.1:notaport/{TOKEN}",  # http.client.InvalidURL quotes the port
        f"hooks.example/{TOKEN}",  # ValueError quoting the whole URL
        f"http://[::1/{TOKEN}",
        f"ftp://hooks.example/{TOKEN}",
    ],
)
def test_a_webhook_url_urllib_cannot_use_never_raises_nor_shows_its_token(caplog, url):
    assert AlertWebhookResource(url=url, timeout_s=1).notify_failure(FAILURE) is False
    assert "Could not post the failure alert" in caplog.text
    assert "s3cr3t" not in caplog.text
