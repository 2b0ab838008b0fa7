"""Run retention on a real local instance, with runs made by `dagster job execute`.

The runs are really run (their event databases, compute logs and step outputs are Dagster's own),
then made older by moving their creation time back in the instance's run storage.
"""

import json
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest

from nova_assets.core.budget import Budget
from nova_assets.core.settings import load_settings
from nova_assets.defs.dlq.writing import DELIVERED_TAG, DELIVERED_VALUE, UNDELIVERABLE_TAG
from nova_assets.defs.retention.ledger import Ledger, retired_totals
from nova_assets.defs.retention.prune import DETAIL_EVENTS as PRUNED_DETAIL
from nova_assets.defs.retention.prune import cutoff_for, prune
from nova_assets.defs.retention.sensor import run_retention
from nova_assets.defs.retention.size import footprint_of
from nova_assets.local.instance import write_instance
from nova_assets_tests.layouts import write_per_run_instance
from nova_assets_tests.retention_checks import event_types

ROOT = Path(__file__).parents[1]
JOBS = ["pair_job", "broken_job"]
DAY = 86_400


def _execute(home: Path, job: str) -> str:
    """Run `job` of the retention jobs in a process of its own; its run id."""
    subprocess.run(
        [
            str(Path(sys.executable).parent / "dagster"),
            *("job", "execute", "-m", "nova_assets_tests.retention_jobs", "-j", job),
        ],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "DAGSTER_HOME": str(home)},
        capture_output=True,
        check=False,
        timeout=120,
    )
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return instance.get_runs(dg.RunsFilter(job_name=job), limit=1)[0].run_id


def _age(home: Path, run_ids: list[str], days: float) -> None:
    """Move the runs' creation (and update) time `days` back, as if they ran then."""
    when = datetime.fromtimestamp(time.time() - days * DAY, UTC).replace(tzinfo=None)
    with sqlite3.connect(home / "history" / "runs.db") as db:
        db.executemany(
            "UPDATE runs SET create_timestamp = ?, update_timestamp = ? WHERE run_id = ?",
            [(when, when, run_id) for run_id in run_ids],
        )


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """An instance with runs of 10 days ago: three of `pair_job`, two failed of `broken_job`.

    One failure was delivered to the DLQ, the other marked undeliverable; a sixth run is still
    in progress.
    """
    home = tmp_path_factory.mktemp("retention") / "home"
    write_instance(home, 5)
    runs = {f"pair_{i}": _execute(home, "pair_job") for i in range(3)}
    runs["delivered"] = _execute(home, "broken_job")
    runs["undelivered"] = _execute(home, "broken_job")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_run_tags(runs["delivered"], {DELIVERED_TAG: DELIVERED_VALUE})
        instance.add_run_tags(runs["undelivered"], {UNDELIVERABLE_TAG: "too large"})
        running = dg.DagsterRun(
            job_name="pair_job", run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.STARTED
        )
        instance.add_run(running)
        runs["running"] = running.run_id
    _age(home, list(runs.values()), days=10)
    return home, runs


def _copy(source: Path, target: Path) -> Path:
    """A copy of the instance at `source`, its config naming its own folders."""
    subprocess.run(["cp", "-a", str(source), str(target)], check=True)
    write_instance(target, 5)
    return target


def test_old_runs_go_with_their_files_and_what_must_stay_stays(history, tmp_path):
    home = _copy(history[0], tmp_path / "home")
    runs = history[1]
    before = _du(home)
    events = home / "history" / "events" / "event_log.db"
    events_before = events.stat().st_size
    with dg.DagsterInstance.from_config(str(home)) as instance:
        done = prune(instance, JOBS, cutoff_for(7), Budget(20))
        left = {run.run_id for run in instance.get_runs()}
        latest = instance.get_latest_materialization_event(dg.AssetKey("pair"))
        ledger = Ledger.load(instance)
    gone = {runs["pair_0"], runs["pair_1"], runs["delivered"]}
    assert left == set(runs.values()) - gone
    assert latest is not None and latest.run_id == runs["pair_2"]
    assert (done.deleted, done.kept, done.more) == (3, 2, False)
    for run_id in gone:
        assert not (home / "storage" / run_id).exists()
        assert not (home / "history" / "runs" / f"{run_id}.db").exists()
    assert (home / "storage" / runs["pair_2"] / "pair.numbers" / "result").is_file()
    after = _du(home)
    # What the prune says it freed is gone from the disk: the runs' folders, and the pages of
    # their events, which the event database gave back.
    assert before - after >= done.bytes > 3 * 20_000, (before, after, done.bytes)
    assert events.stat().st_size < events_before - 3 * 10_000
    assert ledger.pending == []
    assert ledger.totals == Counter(
        {("pair_job", "success"): 2, ("broken_job", "failure"): 1, ("broken_job", "dlq"): 1}
    )


