"""Dead-letter queue (DESIGN.md §6): every finally failed run to Kafka, and replay back to Dagster.

Dagster's `run_failure_sensor` moves its cursor even when its evaluation raises, so publishing from
it would lose the message whenever Kafka is down. `dlq_publisher` instead walks the instance's
failed runs itself and marks a run only once the broker acknowledged its message: the tag
`nova/dlq_delivered` on the run is the durable record (the metrics count it), and the cursor
only moves past runs that carry it. A run that could not be delivered is tried again at the next
evaluation, so Kafka being down delays messages and loses none.
"""

import json
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg

from nova_assets.contract import STEP_RETRY_POLICY, iso_z
from nova_assets.resources import AlertWebhookResource, KafkaDLQResource

SCHEMA = "nova.jobs.dlq.v1"
DELIVERED_TAG = "nova/dlq_delivered"
DELIVERED_VALUE = "true"
REPLAY_TAG = "nova/replay_of"

MAX_MESSAGE_BYTES = 900_000
"""Below the broker's default message.max.bytes (1 MiB), leaving room for key and headers."""
TAGS_BUDGET = 64_000
"""Bytes of tags an oversized message keeps."""

PUBLISH_BUDGET_S = 30.0
"""Time one evaluation may spend publishing, well inside the sensor evaluation timeout (60 s)."""

LOOKBACK = timedelta(minutes=10)
"""How far behind its watermark the publisher looks again. A run's update time is its failure
event's own time, taken by the process that failed: a host whose clock runs behind, or a failure
stored late, stamps a run earlier than one already handled."""

RUNS_PER_PAGE = 100
_REQUIRED_FIELDS = {"schema": str, "job_name": str, "run_id": str, "asset_keys": list}


# -- the message ------------------------------------------------------------------------------


def describe_error(error: Any) -> dict[str, str]:
    """Type, message and stack of the error that started it all.

    Dagster wraps the user's exception (in RetryRequestedFromPolicy once retries run out, in
    Failure for permanent faults); the operator wants the one at the bottom of the chain, with
    every stack of the chain so nothing is hidden.
    """
    chain = [error]
    while chain[-1].cause is not None:
        chain.append(chain[-1].cause)
    root = chain[-1]
    return {
        "type": root.cls_name or "Error",
        "message": root.message.strip(),
        "stack": "\n".join("".join(e.stack) for e in reversed(chain)),
    }


def _error_of(instance: dg.DagsterInstance, run_id: str) -> tuple[dict[str, str], list[str]]:
    """The last step error of a run (or its run-level failure) and every step that failed."""
    failures = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.STEP_FAILURE
    ).records
    failed_steps = sorted(
        {r.event_log_entry.step_key for r in failures if r.event_log_entry.step_key}
    )
    if failures:
        error = failures[-1].event_log_entry.dagster_event.step_failure_data.error
        if error is not None:
            return describe_error(error), failed_steps
    run_failures = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.RUN_FAILURE
    ).records
    if run_failures:
        entry = run_failures[-1].event_log_entry
        data = entry.dagster_event.event_specific_data if entry.dagster_event else None
        if getattr(data, "error", None) is not None:
            return describe_error(data.error), failed_steps
        message = entry.message or "the run failed"
    else:
        message = "the run failed without an error event"
    return {"type": "RunFailure", "message": message, "stack": ""}, failed_steps


def _asset_keys(instance: dg.DagsterInstance, run: dg.DagsterRun) -> list[str]:
    if run.asset_selection:
        return sorted(key.to_user_string() for key in run.asset_selection)
    planned = instance.get_records_for_run(
        run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED
    ).records
    return sorted(
        {
            r.event_log_entry.dagster_event.asset_key.to_user_string()
            for r in planned
            if r.event_log_entry.dagster_event and r.event_log_entry.dagster_event.asset_key
        }
    )


