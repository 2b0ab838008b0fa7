"""The dead-letter message (docs/design.md §6): built from a failed run, encoded, parsed, listed.

The message is untrusted input once it is on the topic: `parse_message` validates it before a
replay, and `list_messages` reads it for `nova-assets dlq list`. `sensors.py` moves it between
Dagster and Kafka.
"""

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg

from nova_assets.core.contract import STEP_RETRY_POLICY, iso_z
from nova_assets.core.jobs import JobSpec, jobs_of_run
from nova_assets.core.resources import KafkaDLQResource, KafkaRecord

SCHEMA = "nova.jobs.dlq.v1"
DELIVERED_TAG = "nova/dlq_delivered"
DELIVERED_VALUE = "true"
REPLAY_TAG = "nova/replay_of"
UNDELIVERABLE_TAG = "nova/dlq_undeliverable"
"""On a failed run whose message the broker refuses for good; its value says why."""

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


def build_message(
    instance: dg.DagsterInstance, record: dg.RunRecord, specs: Sequence[JobSpec] = ()
) -> dict[str, Any]:
    """The §6 payload of one failed run, read from the instance's records of it.

    `job_name` is the job the run counts for (docs/design.md §5): its own, or for a run of
    another job (the UI's `__ASSET_JOB`) the job owning the first asset it materialized.
    """
    run = record.dagster_run
    jobs = jobs_of_run(instance, run, specs)
    error, failed_steps = _error_of(instance, run.run_id)
    # Each step retries on its own (every shard of suggestions): the count is the step's that
    # retried most, so it stays comparable with max_retries.
    retries = Counter(
        r.event_log_entry.step_key
        for r in instance.get_records_for_run(
            run.run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY
        ).records
    )
    attempt = int(run.tags.get("dagster/retry_number", "0"))
    run_max_retries = int(run.tags.get("dagster/max_retries", "0"))
    started = record.start_time or record.create_timestamp.timestamp()
    failed = record.end_time or record.update_timestamp.timestamp()
    return {
        "schema": SCHEMA,
        "job_name": jobs[0] if jobs else run.job_name,
        "run_id": run.run_id,
        "asset_keys": _asset_keys(instance, run),
        "failed_steps": failed_steps,
        "error": error,
        "retry_count": max(retries.values(), default=0),
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


# -- reading untrusted messages -------------------------------------------------------------

MAX_READ_BYTES = 2 * 1024 * 1024
"""The largest message a reader decodes: twice the broker's default `message.max.bytes`."""
MAX_NESTING = 16
"""The deepest nesting of arrays and objects a reader accepts; a §6 message has three levels."""
MAX_NUMBER_DIGITS = 32
"""Digits of the longest integer a reader accepts (Python refuses to parse some 4,300 and more)."""
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
"""Run ids and job names as a message may carry them: printable, short, safe in a run key."""


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise ValueError(f"a number of {len(digits)} digits")
    return int(digits)


def _depth(value: Any) -> int:
    """How deeply `value`'s arrays and objects nest, walked without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def read_body(value: bytes | None) -> dict[str, Any] | str:
    """The JSON object a message carries, or why it cannot be read.

    The message is bounded before and after decoding: its size, its integers and its nesting
    (a value of 200,000 `[` would otherwise exhaust the parser's recursion).
    """
    if not value:
        return "empty message"
    if len(value) > MAX_READ_BYTES:
        return f"{len(value)} bytes, over the {MAX_READ_BYTES}-byte bound"
    try:
        body = json.loads(value, parse_int=_bounded_int)
    except RecursionError:
        return "nested too deeply"
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"not JSON ({_shorten(str(exc), 120)})"
    if not isinstance(body, dict):
        return "not a JSON object"
    if _depth(body) > MAX_NESTING:
        return f"nested deeper than {MAX_NESTING} levels"
    return body


@dataclass(frozen=True)
class ParsedMessage:
    job_name: str
    run_id: str
    asset_keys: tuple[str, ...]
    replay_of: str | None = None


def parse_message(value: bytes | None, asset_jobs: Mapping[str, str]) -> ParsedMessage | str:
    """A replayable message, or the reason it is skipped. Never raises, whatever the bytes.

    Args:
        value: The message as read from the topic.
        asset_jobs: Each asset this code location materializes, with the job that owns it. A
            message is replayed by its asset keys, whatever job the failed run was; one without
            asset keys only when its job is one of ours.
    """
    try:
        return _validate(read_body(value), asset_jobs)
    except Exception as exc:  # a message is data: none of its faults may stop the reader
        return f"unreadable ({type(exc).__name__})"


def _validate(body: dict[str, Any] | str, asset_jobs: Mapping[str, str]) -> ParsedMessage | str:
    if isinstance(body, str):
        return body
    for field, kind in _REQUIRED_FIELDS.items():
        if not isinstance(body.get(field), kind):
            return f"missing or malformed field {field!r}"
    if body["schema"] != SCHEMA:
        return f"unknown schema {_cell(body['schema'])!r}"
    for field in ("job_name", "run_id"):
        if not _NAME.fullmatch(body[field]):
            return f"malformed field {field!r}"
    if not all(isinstance(k, str) for k in body["asset_keys"]):
        return "malformed field 'asset_keys'"
    replay_of = body.get("replay_of")
    if replay_of is not None and not (isinstance(replay_of, str) and _NAME.fullmatch(replay_of)):
        return "malformed field 'replay_of'"
    job = body["job_name"]
    # Checked here: a selection outside the code location fails the whole tick in the daemon.
    foreign = sorted(set(body["asset_keys"]) - set(asset_jobs))
    if foreign:
        shown = ", ".join(_cell(key, 40) for key in foreign[:3])
        return f"asset keys [{shown}] are not materialized by this code location"
    if not body["asset_keys"] and job not in set(asset_jobs.values()):
        return f"unknown job {job!r} and no asset keys"
    return ParsedMessage(job, body["run_id"], tuple(body["asset_keys"]), replay_of)


# -- the operator's view ----------------------------------------------------------------------


LIST_SCAN = 10_000
"""Messages `dlq list` reads back from the end of each partition."""

UNREADABLE = "_unreadable"
"""The field of a listed row that holds why its message could not be read."""


def list_messages(
    kafka_dlq: KafkaDLQResource, job: str | None = None, limit: int = 20, scan: int = LIST_SCAN
) -> tuple[list[dict[str, Any]], str | None]:
    """The DLQ's messages, newest failure first, optionally for one job.

    Reads the newest `scan` messages of each partition, so the newest are always seen however long
    the topic. A message that cannot be read is listed too, as a row holding its reason under
    `UNREADABLE`, its key as job and the broker's timestamp as time. Returns the rows and, when
    not all of the topic was read, a note saying so.
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
    rows = [row_of(record) for record in records]
    if job:
        rows = [row for row in rows if row.get("job_name") == job]
    rows.sort(key=lambda row: _cell(row.get("failed_at", "")), reverse=True)
    return rows[:limit], "; ".join(notes) or None


def row_of(record: KafkaRecord) -> dict[str, Any]:
    """One listed row: the message's object, or its key, time and why it cannot be read."""
    offset = f"{record.partition}:{record.offset}"
    body = read_body(record.value)
    if isinstance(body, dict):
        return body | {"_offset": offset}
    sent = datetime.fromtimestamp(max(record.timestamp_ms, 0) / 1000, UTC)
    return {
        "job_name": record.key,
        "failed_at": iso_z(sent),
        UNREADABLE: body,
        "_offset": offset,
    }


def _cell(value: Any, width: int = 64) -> str:
    """`value` as one printable line of at most `width` characters.

    No control character, terminal escape or lone surrogate of a message reaches the terminal.
    """
    text = value if isinstance(value, str) else repr(value)
    if len(text) > width:
        text = text[: width - 1] + "…"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows of `list_messages` as an aligned text table; any value of any shape prints."""
    header = ("failed at", "job", "run id", "error type", "retries", "replay of", "offset")
    lines = [
        tuple(_cell(cell) for cell in (_unreadable_cells(r) if UNREADABLE in r else _cells(r)))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *lines]
    )


def _cells(row: Mapping[str, Any]) -> tuple[Any, ...]:
    error = row.get("error")
    return (
        row.get("failed_at", "?"),
        row.get("job_name", "?"),
        row.get("run_id", "?"),
        error.get("type", "?") if isinstance(error, dict) else "?",
        f"{_cell(row.get('retry_count', '?'), 8)}/{_cell(row.get('max_retries', '?'), 8)}",
        row.get("replay_of") or "-",
        row.get("_offset", "?"),
    )


def _unreadable_cells(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return (
        row.get("failed_at", "?"),
        row.get("job_name") or "?",
        "(unreadable)",
        row[UNREADABLE],
        "-",
        "-",
        row.get("_offset", "?"),
    )
