"""The dead-letter queue against a real Dagster instance and real Kafka brokers.

Proves that a failed run reaches the topic once the broker is back (stopped, or paused beyond the
producer's timeout), that nothing is published twice by later evaluations, that twelve failures
drain within three evaluations, that oversized payloads are truncated and marked, that replay
launches one run per good message and skips every malformed kind, that `dlq list` shows what was
published, and that the webhook gets one post per final failure.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import typing
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import dagster as dg
import pytest

from nova_assets.core.jobs import JOB_TAG, job_specs
from nova_assets.core.resources import AlertWebhookResource, KafkaDLQResource
from nova_assets.core.settings import Settings
from nova_assets.defs.dlq import reading, sensors, writing
from nova_assets.local.stack import down, started_pid, up
from nova_assets_tests.conftest import KAFKA_BROKERS, kafka_for

FAST_RETRIES = dg.RetryPolicy(max_retries=2, delay=0.01, backoff=dg.Backoff.EXPONENTIAL)


@dg.asset(retry_policy=FAST_RETRIES)
def fragile_cache() -> None:
    """Always fails: stands in for a cache asset whose service is down."""
    raise ConnectionError("Redis at 127.0.0.1:6379 refused the connection")


def fail_runs(instance: dg.DagsterInstance, count: int = 1, **tags: str) -> list[str]:
    """Run the failing job `count` times; the ids of the failed runs."""
    run_ids = []
    for _ in range(count):
        result = dg.materialize(
            [fragile_cache],
            instance=instance,
            raise_on_error=False,
            tags={JOB_TAG: "trending_1h", **tags},
        )
        assert not result.success
        run_ids.append(result.run_id)
    return run_ids


def evaluate(instance, kafka, cursor=None, alerts=None):
    """One publisher evaluation: (new cursor, delivered, pending)."""
    state = sensors.PublisherCursor.parse(cursor)
    new, delivered, pending = sensors.publish_failed_runs(
        instance, state, kafka, alerts or AlertWebhookResource(), dg.get_dagster_logger()
    )
    return new.serialize(), delivered, pending


def messages(kafka: KafkaDLQResource) -> list[dict]:
    return [json.loads(r.value) for r in kafka.read()]


def test_the_message_carries_the_design_payload(instance, kafka_dlq):
    [run_id] = fail_runs(instance)
    _, delivered, _ = evaluate(instance, kafka_dlq)
    assert delivered == 1
    [record] = kafka_dlq.read()
    assert record.key == "__ephemeral_asset_job__"
    body = json.loads(record.value)
    assert body["schema"] == "nova.jobs.dlq.v1"
    assert body["run_id"] == run_id
    assert body["asset_keys"] == ["fragile_cache"]
    assert body["failed_steps"] == ["fragile_cache"]
    assert body["error"]["type"] == "ConnectionError"
    assert "refused the connection" in body["error"]["message"]
    assert "fragile_cache" in body["error"]["stack"]
    assert body["retry_count"] == 2
    assert body["max_retries"] == 5
    assert body["run_started_at"].endswith("Z") and body["failed_at"].endswith("Z")
    assert body["run_started_at"] <= body["failed_at"]
    assert body["tags"][JOB_TAG] == "trending_1h"
    assert body["replay_of"] is None
    assert body["run_retry"] == {"attempt": 0, "max_retries": 0, "will_retry": False}
    assert body["truncated"] is False
    assert writing.DELIVERED_TAG in instance.get_run_by_id(run_id).tags


@pytest.mark.parametrize(("attempt", "will_retry"), [("0", True), ("2", False)])
def test_a_run_retried_as_a_whole_says_whether_another_attempt_follows(
    instance, kafka_dlq, attempt, will_retry
):
    fail_runs(instance, **{"dagster/max_retries": "2", "dagster/retry_number": attempt})
    evaluate(instance, kafka_dlq)
    [body] = messages(kafka_dlq)
    assert body["run_retry"] == {
        "attempt": int(attempt),
        "max_retries": 2,
        "will_retry": will_retry,
    }


def test_broker_stopped_nothing_lost_then_published_exactly_once(instance, private_kafka):
    kafka = kafka_for(private_kafka)
    down(private_kafka, services=("kafka",))
    [run_id] = fail_runs(instance)

    cursor, delivered, pending = evaluate(instance, kafka)
    assert (delivered, pending) == (0, 1)
    assert writing.DELIVERED_TAG not in instance.get_run_by_id(run_id).tags

    up(private_kafka, services=("kafka",))
    cursor, delivered, pending = evaluate(instance, kafka, cursor)
    assert (delivered, pending) == (1, 0)
    cursor, delivered, pending = evaluate(instance, kafka, cursor)
    assert (delivered, pending) == (0, 0)
    assert [m["run_id"] for m in messages(kafka)] == [run_id]


def test_broker_paused_beyond_the_timeout_delivers_after_resume(instance, private_kafka):
    kafka = kafka_for(private_kafka)
    [run_id] = fail_runs(instance)
    pid = started_pid(private_kafka, "kafka")
    os.kill(pid, signal.SIGSTOP)
    try:
        cursor, delivered, pending = evaluate(instance, kafka)
        assert (delivered, pending) == (0, 1)
    finally:
        os.kill(pid, signal.SIGCONT)
    for _ in range(5):
        cursor, delivered, pending = evaluate(instance, kafka, cursor)
        if pending == 0:
            break
    assert pending == 0
    # The first attempt may also have landed late: at least once, one run after de-duplication.
    run_ids = [m["run_id"] for m in messages(kafka)]
    assert set(run_ids) == {run_id}


def test_twelve_failures_drain_within_three_evaluations(instance, kafka_dlq):
    run_ids = fail_runs(instance, 12)
    cursor = None
    for _ in range(3):
        cursor, _, pending = evaluate(instance, kafka_dlq, cursor)
        if pending == 0:
            break
    assert sorted(m["run_id"] for m in messages(kafka_dlq)) == sorted(run_ids)


def test_a_run_stamped_before_the_watermark_is_still_delivered(instance, kafka_dlq):
    # The last run handled came from a host whose clock ran a minute ahead; this one fails now.
    ahead = sensors.PublisherCursor(datetime.now(UTC).timestamp() + 60).serialize()
    [run_id] = fail_runs(instance)
    _, delivered, pending = evaluate(instance, kafka_dlq, ahead)
    assert (delivered, pending) == (1, 0)
    assert [m["run_id"] for m in messages(kafka_dlq)] == [run_id]


def test_many_delivered_runs_never_stall_the_walk(instance, kafka_dlq):
    @dg.job
    def idle():
        pass

    # More delivered failures than one page holds, then one that is not delivered yet.
    for _ in range(sensors.RUNS_PER_PAGE + 20):
        run = instance.create_run_for_job(
            idle, tags={writing.DELIVERED_TAG: writing.DELIVERED_VALUE}
        )
        instance.report_run_failed(run)
    [run_id] = fail_runs(instance)
    cursor, delivered, pending = evaluate(instance, kafka_dlq)
    assert (delivered, pending) == (1, 0)
    assert [m["run_id"] for m in messages(kafka_dlq)] == [run_id]
    assert evaluate(instance, kafka_dlq, cursor)[1:] == (0, 0)


def _oversized(
    stack: str = "", tags: dict[str, str] | None = None, message: str = "boom", run_id: str = "r2"
) -> dict:
    return {
        "schema": writing.SCHEMA,
        "job_name": "trending_1h",
        "run_id": run_id,
        "asset_keys": ["trending_posts_1h"],
        "error": {"type": "RuntimeError", "message": message, "stack": stack},
        "tags": tags or {},
        "truncated": False,
    }


def test_an_oversized_payload_is_truncated_and_marked_not_dropped():
    message = _oversized(stack="s" * 3_000_000, message="m" * 50_000, run_id="r1")
    encoded = writing.encode(message, limit=writing.MAX_MESSAGE_BYTES)
    assert len(encoded) <= writing.MAX_MESSAGE_BYTES
    body = json.loads(encoded)
    assert body["truncated"] is True
    assert body["run_id"] == "r1"
    assert body["error"]["stack"].startswith("sss") and body["error"]["stack"].endswith("sss")
    assert "[truncated]" in body["error"]["stack"]
    assert (
        json.loads(writing.encode(message | {"error": {"type": "E", "message": "", "stack": ""}}))[
            "truncated"
        ]
        is False
    )


def test_a_non_ascii_stack_is_cut_to_the_room_left_not_dropped():
    encoded = writing.encode(_oversized(stack="ошибка в строке\n" * 300_000))
    assert len(encoded) <= writing.MAX_MESSAGE_BYTES
    stack = json.loads(encoded)["error"]["stack"]
    assert stack.startswith("ошибка") and stack.endswith("строке\n")
    assert len(stack.encode()) > writing.MAX_MESSAGE_BYTES * 0.8


def test_text_that_is_not_utf8_still_encodes():
    stack = "File '/srv/caf\udce9.py', line 3\n"
    body = json.loads(writing.encode(_oversized(stack=stack)))
    assert body["error"]["stack"] == stack
    assert len(writing.encode(_oversized(stack=stack * 100_000))) <= writing.MAX_MESSAGE_BYTES


def test_thousands_of_tags_still_fit():
    tags = {f"team/label-{i}": "v" * 500 for i in range(8000)}
    encoded = writing.encode(_oversized(stack="frame\n", tags=tags))
    assert len(encoded) <= writing.MAX_MESSAGE_BYTES
    body = json.loads(encoded)
    assert body["truncated"] is True
    assert body["error"]["message"] == "boom"
    assert 100 < len(body["tags"]) < 8000
    assert all(v == "v" * 200 for v in body["tags"].values())


def test_an_oversized_payload_reaches_the_broker(kafka_dlq):
    assert kafka_dlq.publish("trending_7d", writing.encode(_oversized(stack="frame\n" * 900_000)))
    [body] = messages(kafka_dlq)
    assert body["truncated"] is True


# -- replay -----------------------------------------------------------------------------------


def _message(job="trending_1h", run_id=None, **extra):
    body = {
        "schema": writing.SCHEMA,
        "job_name": job,
        "run_id": run_id or uuid.uuid4().hex,
        "asset_keys": ["trending_posts_1h"],
    }
    return json.dumps(body | extra).encode()


def _replay_tick(instance, kafka_dlq, cursor=None):
    from nova_assets import definitions

    replay = definitions.defs.resolve_sensor_def("dlq_replay")
    with dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"kafka_dlq": kafka_dlq}
    ) as context:
        return replay.evaluate_tick(context)


def test_replay_runs_each_failed_run_once_by_its_assets_and_skips_bad_messages(kafka_dlq, instance):
    good = [uuid.uuid4().hex for _ in range(2)]
    payloads = [
        _message(run_id=good[0]),
        b"not json at all",
        json.dumps({"schema": writing.SCHEMA, "job_name": "trending_1h"}).encode(),
        _message(schema="nova.jobs.dlq.v0"),
        _message(job="no_such_job", asset_keys=[]),
        json.dumps(["a", "list"]).encode(),
        _message(asset_keys=["no_such_asset"]),
        # The at-least-once duplicate of the first failure: replayed once.
        _message(run_id=good[0]),
        # A UI run (Dagster's implicit asset job) of two assets: each replayed by its own job.
        _message(
            job="__ASSET_JOB", run_id=good[1], asset_keys=["trending_posts_1h", "suggested_users"]
        ),
        # A failed replay: left to an operator, never replayed automatically.
        _message(run_id=uuid.uuid4().hex, replay_of=good[0]),
    ]
    for payload in payloads:
        assert kafka_dlq.publish("trending_1h", payload)

    result = _replay_tick(instance, kafka_dlq)
    requests = result.run_requests
    assert [(r.tags[writing.REPLAY_TAG], r.job_name) for r in requests] == [
        (good[0], "trending_1h"),
        (good[1], "trending_1h"),
        (good[1], "suggested_users"),
    ]
    assert [r.run_key for r in requests] == [
        f"replay:{good[0]}:trending_1h",
        f"replay:{good[1]}:trending_1h",
        f"replay:{good[1]}:suggested_users",
    ]
    assert [r.asset_selection for r in requests] == [
        [dg.AssetKey("trending_posts_1h")],
        [dg.AssetKey("trending_posts_1h")],
        [dg.AssetKey("suggested_users")],
    ]
    assert json.loads(result.cursor) == {"0": len(payloads)}

    # The same messages again launch nothing; a later message still replays.
    assert _replay_tick(instance, kafka_dlq, result.cursor).run_requests == []
    assert kafka_dlq.publish("trending_1h", _message(run_id="later"))
    later = _replay_tick(instance, kafka_dlq, result.cursor).run_requests
    assert [r.tags[writing.REPLAY_TAG] for r in later] == ["later"]


def test_a_replay_carries_the_failed_runs_config_for_its_own_op(kafka_dlq, instance):
    as_of = {"config": {"as_of": "2026-11-28T12:00:00Z"}}
    failed = dg.DagsterRun(
        job_name="__ASSET_JOB",
        run_id=uuid.uuid4().hex,
        status=dg.DagsterRunStatus.FAILURE,
        run_config={"ops": {"trending_posts_1h": as_of, "compute_suggested_users": as_of}},
    )
    instance.add_run(failed)
    assert kafka_dlq.publish(
        "trending_1h",
        _message(run_id=failed.run_id, asset_keys=["trending_posts_1h", "suggested_users"]),
    )
    requests = {r.job_name: r for r in _replay_tick(instance, kafka_dlq).run_requests}
    assert requests["trending_1h"].run_config == {"ops": {"trending_posts_1h": as_of}}
    assert requests["suggested_users"].run_config == {"ops": {"compute_suggested_users": as_of}}


def test_stored_offsets_past_the_end_are_reset_and_read_again(kafka_dlq, instance, capsys):
    """A topic recreated (or moved) under the sensor: its offsets start again from zero."""
    assert kafka_dlq.publish("trending_1h", _message(run_id="after-recreate"))
    result = _replay_tick(instance, kafka_dlq, cursor=json.dumps({"0": 500}))
    assert [r.tags[writing.REPLAY_TAG] for r in result.run_requests] == ["after-recreate"]
    assert json.loads(result.cursor) == {"0": 1}
    assert "past the partition's end" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b'{"run_id": "\xed\xa0\x80"}', "not UTF-8"),
        (b"{", "not JSON"),
        (b"42", "not a JSON object"),
        (json.dumps({"schema": writing.SCHEMA}).encode(), "job_name"),
        (_message(asset_keys="trending_posts_1h"), "asset_keys"),
        (_message(schema="other"), "unknown schema"),
        (_message(job="nope", asset_keys=[]), "unknown job"),
        (_message(asset_keys=["elsewhere"]), "not materialized by this code location"),
        (_message(replay_of=7), "replay_of"),
    ],
)
def test_each_malformed_kind_has_a_reason(payload, reason):
    parsed = reading.parse_message(payload, {"trending_posts_1h": "trending_1h"})
    assert isinstance(parsed, str)
    assert reason in parsed


# -- the operator's view and alerts -----------------------------------------------------------


def test_dlq_list_shows_published_messages_newest_first(instance, kafka_dlq):
    run_ids = fail_runs(instance, 3)
    evaluate(instance, kafka_dlq)
    command = [str(Path(sys.executable).parent / "nova-assets"), "dlq", "list"]
    env = os.environ | {"DLQ_TOPIC": kafka_dlq.topic, "KAFKA_BROKERS": KAFKA_BROKERS}
    listed = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    lines = listed.splitlines()
    assert lines[0].split() == [
        *("failed", "at", "job", "run", "id", "error", "type", "retries", "replay", "of", "offset")
    ]
    assert [line.split()[2] for line in lines[1:]] == list(reversed(run_ids))
    assert all("ConnectionError" in line and "2/5" in line for line in lines[1:])

    only = subprocess.run(
        [*command, "--job", "cache_warmer"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "no messages" in only

    # Reading back only the newest message still shows the newest, and says what it left out.
    newest = subprocess.run(
        [*command, "--scan", "1"], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert newest[1].split()[2] == run_ids[-1]
    assert newest[-1] == "(2 older messages not read (raise --scan to look further back))"


class _Recorder(BaseHTTPRequestHandler):
    posts: typing.ClassVar[list[dict]] = []

    def do_POST(self):
        length = int(self.headers["Content-Length"])
        type(self).posts.append(json.loads(self.rfile.read(length)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_webhook_gets_one_post_per_final_failure(instance, kafka_dlq):
    _Recorder.posts = []
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        alerts = AlertWebhookResource(url=f"http://127.0.0.1:{server.server_port}/hook")
        run_ids = fail_runs(instance, 2)
        cursor, delivered, _ = evaluate(instance, kafka_dlq, alerts=alerts)
        evaluate(instance, kafka_dlq, cursor, alerts=alerts)
    finally:
        server.shutdown()
    assert delivered == 2
    assert len(_Recorder.posts) == 2
    for post, run_id in zip(_Recorder.posts, run_ids, strict=True):
        assert "ConnectionError" in post["text"]
        assert f"/runs/{run_id}" in post["text"]
        assert "fragile_cache" in post["text"]


def test_no_webhook_configured_sends_nothing():
    assert AlertWebhookResource().notify_failure({"run_id": "r", "job_name": "j"}) is False


def test_the_replay_sensor_is_stopped_and_the_publisher_running_by_default():
    from nova_assets import definitions

    assert definitions.defs.resolve_sensor_def("dlq_replay").default_status == (
        dg.DefaultSensorStatus.STOPPED
    )
    assert definitions.defs.resolve_sensor_def("dlq_publisher").default_status == (
        dg.DefaultSensorStatus.RUNNING
    )


@dg.asset(name="trending_posts_1h", retry_policy=FAST_RETRIES)
def failing_trending() -> None:
    raise ConnectionError("Redis at 127.0.0.1:6379 refused the connection")


def test_a_failed_run_of_another_job_is_published_under_the_job_owning_its_asset(
    instance, kafka_dlq
):
    """A UI launch runs Dagster's implicit asset job; its message names the job of its asset."""
    failed = dg.materialize([failing_trending], instance=instance, raise_on_error=False)
    specs = job_specs(Settings.from_env({}))
    sensors.publish_failed_runs(
        instance,
        sensors.PublisherCursor(),
        kafka_dlq,
        AlertWebhookResource(),
        dg.get_dagster_logger(),
        specs,
    )
    [record] = kafka_dlq.read()
    body = json.loads(record.value)
    assert record.key == "trending_1h"
    assert (body["job_name"], body["run_id"]) == ("trending_1h", failed.run_id)
    assert body["asset_keys"] == ["trending_posts_1h"]
    # ... and the replay sensor replays it as that job.
    [request] = _replay_tick(instance, kafka_dlq).run_requests
    assert (request.job_name, request.tags[writing.REPLAY_TAG]) == ("trending_1h", failed.run_id)


