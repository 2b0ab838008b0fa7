"""Every DLQ message is untrusted input: no bytes on the topic stop a reader or a later message.

Property-based tests feed the parser and the `dlq list` table arbitrary bytes and arbitrary JSON
shapes; the broker tests produce each poison message an attacker (or a broken producer) could
write, followed by a good one, and check that `dlq list` and `dlq_replay` both get past them.
The publisher side: a message the broker refuses for good is cut once, then marked on its run,
and never blocks the next failure; runs of other code locations, and failures older than the
publisher, are not published.
"""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest
from confluent_kafka import Producer
from dagster._core.remote_origin import (
    GrpcServerCodeLocationOrigin,
    RemoteJobOrigin,
    RemoteRepositoryOrigin,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nova_assets import cli
from nova_assets.core.jobs import JOB_TAG, job_specs
from nova_assets.core.resources import AlertWebhookResource, KafkaDLQResource, KafkaRecord
from nova_assets.core.settings import Settings
from nova_assets.defs.dlq import reading, sensors, writing
from nova_assets_tests.conftest import KAFKA_BROKERS, create_topic
from nova_assets_tests.test_dlq import _message, _replay_tick, evaluate, fail_runs

ASSET_JOBS = {"trending_posts_1h": "trending_1h", "suggested_users": "suggested_users"}

POISON = {
    "200,000 nested [": b"[" * 200_000,
    "an integer of 5,000 digits": b'{"retry_count": 1' + b"0" * 5000 + b"}",
    "invalid UTF-8": b"\xff\xfe{}",
    "a JSON list": b'["a", "list"]',
    "null": b"null",
    "NaN": b'{"schema": NaN}',
    "a lone surrogate": b'{"job_name": "\\ud800", "run_id": "\\udfff"}',
    "a terminal escape": b'{"job_name": "\\u001b[2J\\u001b[31m", "error": {"type": "\\u0007"}}',
    "950 kB": b'{"error": {"stack": "' + b"x" * 950_000 + b'"}}',
    "3 MB": b'{"error": {"stack": "' + b"x" * 3_000_000 + b'"}}',
    "nested 20 levels": b'{"tags": ' + b'{"a": ' * 20 + b"1" + b"}" * 21,
}


def _record(value: bytes | None, key: str | None = "trending_1h", offset: int = 0) -> KafkaRecord:
    return KafkaRecord(0, offset, key, value or b"", 1_796_000_000_000)


def _printable(table: str) -> bool:
    return all(c.isprintable() for line in table.splitlines() for c in line)


# -- the parser and the table, property-based --------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
message_shapes = st.fixed_dictionaries(
    {},
    optional={
        "schema": st.just(writing.SCHEMA) | json_values,
        "job_name": st.sampled_from(["trending_1h", "__ASSET_JOB"]) | json_values,
        "run_id": st.uuids().map(str) | json_values,
        "asset_keys": st.just(["trending_posts_1h"]) | json_values,
        "error": json_values,
        "retry_count": json_values,
        "max_retries": json_values,
        "failed_at": json_values,
        "replay_of": st.none() | json_values,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.binary(max_size=2048), key=st.binary(max_size=64))
def test_any_bytes_parse_to_a_message_or_a_reason_and_list_as_a_row(value, key):
    parsed = reading.parse_message(value, ASSET_JOBS)
    assert isinstance(parsed, reading.ParsedMessage) or (isinstance(parsed, str) and parsed)
    record = _record(value, key.decode(errors="backslashreplace"))
    table = reading.format_table([reading.row_of(record)])
    assert len(table.splitlines()) == 2
    assert _printable(table)


@settings(max_examples=300, deadline=None)
@given(shape=message_shapes)
def test_any_json_shape_parses_to_a_message_or_a_reason_and_lists_as_a_row(shape):
    value = json.dumps(shape).encode()
    parsed = reading.parse_message(value, ASSET_JOBS)
    if isinstance(parsed, reading.ParsedMessage):
        assert parsed.run_id == shape["run_id"]
        assert set(parsed.asset_keys) <= set(ASSET_JOBS)
    else:
        assert isinstance(parsed, str) and parsed
    table = reading.format_table([reading.row_of(_record(value))])
    assert len(table.splitlines()) == 2
    assert _printable(table)


@pytest.mark.parametrize("name", sorted(POISON))
def test_each_poison_message_has_a_reason_or_a_row_and_never_raises(name):
    value = POISON[name]
    assert isinstance(reading.parse_message(value, ASSET_JOBS), str)
    row = reading.row_of(_record(value, key="\\xff\\xfe"))
    table = reading.format_table([row])
    assert _printable(table)
    assert len(max(table.splitlines(), key=len)) < 400


def test_unreadable_rows_say_why_and_where():
    rows = [reading.row_of(_record(POISON["200,000 nested ["], offset=7))]
    assert rows[0][reading.UNREADABLE] == "nested too deeply"
    line = reading.format_table(rows).splitlines()[1].split()
    assert line[1:3] == ["trending_1h", "(unreadable)"]
    assert line[-1] == "0:7"
    big = reading.row_of(_record(POISON["3 MB"]))
    assert "over the" in big[reading.UNREADABLE]


@pytest.mark.parametrize("error", ["boom", ["a", "list"], 42, None])
def test_an_error_of_any_shape_prints(error):
    value = _message(run_id="r-1", error=error)
    [line] = reading.format_table([reading.row_of(_record(value))]).splitlines()[1:]
    assert line.split()[1:4] == ["trending_1h", "r-1", "?"]


# -- not UTF-8: skipped, never replayed ---------------------------------------------------------

_BAD = "@@BAD@@"
INVALID_UTF8 = st.one_of(
    # A surrogate code point encoded as a character (U+D800..U+DFFF): json.loads on bytes, and
    # a decoder told "surrogatepass", take it.
    st.tuples(st.integers(0xA0, 0xBF), st.integers(0x80, 0xBF)).map(lambda t: bytes([0xED, *t])),
    st.sampled_from(
        [
            b"\xff",
            b"\xfe\xff",
            b"\x80",  # a continuation byte alone
            b"\xc0\x80",  # an overlong NUL
            b"\xe0\x80\xaf",  # an overlong "/"
            b"\xf4\x90\x80\x80",  # past U+10FFFF
            b"\xc3",  # a sequence cut short
            b"\xe2\x82",
            b"\xf8\x88\x80\x80\x80",  # five bytes
        ]
    ),
)
_PLAIN_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="@"), max_size=20)


