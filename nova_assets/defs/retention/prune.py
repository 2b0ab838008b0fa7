"""Run retention: delete finished runs older than `RUN_RETENTION_DAYS`, their files with them.

Dagster keeps every run forever, and its `delete_run` removes a run's rows but not its files: its
folder under `storage/` (compute logs, step outputs) stays, and on an instance with a database
per run that file too. `prune` deletes a run with all of them, and has the local instance's single
event database give the freed pages back after each page of runs, so the disk space comes back
(docs/design.md §10). Kept whatever their age:

- the run that made the latest materialization of each asset (the UI's asset pages show it);
- a failed run whose DLQ delivery is not recorded (pending, or marked undeliverable: an operator
  replays it with its run config);
- a run not finished (queued, starting, in progress, canceling).

A successful run's detail goes after `DETAIL_KEPT_DAYS`: its files (compute logs) and the events
that only say how it went (`DETAIL_EVENTS`: outputs handled, resources started, engine events,
log lines). Its record stays for the whole retention with what the UI and the metrics read: its
status changes, step starts and successes, materializations, checks and planned events. A failed
run keeps all of it as long as the run.

What is deleted first goes into the ledger (`ledger.py`): the job totals its runs counted for, so
the counters never go down, and the ids about to go, so a prune cut short by a crash finishes
those runs first, next time, and counts none twice.
"""

import shutil
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg

from nova_assets.core.budget import Budget
from nova_assets.core.jobs import COUNTS_FOR_PREFIX
from nova_assets.defs.dlq.writing import DELIVERED_TAG, DELIVERED_VALUE
from nova_assets.defs.retention.ledger import Ledger, Retired
from nova_assets.internals.history_store import (
    delete_events,
    event_bytes,
    event_files,
    read_value,
    reclaim,
    write_value,
)

FINISHED = [
    dg.DagsterRunStatus.SUCCESS,
    dg.DagsterRunStatus.FAILURE,
    dg.DagsterRunStatus.CANCELED,
]
PAGE = 20
"""Runs read, judged and deleted at a time: the ledger is written once per page, and the budget
checked between pages (a page of the local instance takes about 0.3 s to delete, idle)."""
DETAIL_KEPT_DAYS = 1
"""How long a successful run keeps its detail: its files under `storage/` and `DETAIL_EVENTS`."""
DETAIL_EVENTS = frozenset(
    event_type.value
    for event_type in (
        dg.DagsterEventType.STEP_OUTPUT,
        dg.DagsterEventType.STEP_INPUT,
        dg.DagsterEventType.LOADED_INPUT,
        dg.DagsterEventType.HANDLED_OUTPUT,
        dg.DagsterEventType.ENGINE_EVENT,
        dg.DagsterEventType.RESOURCE_INIT_STARTED,
        dg.DagsterEventType.RESOURCE_INIT_SUCCESS,
        dg.DagsterEventType.RESOURCE_INIT_FAILURE,
        dg.DagsterEventType.STEP_WORKER_STARTING,
        dg.DagsterEventType.STEP_WORKER_STARTED,
        dg.DagsterEventType.LOGS_CAPTURED,
    )
)
"""A successful run's events that go with its detail, plain log lines with them: about half of
a run's event bytes (docs/decisions.md). None is read by the metrics, the DLQ or the
UI's asset pages; `LOGS_CAPTURED` points at the compute logs removed at the same time."""
DETAIL_CURSOR = "nova/retention/detail_through"
"""The creation time (ISO) of the newest successful run whose detail is already removed."""