def build_message(instance: dg.DagsterInstance, record: dg.RunRecord) -> dict[str, Any]:
    """The §6 payload of one failed run, read from the instance's records of it."""
    run = record.dagster_run
    error, failed_steps = _error_of(instance, run.run_id)
    retries = instance.get_records_for_run(
        run.run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY
    ).records
    attempt = int(run.tags.get("dagster/retry_number", "0"))
    run_max_retries = int(run.tags.get("dagster/max_retries", "0"))
    started = record.start_time or record.create_timestamp.timestamp()
    failed = record.end_time or record.update_timestamp.timestamp()
    return {
        "schema": SCHEMA,
        "job_name": run.job_name,
        "run_id": run.run_id,
        "asset_keys": _asset_keys(instance, run),
        "failed_steps": failed_steps,
        "error": error,
        "retry_count": len(retries),
        "max_retries": STEP_RETRY_POLICY.max_retries,
        "run_started_at": iso_z(datetime.fromtimestamp(started, UTC)),
        "failed_at": iso_z(datetime.fromtimestamp(failed, UTC)),
        # Dagster's hidden tags (".dagster/…": sockets, hosts) mean nothing to a consumer.
        "tags": {k: v for k, v in run.tags.items() if k != DELIVERED_TAG and not k.startswith(".")},
        "replay_of": run.tags.get(REPLAY_TAG),
        # Runs retried as a whole by Dagster (dagster/max_retries) say whether one follows.
        "run_retry": {
            "attempt": attempt,
            "max_retries": run_max_retries,
            "will_retry": attempt < run_max_retries,
        },
        "truncated": False,
    }


def _json(value: Any) -> bytes:
    # A lone surrogate (text decoded with surrogateescape) cannot be UTF-8: written as its JSON
    # escape instead, so no failed run's message is ever unencodable.
    return _utf8(json.dumps(value, separators=(",", ":"), ensure_ascii=False))


def _utf8(text: str) -> bytes:
    return text.encode(errors="backslashreplace")


_CUT_NOTE = "\n…[truncated]…\n"


def _shorten(text: str, size: int) -> str:
    """`text` cut to about `size` UTF-8 bytes: its head and tail around a note."""
    raw = _utf8(text)
    if len(raw) <= size:
        return text
    half = max(0, size - len(_CUT_NOTE.encode())) // 2
    head = raw[:half].decode(errors="ignore")
    tail = raw[len(raw) - half :].decode(errors="ignore") if half else ""
    return head + _CUT_NOTE + tail


def _fitting(items: Mapping[str, str], room: int) -> dict[str, str]:
    """The first items (values cut to 200 characters) whose JSON fits in `room` bytes."""
    kept: dict[str, str] = {}
    for key, value in items.items():
        entry = {key: value[:200]}
        room -= len(_json(entry)) - 1  # its "key":"value" and a comma, without the braces
        if room < 0:
            break
        kept |= entry
    return kept


