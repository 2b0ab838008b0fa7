"""The dead-letter message we write (docs/design.md §6): built from a failed run, then encoded.

`build_messages` reads a failed run's records into its §6 payloads, one per job the run counts
for; `encode` turns each into JSON bytes that never exceed what the broker accepts, cutting an
oversized message rather than dropping it. The run tags here record the messages' fate on their
run: delivered (every one acknowledged; the metrics count one per job), undeliverable, or a
replay of another run. `publisher.py` publishes the messages; `reading.py` reads them back, as
untrusted input.
"""

import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from nova_assets.core.contract import STEP_RETRY_POLICY, iso_z
from nova_assets.core.jobs import JobSpec, executes, jobs_of_run

SCHEMA = "nova.jobs.dlq.v1"
DELIVERED_TAG = "nova/dlq_delivered"
"""On a failed run once the broker acknowledged every one of its messages."""
DELIVERED_VALUE = "true"
REPLAY_TAG = "nova/replay_of"
UNDELIVERABLE_TAG = "nova/dlq_undeliverable"
"""On a failed run whose message the broker refuses for good; its value says why."""

MAX_MESSAGE_BYTES = 900_000
"""Below the broker's default message.max.bytes (1 MiB), leaving room for key and headers."""
TAGS_BUDGET = 64_000
"""Bytes of tags an oversized message keeps."""


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


def _failures(instance: dg.DagsterInstance, run_id: str) -> list[tuple[str, Any]]:
    """Each step failure of a run, in order: its step key and its error (None if not recorded)."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records
    return [
        (entry.step_key, entry.dagster_event.step_failure_data.error)
        for entry in (r.event_log_entry for r in records)
        if entry.step_key and entry.dagster_event
    ]


def _run_error(instance: dg.DagsterInstance, run_id: str) -> dict[str, str]:
    """The run-level failure, for a run that failed outside any step."""
    run_failures = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.RUN_FAILURE
    ).records
    if run_failures:
        entry = run_failures[-1].event_log_entry
        data = entry.dagster_event.event_specific_data if entry.dagster_event else None
        if getattr(data, "error", None) is not None:
            return describe_error(data.error)
        message = entry.message or "the run failed"
    else:
        message = "the run failed without an error event"
    return {"type": "RunFailure", "message": message, "stack": ""}


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


@dataclass(frozen=True)
class _Part:
    """What one message covers of a failed run: a job, its asset keys and its steps."""

    job_name: str
    asset_keys: list[str]
    owns: Callable[[str], bool]
    """Whether a step key is one of this part's steps."""


def _parts(
    instance: dg.DagsterInstance, run: dg.DagsterRun, specs: Sequence[JobSpec]
) -> list[_Part]:
    """One part per job the run counts for; the whole run as one part when it counts for none."""
    keys = _asset_keys(instance, run)
    by_name = {spec.name: spec for spec in specs}
    jobs = jobs_of_run(instance, run, specs)
    if not jobs:
        return [_Part(run.job_name, keys, lambda _step: True)]
    parts = []
    for job in jobs:
        spec = by_name[job]
        parts.append(
            _Part(
                job,
                [key for key in keys if key == spec.asset] or [spec.asset],
                lambda step, node=spec.step: executes(frozenset([step]), node),
            )
        )
    return parts


def build_messages(
    instance: dg.DagsterInstance, record: dg.RunRecord, specs: Sequence[JobSpec] = ()
) -> list[dict[str, Any]]:
    """The §6 payloads of one failed run, read from the instance's records of it.

    One message per job the run counts for (docs/design.md §5, §6), keyed and named by that job,
    with only its asset keys, its failed steps, its error and its retries: a run of one job has
    one; a run of Dagster's `__ASSET_JOB` materializing assets of two jobs (the UI's
    Materialize) has two, each counted and replayed for its own job. A run that counts for no
    job of ours has one message under its own job name, with all of its asset keys.
    """
    run = record.dagster_run
    failures = _failures(instance, run.run_id)
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
    common = {
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
    messages = []
    for part in _parts(instance, run, specs):
        # A job whose own steps did not fail (they were skipped after another job's step
        # failed) carries the failures that stopped it.
        own = [(step, error) for step, error in failures if part.owns(step)] or failures
        errors = [error for _, error in own if error is not None]
        messages.append(
            {
                "schema": SCHEMA,
                "job_name": part.job_name,
                "run_id": run.run_id,
                "asset_keys": part.asset_keys,
                "failed_steps": sorted({step for step, _ in own}),
                "error": describe_error(errors[-1]) if errors else _run_error(instance, run.run_id),
                "retry_count": max(
                    (n for step, n in retries.items() if step and part.owns(step)), default=0
                ),
                **common,
            }
        )
    return messages


def _json(value: Any) -> bytes:
    # A lone surrogate (text decoded with surrogateescape) cannot be UTF-8: written as its JSON
    # escape instead, so no failed run's message is ever unencodable.
    return _utf8(json.dumps(value, separators=(",", ":"), ensure_ascii=False))


def _utf8(text: str) -> bytes:
    return text.encode(errors="backslashreplace")


_CUT_NOTE = "\n…[truncated]…\n"


def shorten(text: str, size: int) -> str:
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
            error[field] = shorten(error[field], size) if size > len(_CUT_NOTE) * 2 else ""
    raw = _json(cut)
    if len(raw) > limit:
        raise ValueError(f"a DLQ message without stack and message is {len(raw)} bytes")
    return raw
