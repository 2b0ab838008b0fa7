"""Dead-letter messages read back from the topic: untrusted input, decoded within bounds.

Whatever is on the topic may not be ours: `read_body` bounds a message's size, numbers and
nesting before and after decoding, `parse_message` validates it into a replayable
`ParsedMessage` (or says why it is skipped) for `dlq_replay` and `nova-assets dlq replay`, and
`list_messages` reads the newest ones for `nova-assets dlq list`, an unreadable one included as a
row saying why. No byte of a message reaches the terminal unescaped.
"""

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nova_assets.core.contract import iso_z
from nova_assets.core.resources import KafkaDLQResource, KafkaRecord
from nova_assets.core.text_table import text_table
from nova_assets.defs.dlq.writing import SCHEMA, shorten

MAX_READ_BYTES = 2 * 1024 * 1024
"""The largest message a reader decodes: twice the broker's default `message.max.bytes`."""
MAX_NESTING = 16
"""The deepest nesting of arrays and objects a reader accepts; a §6 message has three levels."""
MAX_NUMBER_DIGITS = 32
"""Digits of the longest integer a reader accepts (Python refuses to parse some 4,300 and more)."""
_REQUIRED_FIELDS = {"schema": str, "job_name": str, "run_id": str, "asset_keys": list}
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
        return f"not JSON ({shorten(str(exc), 120)})"
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
    return text_table(header, lines)


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