def test_dlq_replay_command_launches_the_replay_through_the_instance(tmp_path):
    """`nova-assets dlq replay RUN_ID`: queued on the instance like any run, config included."""
    from nova_assets.core.contract import AsOfConfig

    @dg.asset(name="trending_posts_1h")
    def failing(config: AsOfConfig) -> None:
        raise ConnectionError("Redis refused the connection")

    # A queued coordinator and no daemon: the replay stays queued for the test to read.
    (tmp_path / "dagster.yaml").write_text(
        "run_coordinator:\n  module: dagster.core.run_coordinator\n"
        "  class: QueuedRunCoordinator\ntelemetry:\n  enabled: false\n"
    )
    as_of = {"config": {"as_of": "2026-11-28T12:00:00Z"}}
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        failed = dg.materialize(
            [failing],
            instance=instance,
            run_config={"ops": {"trending_posts_1h": as_of}},
            raise_on_error=False,
        )
    env = os.environ | {"DAGSTER_HOME": str(tmp_path)}
    command = [str(Path(sys.executable).parent / "nova-assets"), "dlq", "replay"]
    replayed = subprocess.run(
        [*command, failed.run_id], env=env, capture_output=True, text=True, check=False
    )
    assert replayed.returncode == 0, replayed.stderr
    unknown = subprocess.run(
        [*command, "no-such-run"], env=env, capture_output=True, text=True, check=False
    )
    assert unknown.returncode == 1 and "no run 'no-such-run'" in unknown.stderr

    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        [replay] = [r for r in instance.get_runs() if r.run_id != failed.run_id]
    assert replay.run_id in replayed.stdout
    assert replay.job_name == "trending_1h"
    assert replay.status == dg.DagsterRunStatus.QUEUED
    assert replay.tags[writing.REPLAY_TAG] == failed.run_id
    assert replay.tags[JOB_TAG] == "trending_1h"
    assert replay.run_config["ops"] == {"trending_posts_1h": as_of}