def encode(message: Mapping[str, Any], limit: int = MAX_MESSAGE_BYTES) -> bytes:
    """JSON bytes of `message`, never over `limit`; an oversized one is cut and marked, not dropped.

    The tags are bounded first (values to 200 characters, then as many whole tags as fit in
    `TAGS_BUDGET`), then the stack trace is cut (head and tail kept), then the error message;
    sizes are measured in encoded bytes.
    """
    raw = _json(message)
    if len(raw) <= limit:
        return raw
    cut = json.loads(raw)
    cut["truncated"] = True
    cut["tags"] = _fitting(cut["tags"], min(TAGS_BUDGET, limit // 4))
    error = cut["error"]
    for field in ("stack", "message"):
        # Escapes make a text longer in JSON than in UTF-8: shrink it in that proportion.
        while (overflow := len(_json(cut)) - limit) > 0 and error[field]:
            text = _utf8(error[field])
            in_json = len(_json(error[field]))
            size = len(text) * (in_json - overflow) // in_json - 64
            error[field] = _shorten(error[field], size) if size > len(_CUT_NOTE) * 2 else ""
    raw = _json(cut)
    if len(raw) > limit:
        raise ValueError(f"a DLQ message without stack and message is {len(raw)} bytes")
    return raw


@dataclass(frozen=True)
class ParsedMessage:
    job_name: str
    run_id: str
    asset_keys: tuple[str, ...]


def parse_message(value: bytes, job_assets: Mapping[str, Collection[str]]) -> ParsedMessage | str:
    """A replayable message, or the reason it is skipped.

    Args:
        value: The message as read from the topic.
        job_assets: Each job that may be replayed, with the asset keys it materializes.
    """
    try:
        body = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"not JSON ({exc})"
    if not isinstance(body, dict):
        return "not a JSON object"
    for field, kind in _REQUIRED_FIELDS.items():
        if not isinstance(body.get(field), kind):
            return f"missing or malformed field {field!r}"
    if body["schema"] != SCHEMA:
        return f"unknown schema {body['schema']!r}"
    job = body["job_name"]
    if job not in job_assets:
        return f"unknown job {job!r}"
    if not all(isinstance(k, str) for k in body["asset_keys"]):
        return "malformed field 'asset_keys'"
    # Checked here: a selection outside the job fails the whole tick when the daemon resolves it.
    foreign = sorted(set(body["asset_keys"]) - set(job_assets[job]))
    if foreign:
        return f"asset keys {foreign} are not materialized by job {job!r}"
    return ParsedMessage(job, body["run_id"], tuple(body["asset_keys"]))


# -- the publisher ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PublisherCursor:
    """Every failed run updated before `watermark - LOOKBACK` has been handled."""

    watermark: float = 0.0

    @classmethod
    def parse(cls, raw: str | None) -> "PublisherCursor":
        if not raw:
            return cls()
        return cls(float(json.loads(raw)["watermark"]))

    def serialize(self) -> str:
        return json.dumps({"watermark": self.watermark})

    def handled(self, record: dg.RunRecord) -> "PublisherCursor":
        return PublisherCursor(max(self.watermark, record.update_timestamp.timestamp()))


def publish_failed_runs(
    instance: dg.DagsterInstance,
    cursor: PublisherCursor,
    kafka_dlq: KafkaDLQResource,
    alerts: AlertWebhookResource,
    log: Any,
) -> tuple[PublisherCursor, int, int]:
    """Publish the failed runs not yet delivered, oldest failure first.

    Every evaluation looks again at the failed runs updated since `watermark - LOOKBACK`, page by
    page, and skips those tagged delivered: a run stamped earlier than one already handled (a
    failure stored late, or by a host whose clock runs behind) is still found, and any number of
    delivered runs in that span never stalls the walk.

    Returns:
        The new cursor, how many messages were delivered, and how many runs of the page at hand
        still wait (more may follow it).
    """
    since = datetime.fromtimestamp(cursor.watermark, UTC) - LOOKBACK
    deadline = time.monotonic() + PUBLISH_BUDGET_S
    delivered = 0
    seen: set[str] = set()
    while True:
        records = instance.get_run_records(
            filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE], updated_after=since),
            order_by="update_timestamp",
            ascending=True,
            limit=RUNS_PER_PAGE,
        )
        new_runs = 0
        for position, record in enumerate(records):
            run = record.dagster_run
            if run.run_id in seen:
                continue
            seen.add(run.run_id)
            new_runs += 1
            if DELIVERED_TAG in run.tags:
                cursor = cursor.handled(record)
                continue
            if time.monotonic() >= deadline:
                return cursor, delivered, len(records) - position
            message = build_message(instance, record)
            if not kafka_dlq.publish(run.job_name, encode(message)):
                log.warning(
                    f"Kafka did not acknowledge the DLQ message of run {run.run_id} "
                    f"({run.job_name}); it stays pending and is sent again at the next evaluation."
                )
                return cursor, delivered, len(records) - position
            instance.add_run_tags(run.run_id, {DELIVERED_TAG: DELIVERED_VALUE})
            alerts.notify_failure(message)
            delivered += 1
            cursor = cursor.handled(record)
        if len(records) < RUNS_PER_PAGE:
            return cursor, delivered, 0
        # The next page starts just before the last run of this one (`updated_after` is strict),
        # so runs sharing its instant are not skipped; those read twice are in `seen`. A page of
        # nothing new (a hundred runs of one microsecond) moves past that instant.
        last = records[-1].update_timestamp
        since = last - timedelta(microseconds=1) if new_runs else last


