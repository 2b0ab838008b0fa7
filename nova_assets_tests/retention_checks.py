"""The run retention under a real daemon, checked at the end of an end-to-end test's `dagster dev`.

The runs the daemon made are moved ten days back in the instance (a test may), beside a failed run
not delivered to the DLQ and a run in progress, both as old; then the daemon's `run_retention`
sensor must delete the old finished runs with their files and keep those two and the run of each
asset's latest materialization, which the UI's asset page still shows. One successful run, not
an asset's latest materialization, is moved two days back only: it stays, without its folder and
its detail events, and the UI's run page still shows its steps.
"""

import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import sqlalchemy as db

from nova_assets.defs.retention.prune import DETAIL_EVENTS, FINISHED, latest_materialization_runs
from nova_assets.internals.history_store import event_files

AGE_S = 10 * 86_400
THINNED_AGE_S = 2 * 86_400
"""Past a success's detail (a day), inside the retention (a week)."""
STEPS = """query Steps($runId: ID!) { runOrError(runId: $runId) {
    ... on Run { status stepStats { stepKey status endTime } } } }"""
LATEST = """query Latest($key: AssetKeyInput!) { assetOrError(assetKey: $key) {
    ... on Asset { assetMaterializations(limit: 1) { runId } } } }"""


@contextmanager
def instance_of(home: Path, env: dict[str, str]) -> Iterator[dg.DagsterInstance]:
    """The instance `dagster dev` runs on (its PostgreSQL URL comes from its environment)."""
    saved = os.environ.get("DAGSTER_POSTGRES_URL")
    if "DAGSTER_POSTGRES_URL" in env:
        os.environ["DAGSTER_POSTGRES_URL"] = env["DAGSTER_POSTGRES_URL"]
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            yield instance
    finally:
        if saved is None:
            os.environ.pop("DAGSTER_POSTGRES_URL", None)
        else:
            os.environ["DAGSTER_POSTGRES_URL"] = saved


def _files_of(instance: dg.DagsterInstance, run_id: str) -> list[Path]:
    folder = Path(instance.storage_directory()) / run_id
    return [*event_files(instance, run_id), *([folder] if folder.exists() else [])]


def _size(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        total += sum(f.stat().st_size for f in files)
    return total


def age_the_history(instance: dg.DagsterInstance) -> dict[str, Any]:
    """Move every finished run ten days back; add an old undelivered failure and run in progress."""
    # A job of no code location here: the DLQ publisher leaves it, so its delivery stays
    # unrecorded (a failure of ours would be delivered within seconds, and then may go).
    failed = dg.DagsterRun(
        job_name="a_job_elsewhere", run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.FAILURE
    )
    # In progress, with no start time and no worker of ours: run monitoring and `orphaned_runs`
    # leave it alone (a run NOT_STARTED this old, monitoring would fail for its start timeout).
    running = dg.DagsterRun(
        job_name="trending_1h", run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.STARTED
    )
    instance.add_run(failed)
    instance.add_run(running)
    latest = latest_materialization_runs(instance)
    # The oldest success that is no asset's latest materialization (no later run can make it one).
    [thinned, *_] = [
        run.run_id
        for run in instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.SUCCESS]))[::-1]
        if run.run_id not in latest
    ]
    assert event_types(instance, thinned) & (DETAIL_EVENTS | {None}), "no detail to remove"
    finished = [
        run.run_id
        for run in instance.get_runs(dg.RunsFilter(statuses=FINISHED))
        if run.run_id != thinned
    ]
    aged = [*finished, running.run_id]
    _move_back(instance, aged, AGE_S)
    _move_back(instance, [thinned], THINNED_AGE_S)
    files = {run_id: _files_of(instance, run_id) for run_id in [*finished, thinned]}
    return {
        "aged": set(aged),
        "failed": failed.run_id,
        "running": running.run_id,
        "thinned": thinned,
        "files": files,
    }


def _move_back(instance: dg.DagsterInstance, run_ids: list[str], seconds: float) -> None:
    """Move the runs' creation (and update) time `seconds` back, as if they ran then."""
    when = datetime.fromtimestamp(time.time() - seconds, UTC).replace(tzinfo=None)
    with instance.run_storage.connect() as conn:  # type: ignore[attr-defined]
        conn.execute(
            db.text(
                "UPDATE runs SET create_timestamp = :when, update_timestamp = :when "
                "WHERE run_id IN :ids"
            ).bindparams(db.bindparam("ids", expanding=True)),
            {"when": when, "ids": run_ids},
        )


def event_types(instance: dg.DagsterInstance, run_id: str) -> set[str | None]:
    """The types of a run's stored events, None for a plain log line."""
    return {
        entry.dagster_event.event_type_value if entry.dagster_event else None
        for entry in instance.all_logs(run_id)
    }


def check_the_retention(
    home: Path,
    env: dict[str, str],
    graphql: Callable[..., dict],
    port: int,
    poll: Callable[..., Any],
    log: Path,
) -> None:
    with instance_of(home, env) as instance:
        aged = age_the_history(instance)

    def pruned() -> set[str] | None:
        with instance_of(home, env) as instance:
            left = {run.run_id for run in instance.get_runs()} & aged["aged"]
            keep = latest_materialization_runs(instance)
            detail = event_types(instance, aged["thinned"]) & (DETAIL_EVENTS | {None})
        expected = keep | {aged["failed"], aged["running"]}
        return left if left <= expected and not detail else None

    left = poll(
        "the daemon's retention deleting the old runs and a success's detail",
        pruned,
        log,
        timeout_s=120,
    )
    # The success of two days ago stays, with its status, steps and materializations.
    with instance_of(home, env) as instance:
        kept = event_types(instance, aged["thinned"])
    kinds = dg.DagsterEventType
    assert {
        kinds.RUN_SUCCESS.value,
        kinds.STEP_SUCCESS.value,
        kinds.ASSET_MATERIALIZATION.value,
    } <= kept
    shown = graphql(port, STEPS, {"runId": aged["thinned"]})["runOrError"]
    assert shown["status"] == "SUCCESS" and shown["stepStats"], shown
    assert all(step["status"] == "SUCCESS" and step["endTime"] for step in shown["stepStats"]), (
        shown
    )
    assert {aged["failed"], aged["running"]} <= left, (aged["failed"], aged["running"], left)
    deleted = aged["aged"] - left - {aged["failed"]}
    assert deleted, "no old run was deleted"
    gone = [path for run_id in deleted for path in aged["files"].get(run_id, [])]
    if "DAGSTER_POSTGRES_URL" not in env:
        # Local instance: each deleted run's storage folder is gone too, and the thinned one's.
        gone += aged["files"][aged["thinned"]]
        assert gone and not any(path.exists() for path in gone), gone
    with instance_of(home, env) as instance:
        keys = instance.get_asset_keys()
        latest = {key: instance.get_latest_materialization_event(key) for key in keys}
    for key, event in latest.items():
        if event is None:  # a run of it is planned, none has materialized it yet
            continue
        shown = graphql(port, LATEST, {"key": {"path": key.path}})["assetOrError"]
        assert shown["assetMaterializations"][0]["runId"] == event.run_id