@dataclass
class Pruned:
    """What one prune did (or, dry, would do)."""

    deleted: int = 0
    kept: int = 0
    bytes: int = 0
    more: bool = False
    """Runs past the retention may remain: the budget ran out first."""
    by_job: Counter[tuple[str, str]] = field(default_factory=Counter)
    longest_page_s: float = 0.0
    """The longest a page took to record and delete: the most one prune holds back other work."""
    thinned: int = 0
    """Successful runs past `DETAIL_KEPT_DAYS` whose detail was removed (the runs stay)."""

    def summary(self, dry_run: bool = False) -> str:
        verb = "would delete" if dry_run else "deleted"
        text = (
            f"{verb} {self.deleted} run(s) ({_mib(self.bytes)} on disk), kept {self.kept} "
            "past the retention (latest materializations, undelivered failures)"
        )
        if self.thinned:
            text += (
                f"; {'would remove' if dry_run else 'removed'} the compute logs and detail events "
                f"of {self.thinned} successful run(s) over {DETAIL_KEPT_DAYS} day(s) old"
            )
        return text + ("; more remain" if self.more else "")


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def cutoff_for(days: int, now: datetime | None = None) -> datetime:
    """Runs created before this instant are past a retention of `days`."""
    return (now or datetime.now(UTC)) - timedelta(days=days)


def latest_materialization_runs(instance: dg.DagsterInstance) -> set[str]:
    """The run that made the latest materialization of each asset the instance knows."""
    keys = instance.get_asset_keys()
    events = instance.get_latest_materialization_events(keys) if keys else {}
    return {event.run_id for event in events.values() if event is not None}


def must_keep(record: dg.RunRecord, keep: set[str]) -> bool:
    run = record.dagster_run
    if run.run_id in keep:
        return True
    return run.status == dg.DagsterRunStatus.FAILURE and DELIVERED_TAG not in run.tags


def counted_for(run: dg.DagsterRun, job_names: Iterable[str]) -> list[str]:
    """The jobs whose metrics count a run: its own job, or those tagged `counts_for` on it."""
    names = set(job_names)
    if run.job_name in names:
        return [run.job_name]
    return [
        tag.removeprefix(COUNTS_FOR_PREFIX)
        for tag, value in run.tags.items()
        if tag.startswith(COUNTS_FOR_PREFIX) and value == "true"
    ]


def retired_of(runs: Sequence[dg.DagsterRun], job_names: Iterable[str]) -> Retired:
    """What deleting `runs` takes from the counts the metrics recount from history."""
    totals: Retired = Counter()
    names = list(job_names)
    for run in runs:
        status = {dg.DagsterRunStatus.SUCCESS: "success", dg.DagsterRunStatus.FAILURE: "failure"}
        for job in counted_for(run, names):
            if run.status in status:
                totals[(job, status[run.status])] += 1
            if run.tags.get(DELIVERED_TAG) == DELIVERED_VALUE:
                totals[(job, "dlq")] += 1
    return totals


def footprint(instance: dg.DagsterInstance, run_id: str, storage: Path | None = None) -> int:
    """Bytes one run takes: its events (a file of its own, or rows) and its `storage/` folder."""
    shared = 0 if event_files(instance, run_id) else event_bytes(instance, run_id)
    return shared + folder_bytes(instance, run_id, storage)


def folder_bytes(instance: dg.DagsterInstance, run_id: str, storage: Path | None = None) -> int:
    """Bytes of one run's files: its event database, if it has one, and its `storage/` folder."""
    size = sum(path.stat().st_size for path in event_files(instance, run_id))
    return size + tree_bytes(storage_folder(instance, run_id, storage))


