"""Both DLQ sensors finish within their budget, whatever arrives, and the next tick goes on.

The replay meets a backlog of large valid messages (each inside every bound a reader states)
before one good message on the real broker: in process, each evaluation stops at its budget (or
its message and byte bounds) with its cursor just past what it handled, and the next one goes on
from there; under the real `dagster-daemon`, with the budget and Dagster's sensor timeout both
shrunk, behind a backlog one tick cannot read (sized by timing the decoder on this machine), the
good message is replayed within a few ticks and no tick times out. `dlq list` reads a
topic of large messages under an address-space limit far below the topic's size. The publisher
returns within its budget while the broker does not acknowledge (paused) or the webhook drips,
and the failures wait for the next evaluation.
"""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import typing
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import dagster as dg
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from nova_assets.core.budget import Budget
from nova_assets.core.jobs import JOB_TAG, job_specs
from nova_assets.core.resources import AlertWebhookResource, KafkaDLQResource
from nova_assets.core.settings import Settings
from nova_assets.defs.dlq import reading, replay, sensors, writing
from nova_assets.defs.schedules import cache_jobs
from nova_assets.local.stack import started_pid
from nova_assets_tests.conftest import KAFKA_BROKERS, create_topic, free_ports, kafka_for
from nova_assets_tests.test_dlq import _message, fail_runs

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
SPECS = job_specs(Settings.from_env({}))

TOPIC_MAX_BYTES = 2 * 1024 * 1024
"""The topics here accept messages up to the largest a reader decodes (`MAX_READ_BYTES`)."""
LARGE = 1_360_000
"""Bytes of each large message, as in the backlog that stalled the replay."""