def _strict_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _replayable(**extra: object) -> dict:
    """A message `dlq_replay` would replay, as a dict."""
    return {
        "schema": writing.SCHEMA,
        "job_name": "trending_1h",
        "run_id": uuid.uuid4().hex,
        "asset_keys": ["trending_posts_1h"],
        **extra,
    }


@settings(max_examples=300, deadline=None)
@given(
    where=st.sampled_from(["error", "tags", "failed_at", "key"]),
    head=_PLAIN_TEXT,
    bad=INVALID_UTF8,
    tail=_PLAIN_TEXT,
)
def test_a_replayable_message_holding_bytes_that_are_not_utf8_is_skipped(where, head, bad, tail):
    """Bytes that are not UTF-8 inside any string of an otherwise replayable message."""
    text = f"{head}{_BAD}{tail}"
    fields = {
        "error": {"error": {"type": "RuntimeError", "message": text}},
        "tags": {"tags": {"team": text}},
        "failed_at": {"failed_at": text},
        "key": {"tags": {text: "v"}},
    }[where]
    good = json.dumps(_replayable(**fields), ensure_ascii=False).encode()
    assert isinstance(reading.parse_message(good, ASSET_JOBS), reading.ParsedMessage)
    value = good.replace(_BAD.encode(), bad)
    parsed = reading.parse_message(value, ASSET_JOBS)
    assert isinstance(parsed, str) and parsed.startswith("not UTF-8"), parsed
    row = reading.row_of(_record(value))
    assert row[reading.UNREADABLE].startswith("not UTF-8")


@settings(max_examples=300, deadline=None)
@given(
    value=st.binary(max_size=1024)
    | st.tuples(st.integers(0, 200), INVALID_UTF8).map(
        lambda t: (lambda good: good[: t[0]] + t[1] + good[t[0] :])(
            json.dumps(_replayable()).encode()
        )
    )
)
def test_any_bytes_that_are_not_strict_utf8_are_skipped(value):
    assume(not _strict_utf8(value))
    parsed = reading.parse_message(value, ASSET_JOBS)
    assert isinstance(parsed, str) and parsed.startswith("not UTF-8"), parsed


def _levels(value: object) -> int:
    if isinstance(value, dict | list):
        children = value.values() if isinstance(value, dict) else value
        return 1 + max(map(_levels, children), default=0)
    return 0


def _digits(value: object) -> int:
    """Digits of the longest integer in `value`."""
    if isinstance(value, dict | list):
        children = value.values() if isinstance(value, dict) else value
        return max(map(_digits, children), default=0)
    if isinstance(value, int) and not isinstance(value, bool):
        return len(str(abs(value)))
    return 0


_TRICKY_TEXT = st.text(st.sampled_from('[]{}"\\,:0123456789 aé\u2028'), max_size=12)
_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(10**40), 10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TRICKY_TEXT
)
_trees = st.recursive(
    _leaves,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(_TRICKY_TEXT, children, max_size=3)
    ),
    max_leaves=30,
)


