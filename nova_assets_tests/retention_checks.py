"""The run retention under a real daemon, checked at the end of an end-to-end test's `dagster dev`.

The runs the daemon made are moved ten days back in the instance (a test may), beside a failed run
not delivered to the DLQ and a run in progress, both as old; then the daemon's `run_retention`
sensor must delete the old finished runs with their files and keep those two and the run of each
asset's latest materialization, which the UI's asset page still shows.
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

from nova_assets.defs.retention.prune import FINISHED, latest_materialization_runs
from nova_assets.internals.history_store import event_files

AGE_S = 10 * 86_400
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
    when = datetime.fromtimestamp(time.time() - AGE_S, UTC).replace(tzinfo=None)
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
    finished = [run.run_id for run in instance.get_runs(dg.RunsFilter(statuses=FINISHED))]
    aged = [*finished, running.run_id]
    with instance.run_storage.connect() as conn:  # type: ignore[attr-defined]
        conn.execute(
            db.text(
                "UPDATE runs SET create_timestamp = :when, update_timestamp = :when "
                "WHERE run_id IN :ids"
            ).bindparams(db.bindparam("ids", expanding=True)),
            {"when": when, "ids": aged},
        )
    files = {run_id: _files_of(instance, run_id) for run_id in finished}
    return {"aged": set(aged), "failed": failed.run_id, "running": running.run_id, "files": files}


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
        expected = keep | {aged["failed"], aged["running"]}
        return left if left <= expected else None

    left = poll("the daemon's retention deleting the old runs", pruned, log, timeout_s=120)
    assert {aged["failed"], aged["running"]} <= left, (aged["failed"], aged["running"], left)
    deleted = aged["aged"] - left - {aged["failed"]}
    assert deleted, "no old run was deleted"
    gone = [path for run_id in deleted for path in aged["files"].get(run_id, [])]
    if "DAGSTER_POSTGRES_URL" not in env:
        # Local instance: each deleted run's storage folder is gone too.
        assert gone and not any(path.exists() for path in gone), gone
    with instance_of(home, env) as instance:
        keys = instance.get_asset_keys()
        latest = {key: instance.get_latest_materialization_event(key) for key in keys}
    for key, event in latest.items():
        if event is None:  # a run of it is planned, none has materialized it yet
            continue
        shown = graphql(port, LATEST, {"key": {"path": key.path}})["assetOrError"]
        assert shown["assetMaterializations"][0]["runId"] == event.run_id