def large_message(number: int = 0) -> bytes:
    """Valid JSON within every bound of `reading`, two levels below its top object.

    A list of empty objects, the costliest shape per byte to decode (some 450,000 objects), and
    a `failed_at` that grows with `number`, so `dlq list` orders the messages as they were sent.
    """
    head = b'{"failed_at":"2026-11-28T12:00:00.%06dZ","padding":[' % number
    body = head + b",".join([b"{}"] * ((LARGE - len(head)) // 3)) + b"]}"
    assert len(body) <= reading.MAX_READ_BYTES
    return body


@pytest.fixture
def large_topic(
    kafka_dlq: KafkaDLQResource,
) -> Iterator[Callable[[int, list[bytes]], KafkaDLQResource]]:
    """Makes a topic holding `count` large messages, then the given ones; deletes it after.

    It takes `kafka_dlq` for what that fixture means: the local broker is up (and the test is
    marked as one that needs services).
    """
    made: list[str] = []

    def make(count: int, then: list[bytes]) -> KafkaDLQResource:
        topic = f"test-dlq-large-{uuid.uuid4().hex[:8]}"
        create_topic(topic, config={"max.message.bytes": str(TOPIC_MAX_BYTES)})
        made.append(topic)
        producer = Producer(
            {"bootstrap.servers": KAFKA_BROKERS, "message.max.bytes": TOPIC_MAX_BYTES + 4096}
        )
        for number in range(count):
            producer.produce(topic, key=b"trending_1h", value=large_message(number))
            producer.poll(0)
        for extra in then:
            producer.produce(topic, key=b"trending_1h", value=extra)
        assert producer.flush(60) == 0
        return KafkaDLQResource(brokers=KAFKA_BROKERS, topic=topic, delivery_timeout_s=5.0)

    yield make
    if made:
        AdminClient({"bootstrap.servers": KAFKA_BROKERS}).delete_topics(made)


def _position(cursor: str | None) -> int:
    return json.loads(cursor or "{}").get("0", 0)


def _evaluate_until_drained(
    sensor: dg.SensorDefinition, instance: dg.DagsterInstance, kafka: KafkaDLQResource, end: int
) -> tuple[list[int], list[str], list[float]]:
    """Evaluations carrying the cursor until it reaches `end`: positions, replays, durations."""
    cursor, positions, replayed, took = None, [], [], []
    while _position(cursor) < end:
        assert len(positions) < 40, f"no end after 40 evaluations: {positions}"
        started = time.monotonic()
        with dg.build_sensor_context(
            instance=instance, cursor=cursor, resources={"kafka_dlq": kafka}
        ) as context:
            result = sensor.evaluate_tick(context)
        took.append(time.monotonic() - started)
        assert _position(result.cursor) > _position(cursor), "an evaluation did not move on"
        cursor = result.cursor
        positions.append(_position(cursor))
        replayed += [r.tags[writing.REPLAY_TAG] for r in result.run_requests]
    return positions, replayed, took


def test_a_backlog_of_large_messages_drains_over_evaluations_each_within_its_budget(
    large_topic, instance
):
    good = uuid.uuid4().hex
    count = 24
    kafka = large_topic(count, [_message(run_id=good)])
    seconds = 1.0
    sensor = sensors.build_dlq_replay_sensor(cache_jobs(), SPECS, budget=lambda: Budget(seconds))

    positions, replayed, took = _evaluate_until_drained(sensor, instance, kafka, count + 1)

    # One evaluation could not read the backlog; each went on from where the last one stopped,
    # so every message was handled once and the good one replayed once.
    assert len(positions) > 1 and positions[-1] == count + 1
    assert replayed == [good]
    # Each returned at its budget: the message in hand is the most it goes past it.
    assert max(took) < seconds + 5, took


def test_an_evaluation_stops_at_its_message_and_byte_bounds(large_topic, instance, monkeypatch):
    good = uuid.uuid4().hex
    kafka = large_topic(
        4, [_message(run_id=uuid.uuid4().hex) for _ in range(5)] + [_message(run_id=good)]
    )
    sensor = sensors.build_dlq_replay_sensor(cache_jobs(), SPECS, budget=lambda: Budget(60))
    monkeypatch.setattr(replay, "REPLAY_MAX_BYTES", len(large_message()) + 1)
    monkeypatch.setattr(replay, "REPLAY_MAX_MESSAGES", 3)
    positions, replayed, _ = _evaluate_until_drained(sensor, instance, kafka, 10)
    # Two large messages reach the byte bound; then three small ones reach the message bound.
    assert positions == [2, 4, 7, 10]
    assert replayed[-1] == good and len(replayed) == 6


# -- under the real daemon ----------------------------------------------------------------------

NO_RUNS = """\
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    # Requested runs stay queued: the test reads what the sensor asked for, nothing runs.
    max_concurrent_runs: 0
telemetry:
  enabled: false
"""

DAEMON_BUDGET_S = 2
DAEMON_TIMEOUT_S = 10
"""Dagster's sensor timeout (60 s) and the budget (20 s), both shrunk by six."""
BACKLOG_BUDGETS = 1.4
"""The daemon's backlog takes this many budgets to decode: far more than one tick reads (a tick
decodes at most a budget's worth, as the decoder was timed at its fastest, and also sets up its
reader and fetches and logs each message: the first read 0.8 to 0.95 budgets' worth), and
usually no more than two ticks read; a tick more costs the test some 20 s (the sensor's interval
of 15 s, and the daemon's loop), never its verdict."""

TIME_DECODER = """
import sys, time
from nova_assets.defs.dlq import reading

message = sys.stdin.buffer.read()
fastest = float("inf")
for _ in range(5):
    started = time.perf_counter()
    reading.parse_message(message, {})
    fastest = min(fastest, time.perf_counter() - started)
print(fastest)
"""


def messages_to_outlast(seconds: float) -> int:
    """Large messages that this machine takes `BACKLOG_BUDGETS` times `seconds` to decode.

    Sized by timing the decoder, the fastest of five, rather than fixed, so a faster machine is
    not left with a backlog one tick reads. It is timed in a process of its own session, as the
    daemon runs: where the kernel shares the processor between sessions (autogroup), the test's
    own process competes with everything else of its session (another test worker) and would
    time the decoder slower than the daemon decodes, leaving a backlog one tick reads.
    """
    timed = subprocess.run(
        [sys.executable, "-c", TIME_DECODER],
        input=large_message(),
        capture_output=True,
        timeout=120,
        check=True,
        start_new_session=True,
    )
    return math.ceil(BACKLOG_BUDGETS * seconds / float(timed.stdout))


def _ticks(instance: dg.DagsterInstance, name: str) -> list[typing.Any]:
    """The ticks of sensor `name`, oldest first."""
    [state] = [s for s in instance.all_instigator_state() if s.instigator_name == name]
    ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=100)
    return sorted(ticks, key=lambda t: t.timestamp)


def test_the_daemon_replays_past_a_backlog_of_large_messages_within_a_few_ticks(
    large_topic, tmp_path
):
    good = uuid.uuid4().hex
    count = messages_to_outlast(DAEMON_BUDGET_S)
    kafka = large_topic(count, [_message(run_id=good)])
    home = tmp_path / "dagster"
    home.mkdir()
    (home / "dagster.yaml").write_text(NO_RUNS)
    [dead_port] = free_ports(1)
    env = os.environ | {
        "DAGSTER_HOME": str(home),
        "NOVA_HOME": str(tmp_path / ".nova"),
        "KAFKA_BROKERS": KAFKA_BROKERS,
        "DLQ_TOPIC": kafka.topic,
        "SENSOR_BUDGET_SEC": str(DAEMON_BUDGET_S),
        "DAGSTER_SENSOR_GRPC_TIMEOUT_SECONDS": str(DAEMON_TIMEOUT_S),
        # Nothing else of the code location reaches a shared service.
        "PUSHGATEWAY_URL": f"http://127.0.0.1:{dead_port}",
        "CACHE_HEALING": "off",
        "REDIS_KEY_PREFIX": f"test:{uuid.uuid4().hex[:8]}:",
    }
    env.pop("CLICKHOUSE_URL", None)
    workspace = ["-w", str(ROOT / "workspace.yaml")]
    subprocess.run(
        [str(BIN / "dagster"), "sensor", "start", "dlq_replay", *workspace],
        env=env,
        cwd=home,
        check=True,
        capture_output=True,
    )
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", *workspace],
            env=env,
            cwd=home,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            deadline = time.monotonic() + 300
            while True:
                # The run is requested before its tick ends, so the ticks are read after the
                # runs and kept only once all have ended (the next starts 15 s later).
                replayed = instance.get_runs(dg.RunsFilter(tags={writing.REPLAY_TAG: good}))
                ticks = _ticks(instance, "dlq_replay")
                if replayed and all(t.status.value != "STARTED" for t in ticks):
                    break
                assert daemon.poll() is None, log.read_text()[-4000:]
                assert time.monotonic() < deadline, (
                    f"the good message was not replayed: {log.read_text()[-4000:]}"
                )
                time.sleep(0.2)
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(timeout=10)

    report = (
        f"backlog of {count}",
        [(t.status.value, round((t.end_timestamp or 0) - t.timestamp, 1), t.cursor) for t in ticks],
    )
    # No tick timed out or failed; each moved the cursor on, and the last one reached the good
    # message: one tick could not read the backlog, a few did.
    assert all(t.status.value in ("SUCCESS", "SKIPPED") for t in ticks), report
    positions = [_position(t.cursor) for t in ticks]
    assert positions == sorted(set(positions)), report
    assert positions[-1] == count + 1, report
    assert 1 < len(ticks) <= 8, report
    assert all(t.end_timestamp - t.timestamp < DAEMON_TIMEOUT_S for t in ticks), report


# -- dlq list under a memory limit ---------------------------------------------------------------

LIST_UNDER_LIMIT = """
import json, resource, sys
from nova_assets.core.resources import KafkaDLQResource
from nova_assets.defs.dlq import reading

topic, headroom = sys.argv[1], int(sys.argv[2])
kafka = KafkaDLQResource(brokers=sys.argv[3], topic=topic)
# The first read makes what any read needs (the client's threads, the allocator's arenas).
reading.list_messages(kafka, limit=1, scan=1)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
limit = int(status["VmPeak"].split()[0]) * 1024 + headroom
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
rows, note = reading.list_messages(kafka, limit=3)
print(json.dumps({"offsets": [row["_offset"] for row in rows], "note": note}))
"""

LIST_HEADROOM = 256 * 1024 * 1024
"""Address space `dlq list` may add to what one read of one message needed."""


def test_dlq_list_reads_a_topic_of_large_messages_within_a_bounded_window(large_topic):
    count = 48  # 65 MB on the topic; decoded, some 1.4 GB
    kafka = large_topic(count, [_message(run_id="newest", failed_at="2026-11-28T13:00:00Z")])
    listed = subprocess.run(
        [sys.executable, "-c", LIST_UNDER_LIMIT, kafka.topic, str(LIST_HEADROOM), KAFKA_BROKERS],
        env=os.environ | {"MALLOC_ARENA_MAX": "2"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr[-3000:]
    shown = json.loads(listed.stdout.splitlines()[-1])
    # Every message was read (no note), and the three newest are listed, newest first.
    assert shown == {"offsets": [f"0:{count}", f"0:{count - 1}", f"0:{count - 2}"], "note": None}


# -- the publisher ------------------------------------------------------------------------------


def _publish(instance, kafka, alerts, cursor=None, seconds=2.0):
    """One publisher pass within a budget of `seconds`: (cursor, delivered, pending, took)."""
    started = time.monotonic()
    cursor, delivered, pending = sensors.publish_failed_runs(
        instance,
        sensors.PublisherCursor.parse(cursor),
        kafka,
        alerts,
        dg.get_dagster_logger(),
        budget=Budget(seconds),
    )
    return cursor.serialize(), delivered, pending, time.monotonic() - started


def test_a_broker_that_does_not_acknowledge_costs_the_publisher_its_budget_once(
    instance, private_kafka
):
    # A delivery timeout far above the budget: the budget is what bounds the wait.
    brokers, topic = kafka_for(private_kafka).brokers, private_kafka.dlq_topic
    kafka = KafkaDLQResource(brokers=brokers, topic=topic, delivery_timeout_s=10.0)
    [run_id] = fail_runs(instance)
    pid = started_pid(private_kafka, "kafka")
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        cursor, delivered, pending, _ = _publish(instance, kafka, AlertWebhookResource())
        kafka.close()  # as at the end of an evaluation: nothing is left to wait for
        took = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    assert (delivered, pending) == (0, 1)
    assert took < 2.0 + 3, took
    assert writing.DELIVERED_TAG not in instance.get_run_by_id(run_id).tags
    for _ in range(5):
        cursor, delivered, pending, _ = _publish(
            instance, kafka, AlertWebhookResource(), cursor, 15
        )
        if pending == 0:
            break
    assert pending == 0
    assert {json.loads(r.value)["run_id"] for r in kafka.read()} == {run_id}


class _Dripping(BaseHTTPRequestHandler):
    """A webhook that answers one byte every half second until the test lets it go."""

    release: typing.ClassVar[threading.Event] = threading.Event()
    posts: typing.ClassVar[list[bytes]] = []

    def do_POST(self):
        type(self).posts.append(self.rfile.read(int(self.headers["Content-Length"])))
        try:
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
                if self.release.wait(0.5):
                    break
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
        except OSError:
            pass  # the publisher gave up on the post

    def log_message(self, *args):
        pass


def test_a_dripping_webhook_costs_the_publisher_its_budget_once(instance, kafka_dlq):
    _Dripping.release.clear()
    _Dripping.posts = []
    server = HTTPServer(("127.0.0.1", 0), _Dripping)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    alerts = AlertWebhookResource(url=f"http://127.0.0.1:{server.server_port}/hook", timeout_s=30)
    try:
        run_ids = fail_runs(instance, 3)
        cursor, delivered, pending, took = _publish(instance, kafka_dlq, alerts, seconds=2.0)
        # The first failure is delivered; its alert takes what is left of the budget; the other
        # two wait for the next evaluation, which goes on with them.
        assert (delivered, pending) == (1, 2)
        assert took < 2.0 + 3, took
        for _ in range(4):
            cursor, delivered, pending, took = _publish(instance, kafka_dlq, alerts, cursor)
            assert took < 2.0 + 3, took
            if pending == 0:
                break
    finally:
        _Dripping.release.set()
        server.shutdown()
    assert pending == 0
    assert sorted(json.loads(r.value)["run_id"] for r in kafka_dlq.read()) == sorted(run_ids)
    assert len(_Dripping.posts) == 3
    for run_id in run_ids:
        assert instance.get_run_by_id(run_id).tags[JOB_TAG] == "trending_1h"