def test_a_dry_run_changes_nothing_and_says_what_would_go(history, tmp_path):
    home = _copy(history[0], tmp_path / "home")
    before = sorted((p, p.stat().st_size) for p in home.rglob("*") if p.is_file())
    with dg.DagsterInstance.from_config(str(home)) as instance:
        done = prune(instance, JOBS, cutoff_for(7), Budget(20), dry_run=True)
        assert len(instance.get_runs()) == 6
        assert Ledger.load(instance).totals == Counter()
    assert (done.deleted, done.kept) == (3, 2) and done.bytes > 3 * 20_000
    assert sorted((p, p.stat().st_size) for p in home.rglob("*") if p.is_file()) == before


def test_on_a_home_with_a_database_per_run_the_run_s_file_goes_too(tmp_path):
    home = write_per_run_instance(tmp_path / "home")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        run = instance.add_run(
            dg.DagsterRun(job_name="pair_job", status=dg.DagsterRunStatus.SUCCESS)
        )
        instance.report_engine_event("a step", run)
    own_file = home / "history" / "runs" / f"{run.run_id}.db"
    assert own_file.is_file()
    _age(home, [run.run_id], days=10)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        done = prune(instance, JOBS, cutoff_for(7), Budget(20))
        assert instance.get_runs() == []
    assert done.deleted == 1 and done.bytes >= 100_000
    assert not own_file.exists()


def test_a_successful_run_s_detail_goes_after_a_day_and_the_run_stays(history, tmp_path):
    home = _copy(history[0], tmp_path / "home")
    runs = history[1]
    _age(home, list(runs.values()), days=2)
    folders = {name: home / "storage" / run_id for name, run_id in runs.items()}
    assert all(folders[name].is_dir() for name in ("pair_0", "pair_1", "pair_2", "delivered"))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        before = {name: event_types(instance, run_id) for name, run_id in runs.items()}
        dry = prune(instance, JOBS, cutoff_for(7), Budget(20), dry_run=True)
        assert all(folders[name].is_dir() for name in ("pair_0", "pair_1"))
        assert event_types(instance, runs["pair_0"]) == before["pair_0"]
        done = prune(instance, JOBS, cutoff_for(7), Budget(20))
        again = prune(instance, JOBS, cutoff_for(7), Budget(20))
        left = {run.run_id for run in instance.get_runs()}
        after = {name: event_types(instance, run_id) for name, run_id in runs.items()}
        materialized = instance.get_latest_materialization_event(dg.AssetKey("pair"))
    assert left == set(runs.values())
    assert (dry.thinned, done.thinned, again.thinned) == (2, 2, 0)
    assert done.deleted == 0 and dry.bytes > 20_000 and done.bytes > 10_000
    assert (
        "removed the compute logs and detail events of 2 successful run(s) over 1 day(s) old"
        in done.summary()
    )
    # The old successes lose their folders and their detail events: what stays is what the
    # metrics, the DLQ and the UI's run and asset pages read.
    assert not folders["pair_0"].exists() and not folders["pair_1"].exists()
    kinds = dg.DagsterEventType
    kept = {kinds.RUN_START.value, kinds.RUN_SUCCESS.value, kinds.STEP_START.value}
    kept |= {kinds.STEP_SUCCESS.value, kinds.ASSET_MATERIALIZATION.value}
    for name in ("pair_0", "pair_1"):
        assert {None, kinds.STEP_OUTPUT.value, kinds.ENGINE_EVENT.value} <= before[name]
        assert kept <= after[name] and not after[name] & (PRUNED_DETAIL | {None})
    # The latest materialization's run and the failures keep all of theirs.
    assert (folders["pair_2"] / "pair.numbers" / "result").is_file()
    assert folders["delivered"].is_dir() and folders["undelivered"].is_dir()
    for name in ("pair_2", "delivered", "undelivered"):
        assert after[name] == before[name]
    assert materialized is not None and materialized.run_id == runs["pair_2"]