def _chain(levels: int, leaf: object) -> object:
    for level in range(levels):
        leaf = [leaf] if level % 2 else {"k": leaf}
    return leaf


@settings(max_examples=400, deadline=None)
@given(
    body=st.dictionaries(
        _TRICKY_TEXT,
        _trees | st.tuples(st.integers(0, 24), _trees).map(lambda t: _chain(*t)),
        max_size=3,
    )
)
def test_nesting_and_number_bounds_are_measured_outside_strings(body):
    """Brackets, quotes and digits inside strings count for nothing; outside, each one does."""
    read = reading.read_body(json.dumps(body, ensure_ascii=False).encode())
    if _digits(body) > reading.MAX_NUMBER_DIGITS:
        assert read == f"a number of more than {reading.MAX_NUMBER_DIGITS} digits"
    elif _levels(body) > reading.MAX_NESTING:
        assert read == f"nested deeper than {reading.MAX_NESTING} levels"
    else:
        assert read == body


# -- on the real broker ------------------------------------------------------------------------


def _produce(topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": KAFKA_BROKERS})
    for key, value in messages:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0


def test_poison_messages_on_the_topic_never_stop_a_later_one(kafka_dlq, instance):
    good, bad_key = uuid.uuid4().hex, uuid.uuid4().hex
    _produce(
        kafka_dlq.topic,
        [
            (b"\xff\xfe", _message(run_id=bad_key)),
            (b"trending_1h", b"[" * 200_000),
            (b"trending_1h", b'{"retry_count": 1' + b"0" * 5000 + b"}"),
            (b"trending_1h", json.dumps({"job_name": "trending_1h", "error": "boom"}).encode()),
            (b"trending_1h", json.dumps({"job_name": "trending_1h", "error": [1]}).encode()),
            (b"trending_1h", _message(run_id=good)),
        ],
    )

    command = [str(Path(sys.executable).parent / "nova-assets"), "dlq", "list"]
    env = os.environ | {"DLQ_TOPIC": kafka_dlq.topic, "KAFKA_BROKERS": KAFKA_BROKERS}
    listed = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[-1]: line for line in listed.stdout.splitlines()[1:]}
    assert sorted(rows) == [f"0:{offset}" for offset in range(6)]
    assert bad_key in rows["0:0"]
    assert "(unreadable)" in rows["0:1"] and "nested too deeply" in rows["0:1"]
    assert "(unreadable)" in rows["0:2"] and "digits" in rows["0:2"]
    assert good in rows["0:5"]

    result = _replay_tick(instance, kafka_dlq)
    assert sorted(r.tags[writing.REPLAY_TAG] for r in result.run_requests) == sorted(
        [bad_key, good]
    )
    assert json.loads(result.cursor) == {"0": 6}


def test_raw_surrogate_bytes_on_the_topic_are_skipped_and_listed_as_unreadable(kafka_dlq, instance):
    surrogate, good = uuid.uuid4().hex, uuid.uuid4().hex
    raw = json.dumps(_replayable(run_id=surrogate, error={"message": _BAD})).encode()
    _produce(
        kafka_dlq.topic,
        [
            (b"trending_1h", raw.replace(_BAD.encode(), b"\xed\xa0\x80")),
            (b"trending_1h", _message(run_id=good)),
        ],
    )
    result = _replay_tick(instance, kafka_dlq)
    assert [r.tags[writing.REPLAY_TAG] for r in result.run_requests] == [good]
    assert json.loads(result.cursor) == {"0": 2}

    rows, _ = reading.list_messages(kafka_dlq)
    unreadable = {row["_offset"]: row.get(reading.UNREADABLE) for row in rows}
    assert unreadable["0:0"].startswith("not UTF-8")
    assert unreadable["0:1"] is None


def _large_failure_on_a_small_topic(
    instance: dg.DagsterInstance, topic_kb: int, message_kb: int
) -> tuple[KafkaDLQResource, str]:
    """A topic taking at most `topic_kb` per message, and a failed run whose error is larger."""
    topic = f"test-dlq-{topic_kb}k-{uuid.uuid4().hex[:8]}"
    create_topic(topic, config={"max.message.bytes": str(topic_kb * 1024)})

    @dg.asset
    def large_failure() -> None:
        raise RuntimeError("x" * message_kb * 1000)

    result = dg.materialize(
        [large_failure], instance=instance, raise_on_error=False, tags={JOB_TAG: "trending_1h"}
    )
    kafka = KafkaDLQResource(brokers=KAFKA_BROKERS, topic=topic, delivery_timeout_s=5.0)
    return kafka, result.run_id


