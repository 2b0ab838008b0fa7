"""`nova-assets health` answers from the instance, read without writing, and from what Redis serves.

Each verdict on a real instance whose history is written in bulk: never run, all fresh, one job
failing three times, one late past its interval. The instance is only read: the folder's full
listing (names, sizes, modification times) is the same afterwards, for an instance that has never
run, one configured but never opened, the local layout with runs and events, and a run whose
event file is gone. Anything that is not a readable instance (no folder, an empty one, a zero-byte
or corrupt or missing-table database, a database that is a folder, a `dagster.yaml` that is not
YAML, a PostgreSQL server that does not answer) is exit 2 with one line on stderr, and nothing
is written there either. A Pushgateway that is down changes nothing. What Redis serves is
judged in `test_health_caches.py`.
"""

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import dagster as dg
import pytest

from nova_assets import cli
from nova_assets.core.cache_asset import HEALING_KEYS
from nova_assets.core.jobs import JOB_TAG, job_specs
from nova_assets.core.settings import Settings
from nova_assets.defs.dlq.writing import DELIVERED_TAG, DELIVERED_VALUE
from nova_assets.local.instance import initialize_pools, write_instance
from nova_assets_tests.history import FinishedRun, add_history, history_instance
from nova_assets_tests.layouts import write_per_run_instance

SPECS = job_specs(Settings.from_env({}))
COMMAND = str(Path(sys.executable).parent / "nova-assets")


def listing(root: Path) -> list[tuple[str, bool, int, int]] | None:
    """Everything under `root` (itself included): path, is a folder, size, mtime in ns."""
    if not root.exists():
        return None
    return sorted(
        (str(path.relative_to(root)), path.is_dir(), path.stat().st_size, path.stat().st_mtime_ns)
        for path in [root, *root.rglob("*")]
    )


def _health(
    home: Path, monkeypatch, capsys, *flags: str, redis_url: str = "redis://127.0.0.1:1/15"
) -> tuple[int, str, str]:
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("REDIS_URL", redis_url)
    code = cli.main(["health", *flags])
    out = capsys.readouterr()
    return code, out.out, out.err


def _fresh_history(now: float) -> list[FinishedRun]:
    """Every job succeeded a few seconds ago, after a failure an hour back."""
    return [
        run
        for spec in SPECS
        for run in (
            FinishedRun(spec.name, ok=False, start=now - 3600, end=now - 3590),
            FinishedRun(spec.name, ok=True, start=now - 10, end=now - 5),
        )
    ]


def _local_instance(home: Path) -> Path:
    """The layout `nova-assets instance` writes (make dev's), its storage created."""
    write_instance(home, 5)
    initialize_pools(home, ["clickhouse"])
    return home


# --- the instance, read without writing ---------------------------------------------------------


def _never_opened(home: Path) -> Path:
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return home


def _never_ran(home: Path) -> Path:
    with history_instance(home):
        pass
    return home


@pytest.mark.parametrize("make", [_never_ran, _never_opened, _local_instance])
def test_an_instance_that_never_ran_says_so_exits_1_and_is_left_as_it_was(
    make, tmp_path, monkeypatch, capsys
):
    home = make(tmp_path / "home")
    before = listing(home)
    code, out, err = _health(home, monkeypatch, capsys, "--json")
    assert (code, err) == (1, "")
    answer = json.loads(out)
    assert answer["overall"] == "never run"
    assert [job["verdict"] for job in answer["jobs"]] == ["never run"] * 5
    assert listing(home) == before


def _report_materializations(instance: dg.DagsterInstance, keys: Mapping[str, list[str]]) -> None:
    """Each asset materialized now, recording `keys[asset]` as the keys it wrote."""
    for asset, written in keys.items():
        instance.report_runless_asset_event(
            dg.AssetMaterialization(asset, metadata={HEALING_KEYS: dg.MetadataValue.json(written)})
        )


@dg.asset(name="trending_posts_1h")
def _stand_in() -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"dagster/row_count": 3})