@dg.sensor(
    name="dlq_publisher",
    description="Publishes every finally failed run to the Kafka dead-letter topic, at least once.",
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def dlq_publisher(
    context: dg.SensorEvaluationContext,
    kafka_dlq: KafkaDLQResource,
    alerts: AlertWebhookResource,
) -> dg.SkipReason:
    cursor = PublisherCursor.parse(context.cursor)
    cursor, delivered, pending = publish_failed_runs(
        context.instance, cursor, kafka_dlq, alerts, context.log
    )
    context.update_cursor(cursor.serialize())
    if pending:
        return dg.SkipReason(f"Delivered {delivered} DLQ message(s); {pending} failed run(s) wait.")
    return dg.SkipReason(f"Delivered {delivered} DLQ message(s); nothing pending.")


# -- replay -----------------------------------------------------------------------------------


def build_dlq_replay_sensor(
    jobs: Sequence[Any], job_assets: Mapping[str, Collection[str]]
) -> dg.SensorDefinition:
    """`dlq_replay`: launches one new run per good DLQ message, tagged with the run it replays.

    Args:
        jobs: The jobs it may launch.
        job_assets: The asset keys each of those jobs materializes, by job name.
    """

    @dg.sensor(
        name="dlq_replay",
        description="Replays the dead-letter queue: one new run per message, never twice. "
        "Stopped by default; turn it on to drain the queue.",
        minimum_interval_seconds=15,
        default_status=dg.DefaultSensorStatus.STOPPED,
        jobs=list(jobs),
    )
    def dlq_replay(context: dg.SensorEvaluationContext, kafka_dlq: KafkaDLQResource):
        offsets = {int(p): o for p, o in json.loads(context.cursor or "{}").items()}
        records = kafka_dlq.read(offsets, max_messages=RUNS_PER_PAGE)
        requests = []
        for record in records:
            offsets[record.partition] = record.offset + 1
            parsed = parse_message(record.value, job_assets)
            where = f"{kafka_dlq.topic}:{record.partition}:{record.offset}"
            if isinstance(parsed, str):
                context.log.warning(f"Skipping DLQ message {where}: {parsed}.")
                continue
            requests.append(
                dg.RunRequest(
                    run_key=f"dlq:{where}",
                    job_name=parsed.job_name,
                    # No keys recorded: the job's whole selection.
                    asset_selection=[dg.AssetKey.from_user_string(k) for k in parsed.asset_keys]
                    or None,
                    tags={REPLAY_TAG: parsed.run_id},
                )
            )
        context.update_cursor(json.dumps({str(p): o for p, o in offsets.items()}))
        if not requests:
            return dg.SkipReason(f"No DLQ message to replay ({len(records)} read).")
        return requests

    return dlq_replay


# -- the operator's view ----------------------------------------------------------------------


LIST_SCAN = 10_000
"""Messages `dlq list` reads back from the end of each partition."""


def list_messages(
    kafka_dlq: KafkaDLQResource, job: str | None = None, limit: int = 20, scan: int = LIST_SCAN
) -> tuple[list[dict[str, Any]], str | None]:
    """The DLQ's messages, newest failure first, optionally for one job.

    Reads the newest `scan` messages of each partition, so the newest are always seen however long
    the topic. Returns the rows and, when not all of the topic was read, a note saying so.
    """
    bounds = kafka_dlq.bounds()
    starts = {p: max(low, high - scan) for p, (low, high) in bounds.items()}
    expected = sum(high - starts[p] for p, (_, high) in bounds.items())
    records = kafka_dlq.read(starts)
    notes = []
    if len(records) < expected:
        notes.append(f"read {len(records)} of the newest {expected} messages before the timeout")
    skipped = sum(starts[p] - low for p, (low, _) in bounds.items())
    if skipped:
        notes.append(f"{skipped} older messages not read (raise --scan to look further back)")
    rows = []
    for record in records:
        try:
            body = json.loads(record.value)
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = {"job_name": record.key, "error": {"type": "<not JSON>"}}
        if not isinstance(body, dict) or (job and body.get("job_name") != job):
            continue
        rows.append(body | {"_offset": f"{record.partition}:{record.offset}"})
    rows.sort(key=lambda b: str(b.get("failed_at", "")), reverse=True)
    return rows[:limit], "; ".join(notes) or None


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    header = ("failed at", "job", "run id", "error type", "retries")
    lines = [
        (
            str(r.get("failed_at", "?")),
            str(r.get("job_name", "?")),
            str(r.get("run_id", "?")),
            str((r.get("error") or {}).get("type", "?")),
            f"{r.get('retry_count', '?')}/{r.get('max_retries', '?')}",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *lines]
    )