def tree_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (0 if it is not there)."""
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def storage_folder(instance: dg.DagsterInstance, run_id: str, storage: Path | None = None) -> Path:
    return (storage or Path(instance.storage_directory())) / run_id


def delete_run(instance: dg.DagsterInstance, run_id: str) -> None:
    """Delete a run with its events, compute logs, step outputs and (SQLite) its files."""
    files = event_files(instance, run_id)
    instance.delete_run(run_id)
    instance.compute_log_manager.delete_logs(prefix=[run_id])
    shutil.rmtree(storage_folder(instance, run_id), ignore_errors=True)
    for path in files:
        path.unlink(missing_ok=True)


def prune(
    instance: dg.DagsterInstance,
    job_names: Sequence[str],
    cutoff: datetime,
    budget: Budget,
    *,
    dry_run: bool = False,
    page: int = PAGE,
    storage: Path | None = None,
) -> Pruned:
    """Delete the finished runs created before `cutoff`, oldest first, until `budget` is spent.

    `job_names` are the jobs whose metrics count runs (the ledger keeps their totals). `storage`
    is the instance's storage folder when the instance object was opened elsewhere (read-only).

    Each page is recorded in the ledger before any of its runs is deleted; a page interrupted
    half-way (a crash, a kill) is finished at the start of the next prune.
    """
    ledger = Ledger.load(instance)
    done = Pruned()
    if ledger.pending and not dry_run:
        for run_id in ledger.pending:
            done.bytes += folder_bytes(instance, run_id)
            delete_run(instance, run_id)
        ledger.settle(instance)
        done.bytes += reclaim(instance)
    keep = latest_materialization_runs(instance)
    cursor: str | None = None
    while True:
        if budget.exhausted:
            done.more = True
            return done
        records = instance.get_run_records(
            filters=dg.RunsFilter(statuses=FINISHED, created_before=cutoff),
            limit=page,
            ascending=True,
            cursor=cursor,
        )
        if not records:
            break
        kept = [record.dagster_run for record in records if must_keep(record, keep)]
        doomed = [record.dagster_run for record in records if not must_keep(record, keep)]
        done.kept += len(kept)
        # The next page starts after a run that is still there: a deleted run is no cursor.
        if dry_run:
            cursor = records[-1].dagster_run.run_id
        elif kept:
            cursor = kept[-1].run_id
        retired = retired_of(doomed, job_names)
        done.by_job.update(retired)
        done.deleted += len(doomed)
        if dry_run:
            done.bytes += sum(footprint(instance, run.run_id, storage) for run in doomed)
            continue
        if doomed:
            started = time.monotonic()
            ledger.record(instance, retired, [run.run_id for run in doomed])
            for run in doomed:
                done.bytes += folder_bytes(instance, run.run_id)
                delete_run(instance, run.run_id)
            ledger.settle(instance)
            done.bytes += reclaim(instance)
            done.longest_page_s = max(done.longest_page_s, time.monotonic() - started)
    remove_old_detail(instance, done, budget, keep, dry_run=dry_run, page=page, storage=storage)
    return done


def remove_old_detail(
    instance: dg.DagsterInstance,
    done: Pruned,
    budget: Budget,
    keep: set[str],
    *,
    dry_run: bool = False,
    page: int = PAGE,
    storage: Path | None = None,
) -> None:
    """Remove the detail of successful runs created over `DETAIL_KEPT_DAYS` ago.

    Their `storage/` folders and their `DETAIL_EVENTS`. The runs in `keep` (each asset's latest
    materialization) keep theirs. Goes on from `DETAIL_CURSOR` (the newest such run already
    done), so each run is visited once.
    """
    before = cutoff_for(DETAIL_KEPT_DAYS)
    through = read_value(instance, DETAIL_CURSOR)
    after = datetime.fromisoformat(through) if through else None
    while True:
        if budget.exhausted:
            done.more = True
            return
        records = instance.get_run_records(
            filters=dg.RunsFilter(
                statuses=[dg.DagsterRunStatus.SUCCESS], created_before=before, created_after=after
            ),
            limit=page,
            order_by="create_timestamp",
            ascending=True,
        )
        if not records:
            return
        for record in records:
            run_id = record.dagster_run.run_id
            if run_id in keep:
                continue
            folder = storage_folder(instance, run_id, storage)
            files = tree_bytes(folder)
            events = delete_events(instance, run_id, DETAIL_EVENTS, dry_run=dry_run)
            if not (files or events):
                continue
            done.thinned += 1
            # Deleted events count as the pages `reclaim` gives back, as in `prune`.
            done.bytes += files + (events if dry_run else 0)
            if not dry_run:
                shutil.rmtree(folder, ignore_errors=True)
        after = max(record.create_timestamp for record in records)
        if not dry_run:
            write_value(instance, DETAIL_CURSOR, after.isoformat())
            done.bytes += reclaim(instance)
