"""Dead-letter messages read back from the topic: untrusted input, decoded within bounds.

Whatever is on the topic may not be ours: `read_body` bounds a message's size, numbers and
nesting before and after decoding, `parse_message` validates it into a replayable
`ParsedMessage` (or says why it is skipped) for `dlq_replay` and `nova-assets dlq replay`, and
`list_messages` reads the newest ones for `nova-assets dlq list`, an unreadable one included as a
row saying why. No byte of a message reaches the terminal unescaped.
"""

import heapq
import json
import re
import reprlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nova_assets.core.budget import Budget
from nova_assets.core.contract import iso_z
from nova_assets.core.resources import KafkaDLQResource, KafkaRecord
from nova_assets.core.text_table import text_table
from nova_assets.defs.dlq.writing import SCHEMA, shorten

MAX_READ_BYTES = 2 * 1024 * 1024
"""The largest message a reader decodes: twice the broker's default `message.max.bytes`."""
MAX_NESTING = 16
"""The deepest nesting of arrays and objects a reader accepts; a §6 message has three levels."""
MAX_NUMBER_DIGITS = 32
"""Digits of the longest number a reader accepts (Python refuses to parse some 4,300 and more)."""
_REQUIRED_FIELDS = {"schema": str, "job_name": str, "run_id": str, "asset_keys": list}
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
"""Run ids and job names as a message may carry them: printable, short, safe in a run key."""

# What is left of valid JSON text without its strings is numbers, literals, brackets and
# punctuation, so its numbers and its nesting are measured by a few C-speed passes over the bytes
# rather than a Python walk over every decoded value (a 2 MB message may hold a million). UTF-8
# never uses the byte of a quote or a backslash inside a multi-byte character, so strings are
# found in the bytes as they are.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_EMPTY_PAIR = re.compile(rb"\[\]|\{\}")
_LONG_NUMBER = re.compile(rb"[0-9]{%d}" % (MAX_NUMBER_DIGITS + 1))


def _nested_deeper(brackets: bytes, levels: int) -> bool:
    """Whether balanced `brackets` nest deeper than `levels`: each pass removes the innermost."""
    for _ in range(levels):
        if not brackets:
            return False
        brackets = _EMPTY_PAIR.sub(b"", brackets)
    return bool(brackets)


def read_body(value: bytes | None) -> dict[str, Any] | str:
    """The JSON object a message carries, or why it cannot be read.

    The message must be UTF-8 in the strict sense (no invalid byte and no encoded surrogate,
    which `json.loads` on bytes lets through) and is bounded before and after decoding: its
    size, its numbers' digits and its nesting (a value of 200,000 `[` would otherwise exhaust
    the parser's recursion). The checks cost a few passes over the text, whatever its shape.
    """
    if not value:
        return "empty message"
    if len(value) > MAX_READ_BYTES:
        return f"{len(value)} bytes, over the {MAX_READ_BYTES}-byte bound"
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 ({exc.reason} at byte {exc.start})"
    try:
        body = json.loads(text)
    except RecursionError:
        return "nested too deeply"
    except ValueError as exc:  # JSONDecodeError, and integers past Python's digit limit
        return f"not JSON ({shorten(str(exc), 120)})"
    if not isinstance(body, dict):
        return "not a JSON object"
    # The text is valid JSON, so every match of _STRING is exactly one string of it.
    skeleton = _STRING.sub(b"", value)
    if _LONG_NUMBER.search(skeleton):
        return f"a number of more than {MAX_NUMBER_DIGITS} digits"
    if _nested_deeper(skeleton.translate(None, _NOT_BRACKETS), MAX_NESTING):
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
LIST_STEP = 100
"""Messages of each partition `dlq list` reads at a time, the newest ones first."""
LIST_BUDGET_S = 30.0
"""How long `dlq list` reads before it shows what it found."""
ROW_TEXT = 200
"""Characters of each field a listed row keeps."""

UNREADABLE = "_unreadable"
"""The field of a listed row that holds why its message could not be read."""