def test_a_message_the_topic_refuses_is_cut_or_marked_and_never_blocks_the_next(instance):
    kafka, refused_run = _large_failure_on_a_small_topic(instance, topic_kb=64, message_kb=500)
    [later] = fail_runs(instance)

    _, delivered, pending = evaluate(instance, kafka)
    assert (delivered, pending) == (1, 0)
    refused = instance.get_run_by_id(refused_run).tags
    assert writing.DELIVERED_TAG not in refused
    assert "too large" in refused[writing.UNDELIVERABLE_TAG].lower()
    assert [json.loads(r.value)["run_id"] for r in kafka.read()] == [later]
    assert instance.get_run_by_id(later).tags[writing.DELIVERED_TAG] == writing.DELIVERED_VALUE

    # Marked undeliverable, it is not tried again.
    assert evaluate(instance, kafka)[1:] == (0, 0)


def test_a_message_cut_to_a_quarter_is_delivered_when_it_then_fits(instance):
    kafka, run_id = _large_failure_on_a_small_topic(instance, topic_kb=400, message_kb=800)
    assert evaluate(instance, kafka)[1:] == (1, 0)
    [body] = [json.loads(r.value) for r in kafka.read()]
    assert body["run_id"] == run_id and body["truncated"] is True
    assert writing.UNDELIVERABLE_TAG not in instance.get_run_by_id(run_id).tags


def _foreign_run(instance: dg.DagsterInstance, location: str) -> str:
    origin = RemoteJobOrigin(
        RemoteRepositoryOrigin(
            GrpcServerCodeLocationOrigin(host="127.0.0.1", port=4000, location_name=location),
            "__repository__",
        ),
        "trending_1h",
    )
    run = dg.DagsterRun(
        job_name="trending_1h",
        run_id=uuid.uuid4().hex,
        status=dg.DagsterRunStatus.FAILURE,
        remote_job_origin=origin,
    )
    instance.add_run(run)
    return run.run_id


def test_only_this_code_locations_failures_are_published(instance, kafka_dlq):
    ours = _foreign_run(instance, "nova_assets")
    theirs = _foreign_run(instance, "another_team")

    @dg.asset
    def their_asset() -> None:
        raise RuntimeError("not ours")

    untagged = dg.materialize([their_asset], instance=instance, raise_on_error=False).run_id
    cursor, delivered, _ = sensors.publish_failed_runs(
        instance,
        sensors.PublisherCursor(),
        kafka_dlq,
        AlertWebhookResource(),
        dg.get_dagster_logger(),
        specs=job_specs(Settings.from_env({})),
        location="nova_assets",
    )
    assert delivered == 1
    assert [json.loads(r.value)["run_id"] for r in kafka_dlq.read()] == [ours]
    for other in (theirs, untagged):
        assert writing.DELIVERED_TAG not in instance.get_run_by_id(other).tags
    assert sensors.PublisherCursor.parse(cursor.serialize()).watermark > 0


def test_the_publisher_starts_from_its_first_evaluation(instance, kafka_dlq):
    from nova_assets import definitions

    [before] = fail_runs(instance)
    publisher = definitions.defs.resolve_sensor_def("dlq_publisher")
    resources = {"kafka_dlq": kafka_dlq, "alerts": AlertWebhookResource()}
    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        first = publisher.evaluate_tick(context)
    assert kafka_dlq.read() == []
    time.sleep(0.01)  # the next failure is stamped after the first evaluation
    [after] = fail_runs(instance)
    with dg.build_sensor_context(
        instance=instance, cursor=first.cursor, resources=resources
    ) as context:
        publisher.evaluate_tick(context)
    assert [json.loads(r.value)["run_id"] for r in kafka_dlq.read()] == [after]
    assert writing.DELIVERED_TAG not in instance.get_run_by_id(before).tags


@pytest.mark.parametrize("limit", ["0", "-1", "٦", "1.5", "", "9" * 5000])
def test_dlq_list_takes_only_whole_numbers_from_one(limit, capsys):
    with pytest.raises(SystemExit) as refused:
        cli.build_parser().parse_args(["dlq", "list", "--limit", limit])
    assert refused.value.code == 2
    assert "expected a whole number" in capsys.readouterr().err
    assert cli.build_parser().parse_args(["dlq", "list", "--limit", "1"]).limit == 1


def test_dlq_list_of_a_missing_topic_says_so(kafka_dlq, monkeypatch, capsys):
    monkeypatch.setenv("KAFKA_BROKERS", KAFKA_BROKERS)
    monkeypatch.setenv("DLQ_TOPIC", f"{kafka_dlq.topic}-missing")
    assert cli.main(["dlq", "list"]) == 1
    err = capsys.readouterr().err
    assert f"cannot read the topic '{kafka_dlq.topic}-missing'" in err
    assert "Unknown topic" in err and "Traceback" not in err