@pytest.mark.parametrize("layout", ["one event database", "a database per run"])
def test_the_local_layout_with_runs_and_events_is_read_without_a_trace(
    layout, tmp_path, monkeypatch, capsys, redis_cache
):
    """Runs and their events, in one database or in a file per run: no file new afterwards."""
    home = tmp_path / "home"
    if layout == "one event database":
        _local_instance(home)
    else:
        write_per_run_instance(home)
    job = dg.define_asset_job("trending_1h", selection=[_stand_in], tags={JOB_TAG: "trending_1h"})
    definitions = dg.Definitions(assets=[_stand_in], jobs=[job])
    with dg.DagsterInstance.from_config(str(home)) as instance:
        done = definitions.resolve_job_def("trending_1h").execute_in_process(instance=instance)
        key = redis_cache.key("trending", "1h")
        _report_materializations(instance, {"trending_posts_1h": [key]})
    redis_cache.set_json(
        key, {"window": "1h", "generated_at": "2026-01-01T00:00:00Z", "items": []}, 600
    )
    shard = home / "history" / "runs" / f"{done.run_id}.db"
    assert shard.is_file() == (layout == "a database per run")
    before = listing(home)
    capsys.readouterr()  # the run's own log lines

    code, out, err = _health(home, monkeypatch, capsys, "--json", redis_url=redis_cache.url)
    assert err == ""
    jobs = {job["job_name"]: job for job in json.loads(out)["jobs"]}
    assert jobs["trending_1h"]["verdict"] == "ok"
    assert jobs["trending_1h"]["cache"]["state"] == "served"
    assert jobs["trending_24h"]["verdict"] == "never run"
    assert code == 1
    assert listing(home) == before
    if layout == "one event database":
        return

    # A run whose own event file is gone reads as a run without events.
    shard.unlink()
    before = listing(home)
    code, out, err = _health(home, monkeypatch, capsys, "--json", redis_url=redis_cache.url)
    assert (code, err) == (1, "")
    assert {job["job_name"]: job["verdict"] for job in json.loads(out)["jobs"]}[
        "trending_1h"
    ] == "ok"
    assert listing(home) == before