_LISTED = ("failed_at", "job_name", "run_id", "retry_count", "max_retries", "replay_of")
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 2, 4, 4
_SHORT.maxstring = _SHORT.maxother = 40


def list_messages(
    kafka_dlq: KafkaDLQResource,
    job: str | None = None,
    limit: int = 20,
    scan: int = LIST_SCAN,
    budget: Budget | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """The DLQ's messages, newest failure first, optionally for one job.

    Reads the newest `scan` messages of each partition, a step of `LIST_STEP` at a time from the
    end backwards, so the newest are seen first however long the topic, and stops when the
    budget (`LIST_BUDGET_S`) is spent. It streams: one message is decoded at a time, and only
    the `limit` newest rows are kept, each cut to the fields the table shows, so what it holds
    does not grow with the topic. A message that cannot be read is listed too, as a row holding
    its reason under `UNREADABLE`, its key as job and the broker's timestamp as time. Returns
    the rows and, when not all of the topic was read, a note saying so.
    """
    budget = budget or Budget(LIST_BUDGET_S)
    # A min-heap of the rows kept: the oldest failure (of equal ones, the latest offset) on top.
    kept: list[tuple[str, tuple[int, int], dict[str, Any]]] = []
    read, complete = 0, True
    with kafka_dlq.reader(budget) as reader:
        bounds = reader.bounds()
        starts = {p: max(low, high - scan) for p, (low, high) in bounds.items()}
        for ranges in _steps_back(starts, {p: high for p, (_, high) in bounds.items()}):
            for record in reader.records(ranges):
                read += 1
                row = row_of(record)
                if job and row.get("job_name") != job:
                    continue
                entry = (_cell(row.get("failed_at", "")), (-record.partition, -record.offset), row)
                if len(kept) < limit:
                    heapq.heappush(kept, entry)
                else:
                    heapq.heappushpop(kept, entry)
            if not reader.done:
                complete = False
                break
    expected = sum(high - starts[p] for p, (_, high) in bounds.items())
    notes = []
    if not complete:
        notes.append(f"read the newest {read} of {expected} messages within {budget.seconds:g} s")
    skipped = sum(starts[p] - low for p, (low, _) in bounds.items())
    if skipped:
        notes.append(f"{skipped} older messages not read (raise --scan to look further back)")
    rows = [row for *_, row in sorted(kept, key=lambda e: (e[0], e[1]), reverse=True)]
    return rows, "; ".join(notes) or None


def _steps_back(
    starts: Mapping[int, int], ends: Mapping[int, int]
) -> Iterator[dict[int, tuple[int, int]]]:
    """Each partition's [start, end) in ranges of `LIST_STEP` offsets, the newest range first."""
    step = 0
    while True:
        ranges = {
            p: (max(starts[p], end - (step + 1) * LIST_STEP), end - step * LIST_STEP)
            for p, end in ends.items()
            if end - step * LIST_STEP > starts[p]
        }
        if not ranges:
            return
        yield ranges
        step += 1


def row_of(record: KafkaRecord) -> dict[str, Any]:
    """One listed row: the fields the table shows, or its key, time and why it cannot be read.

    Only those fields are kept, each cut to `ROW_TEXT` characters, so a row is small whatever
    the message held.
    """
    offset = f"{record.partition}:{record.offset}"
    body = read_body(record.value)
    if isinstance(body, dict):
        row = {field: _small(body[field]) for field in _LISTED if field in body}
        error = body.get("error")
        if isinstance(error, dict) and "type" in error:
            row["error"] = {"type": _small(error["type"])}
        return row | {"_offset": offset}
    sent = datetime.fromtimestamp(max(record.timestamp_ms, 0) / 1000, UTC)
    return {
        "job_name": None if record.key is None else record.key[:ROW_TEXT],
        "failed_at": iso_z(sent),
        UNREADABLE: body,
        "_offset": offset,
    }


def _small(value: Any) -> Any:
    """A field as a row keeps it: numbers and short text as they are, the rest cut."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value[:ROW_TEXT]
    return _SHORT.repr(value)[:ROW_TEXT]


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