def test_runs_inside_the_retention_stay(history, tmp_path):
    home = _copy(history[0], tmp_path / "home")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        done = prune(instance, JOBS, cutoff_for(11), Budget(20))
        assert len(instance.get_runs()) == 6
    assert done.deleted == 0


def test_a_spent_budget_deletes_nothing_and_says_more_remain(history, tmp_path):
    home = _copy(history[0], tmp_path / "home")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        done = prune(instance, JOBS, cutoff_for(7), Budget(0))
        assert len(instance.get_runs()) == 6
        assert done.more and done.deleted == 0
        # The next evaluation goes on; one run a page still finds them all.
        again = prune(instance, JOBS, cutoff_for(7), Budget(20), page=1)
        assert (again.deleted, again.more) == (3, False)


def test_a_prune_cut_short_finishes_its_page_and_counts_it_once(history, tmp_path):
    home = _copy(history[0], tmp_path / "home")
    runs = history[1]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        # A prune recorded its page and was killed before deleting it.
        Ledger.load(instance).record(
            instance, Counter({("pair_job", "success"): 1}), [runs["pair_0"]]
        )
        done = prune(instance, JOBS, cutoff_for(7), Budget(20))
        assert runs["pair_0"] not in {run.run_id for run in instance.get_runs()}
        assert retired_totals(instance, "pair_job") == {"success": 2, "failure": 0, "dlq": 0}
    assert done.deleted == 2  # pair_1 and the delivered failure; pair_0 was the page's


def test_the_footprint_counts_runs_files_and_bytes_and_drops_with_a_prune(history, tmp_path):
    home = _copy(history[0], tmp_path / "home")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        before = footprint_of(instance)
        prune(instance, JOBS, cutoff_for(7), Budget(20))
        after = footprint_of(instance)
    assert (before.runs, after.runs) == (6, 3)
    assert after.file_bytes == _du(home) < before.file_bytes
    on_disk = subprocess.run(
        ["du", "-s", "-B1", str(home)], check=True, capture_output=True, text=True
    )
    assert after.disk_bytes == int(on_disk.stdout.split()[0]) < before.disk_bytes
    assert after.files < before.files and after.indexed_events < before.indexed_events
    assert before.database_bytes is None


def test_the_sensor_prunes_past_the_setting_and_stops_at_zero(history, tmp_path, monkeypatch):
    home = _copy(history[0], tmp_path / "home")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        monkeypatch.setenv("RUN_RETENTION_DAYS", "0")
        load_settings.cache_clear()
        skipped = run_retention(dg.build_sensor_context(instance=instance))
        assert "every run is kept" in skipped.skip_message
        assert len(instance.get_runs()) == 6
        monkeypatch.setenv("RUN_RETENTION_DAYS", "7")
        load_settings.cache_clear()
        done = run_retention(dg.build_sensor_context(instance=instance))
        assert "deleted 3 run(s)" in done.skip_message, done.skip_message
        assert len(instance.get_runs()) == 3
    load_settings.cache_clear()


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "nova-assets"), "history", *args],
        env={"PATH": "/usr/bin:/bin", "DAGSTER_HOME": str(home), "NOVA_HOME": str(home.parent)},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_an_operator_sizes_and_prunes_the_history_by_hand(history, tmp_path):
    home = _copy(history[0], tmp_path / "home")
    listing = sorted((p, p.stat().st_size) for p in home.rglob("*") if p.is_file())
    size = _cli(home, "size", "--json")
    assert size.returncode == 0, size.stderr
    assert json.loads(size.stdout)["runs"] == 6
    dry = _cli(home, "prune", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would delete 3 run(s)" in dry.stdout and "kept 2" in dry.stdout
    # Neither wrote anything.
    assert sorted((p, p.stat().st_size) for p in home.rglob("*") if p.is_file()) == listing
    pruned = _cli(home, "prune")
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.startswith("Runs finished more than 7 day(s) ago: deleted 3 run(s)")
    assert json.loads(_cli(home, "size", "--json").stdout)["runs"] == 3
