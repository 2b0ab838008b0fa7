"""Long run histories, written in bulk: thousands of finished runs in seconds, not minutes.

Dagster's own path (`add_run`, then each event through `handle_new_event`) costs about 25 ms a
run; a year of Nova's schedules is over a million. These rows are what that path writes — the
run with its tags in the run storage, its RUN_START and RUN_SUCCESS/RUN_FAILURE events in the
event log — inserted a page at a time through Dagster's own tables, into an instance whose event
log is one SQLite database, the local instance's (`history_instance`).

Test and benchmark code: it writes Dagster's private tables (`RunsTable`, `RunTagsTable`,
`SqlEventLogStorageTable`) directly, so it is not part of the shipped package.
"""

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import yaml
from dagster._core.storage.event_log.schema import SqlEventLogStorageTable
from dagster._core.storage.runs.schema import RunsTable, RunTagsTable

from nova_assets.core.jobs import JOB_TAG
from nova_assets.local.instance import event_log_config


@dataclass(frozen=True)
class FinishedRun:
    job_name: str
    ok: bool
    start: float
    end: float
    tags: dict[str, str] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    log_events: int = 0
    """Log lines written between its start and its end, standing for a real run's step events."""
    log_bytes: int = 0
    """Bytes of message in each of those events."""


@contextmanager
def history_instance(home: Path) -> Iterator[dg.DagsterInstance]:
    """A persistent instance in `home` with the local instance's event log: one SQLite database."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(
        yaml.safe_dump(
            {"telemetry": {"enabled": False}, "event_log_storage": event_log_config(home)},
            sort_keys=False,
        )
    )
    with dg.DagsterInstance.from_config(str(home)) as instance:
        yield instance


def _naive_utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC).replace(tzinfo=None)


def _event(
    run: FinishedRun, kind: dg.DagsterEventType | None, timestamp: float, message: str = ""
) -> dict:
    """A status event of `kind`, or with no kind a log line (what `context.log` writes)."""
    entry = dg.EventLogEntry(
        error_info=None,
        level="INFO",
        user_message=message,
        run_id=run.run_id,
        timestamp=timestamp,
        dagster_event=dg.DagsterEvent(kind.value, job_name=run.job_name) if kind else None,
    )
    return {
        "run_id": run.run_id,
        "event": dg.serialize_value(entry),
        "dagster_event_type": kind.value if kind else None,
        "timestamp": _naive_utc(timestamp),
    }


def add_history(instance: dg.DagsterInstance, runs: Sequence[FinishedRun]) -> None:
    """Write `runs`, each finished, in the order given (their status events in that order)."""
    run_rows, tag_rows, event_rows = [], [], []
    for run in runs:
        tags = {JOB_TAG: run.job_name, **run.tags}
        status = dg.DagsterRunStatus.SUCCESS if run.ok else dg.DagsterRunStatus.FAILURE
        body = dg.DagsterRun(job_name=run.job_name, run_id=run.run_id, status=status, tags=tags)
        run_rows.append(
            {
                "run_id": run.run_id,
                "pipeline_name": run.job_name,
                "status": status.value,
                "run_body": dg.serialize_value(body),
                "create_timestamp": _naive_utc(run.start),
                "update_timestamp": _naive_utc(run.end),
                "start_time": run.start,
                "end_time": run.end,
            }
        )
        tag_rows += [{"run_id": run.run_id, "key": k, "value": v} for k, v in tags.items()]
        finished = dg.DagsterEventType.RUN_SUCCESS if run.ok else dg.DagsterEventType.RUN_FAILURE
        event_rows.append(_event(run, dg.DagsterEventType.RUN_START, run.start))
        step = (run.end - run.start) / (run.log_events + 1)
        filler = "step output " * (run.log_bytes // 12)
        event_rows += [
            _event(run, None, run.start + (i + 1) * step, filler) for i in range(run.log_events)
        ]
        event_rows.append(_event(run, finished, run.end))
    with instance.run_storage.connect() as connection:
        connection.execute(RunsTable.insert(), run_rows)
        connection.execute(RunTagsTable.insert(), tag_rows)
    with instance.event_log_storage.index_connection() as connection:
        connection.execute(SqlEventLogStorageTable.insert(), event_rows)


def spread(
    job_names: Sequence[str], count: int, until: float, every_s: float = 60.0, fail_every: int = 7
) -> list[FinishedRun]:
    """`count` runs of the jobs in turn, one every `every_s` seconds, ending at `until`.

    Every `fail_every`-th run fails.
    """
    first = until - count * every_s
    return [
        FinishedRun(
            job_name=job_names[i % len(job_names)],
            ok=i % fail_every != 0,
            start=first + i * every_s,
            end=first + i * every_s + 2.0,
        )
        for i in range(count)
    ]