def _side_by_side(runs: Mapping[str, dict[str, str]]) -> dict[str, subprocess.CompletedProcess]:
    """`nova-assets health` once per environment, all at once; their outcomes by name."""
    started = {
        name: subprocess.Popen(
            [COMMAND, "health"],
            env=os.environ | env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, env in runs.items()
    }
    done = {}
    for name, process in started.items():
        out, err = process.communicate(timeout=120)
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return done


def _zero_bytes(home: Path) -> None:
    _local_instance(home)
    (home / "history" / "runs.db").write_bytes(b"")


def _a_folder(home: Path) -> None:
    (home / "history" / "runs.db").mkdir(parents=True)


def _not_sqlite(home: Path) -> None:
    _local_instance(home)
    (home / "history" / "runs.db").write_bytes(b"not a database" * 100)


def _corrupt(database: Path) -> None:
    database.write_bytes(database.read_bytes()[:100] + b"\0" * 4000)


def _corrupt_event_log(home: Path) -> None:
    _local_instance(home)
    _corrupt(home / "history" / "events" / "event_log.db")


def _corrupt_index(home: Path) -> None:
    write_per_run_instance(home)
    _corrupt(home / "history" / "runs" / "index.db")


def _no_tables(home: Path) -> None:
    (home / "history").mkdir(parents=True)
    with sqlite3.connect(home / "history" / "runs.db") as conn:
        conn.execute("CREATE TABLE something_else (x)")


def _not_yaml(home: Path) -> None:
    _local_instance(home)
    (home / "dagster.yaml").write_text("run_storage: [unclosed\n")


def _postgres_down(home: Path) -> None:
    home.mkdir()
    url = "postgresql+psycopg2://dagster:S3cret-pw@127.0.0.1:1/dagster"
    (home / "dagster.yaml").write_text(f"storage:\n  postgres:\n    postgres_url: {url}\n")


NOT_INSTANCES = {
    "no folder": (lambda home: None, "does not exist"),
    "an empty folder": (lambda home: home.mkdir(), "holds no Dagster instance"),
    "a zero-byte runs.db": (_zero_bytes, "runs.db is empty (0 bytes)"),
    "runs.db a folder": (_a_folder, "runs.db is not a file"),
    "runs.db not SQLite": (_not_sqlite, "runs.db is not a SQLite database"),
    "a corrupt event log": (_corrupt_event_log, "event_log.db cannot be read"),
    "a corrupt event index": (_corrupt_index, "index.db cannot be read"),
    "no Dagster tables": (_no_tables, "holds no `runs` table"),
    "dagster.yaml not YAML": (_not_yaml, "dagster.yaml cannot be read"),
    "PostgreSQL not answering": (_postgres_down, "cannot reach PostgreSQL at 127.0.0.1:1"),
}


def test_anything_not_a_readable_instance_exits_2_with_one_line_and_writes_nothing(tmp_path):
    homes, before = {}, {}
    for name, (make, _) in NOT_INSTANCES.items():
        homes[name] = tmp_path / name.replace(" ", "-")
        make(homes[name])
        before[name] = listing(homes[name])
    done = _side_by_side({name: {"DAGSTER_HOME": str(home)} for name, home in homes.items()})
    for name, (_, reason) in NOT_INSTANCES.items():
        ran = done[name]
        assert ran.returncode == 2, (name, ran.stderr)
        assert ran.stdout == "", name
        [line] = ran.stderr.splitlines()
        assert line.startswith(f"error: cannot read the Dagster instance in {homes[name]}: "), line
        assert reason in line, (name, line)
        assert "S3cret-pw" not in line
        assert listing(homes[name]) == before[name], name


# --- the verdicts, from the runs --------------------------------------------------------------


def test_all_jobs_fresh_exit_0_and_the_table_shows_each(tmp_path, monkeypatch, capsys, redis_url):
    with history_instance(tmp_path / "home") as instance:
        add_history(instance, _fresh_history(time.time()))
    code, out, _ = _health(tmp_path / "home", monkeypatch, capsys, redis_url=redis_url)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["job", "verdict"]
    assert [line.split()[:2] for line in lines[1:6]] == [[s.name, "ok"] for s in SPECS]
    assert lines[-1] == "overall: ok"


def test_failing_and_late_jobs_exit_1_with_their_verdicts(tmp_path, monkeypatch, capsys, redis_url):
    now = time.time()
    history = _fresh_history(now)
    history += [
        FinishedRun("suggested_users", ok=False, start=now - 4 + i, end=now - 3 + i)
        for i in range(3)
    ]
    # trending_7d (hourly) last succeeded three hours ago: past two intervals.
    history = [r for r in history if not (r.job_name == "trending_7d" and r.ok)]
    history.append(
        FinishedRun("trending_7d", ok=True, start=now - 3 * 3600, end=now - 3 * 3600 + 5)
    )
    # One failure of trending_1h delivered to the DLQ a moment ago, one still waiting.
    history += [
        FinishedRun(
            "trending_1h",
            ok=False,
            start=now - 3,
            end=now - 2,
            tags={DELIVERED_TAG: DELIVERED_VALUE},
        ),
        FinishedRun("trending_1h", ok=True, start=now - 2, end=now - 1),
    ]
    with history_instance(tmp_path / "home") as instance:
        add_history(instance, history)
    code, out, _ = _health(tmp_path / "home", monkeypatch, capsys, "--json", redis_url=redis_url)
    assert code == 1
    answer = json.loads(out)
    jobs = {job["job_name"]: job for job in answer["jobs"]}
    assert answer["overall"] == "failing"
    assert jobs["suggested_users"]["verdict"] == "failing"
    assert jobs["suggested_users"]["consecutive_failures"] == 3
    assert jobs["trending_7d"]["verdict"] == "late"
    assert jobs["trending_7d"]["last_success_age_sec"] > 2 * 3600
    assert jobs["trending_1h"]["verdict"] == "ok"
    assert jobs["trending_1h"]["dlq_delivered_last_hour"] == 1
    # The hour-old failures of every job were never delivered: pending.
    assert jobs["trending_1h"]["dlq_pending"] == 1
    assert jobs["suggested_users"]["dlq_pending"] == 4


def test_the_command_answers_the_same_with_the_pushgateway_down(tmp_path, redis_url):
    """The real command, as a probe runs it: the gateway's address plays no part."""
    with history_instance(tmp_path / "home") as instance:
        add_history(instance, _fresh_history(time.time()))
    answers = []
    for gateway in ("http://127.0.0.1:9091", "http://127.0.0.1:1"):
        env = os.environ | {
            "DAGSTER_HOME": str(tmp_path / "home"),
            "PUSHGATEWAY_URL": gateway,
            "REDIS_URL": redis_url,
        }
        done = subprocess.run(
            [COMMAND, "health", "--json"], env=env, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        answers.append(json.loads(done.stdout))
    for answer in answers:
        for job in answer["jobs"]:
            job.pop("last_success_age_sec")
    assert answers[0] == answers[1]
    assert answers[0]["overall"] == "ok"
