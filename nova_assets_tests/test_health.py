"""`nova-assets health` answers from the Dagster instance alone, with exit codes for probes.

Each verdict on a real instance whose history is written in bulk: never run, all fresh, one job
failing three times, one late past its interval; an instance folder that is missing or corrupt
(exit 2); and a Pushgateway that is down changes nothing.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from nova_assets import cli
from nova_assets.core.jobs import job_specs
from nova_assets.core.settings import Settings
from nova_assets.defs.dlq.writing import DELIVERED_TAG, DELIVERED_VALUE
from nova_assets_tests.history import FinishedRun, add_history, history_instance

SPECS = job_specs(Settings.from_env({}))


def _health(home: Path, monkeypatch, capsys, *flags: str) -> tuple[int, str, str]:
    monkeypatch.setenv("DAGSTER_HOME", str(home))
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


def test_an_instance_that_never_ran_says_so_and_exits_1(tmp_path, monkeypatch, capsys):
    with history_instance(tmp_path / "home"):
        pass
    code, out, _ = _health(tmp_path / "home", monkeypatch, capsys, "--json")
    assert code == 1
    answer = json.loads(out)
    assert answer["overall"] == "never run"
    assert [job["verdict"] for job in answer["jobs"]] == ["never run"] * 5


def test_all_jobs_fresh_exit_0_and_the_table_shows_each(tmp_path, monkeypatch, capsys):
    with history_instance(tmp_path / "home") as instance:
        add_history(instance, _fresh_history(time.time()))
    code, out, _ = _health(tmp_path / "home", monkeypatch, capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["job", "verdict"]
    assert [line.split()[:2] for line in lines[1:6]] == [[s.name, "ok"] for s in SPECS]
    assert lines[-1] == "overall: ok"


def test_failing_and_late_jobs_exit_1_with_their_verdicts(tmp_path, monkeypatch, capsys):
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
    code, out, _ = _health(tmp_path / "home", monkeypatch, capsys, "--json")
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


def test_a_missing_or_corrupt_instance_exits_2_with_a_clear_message(tmp_path, monkeypatch, capsys):
    code, _, err = _health(tmp_path / "nowhere", monkeypatch, capsys)
    assert code == 2
    assert "does not exist" in err and "DAGSTER_HOME" in err

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "dagster.yaml").write_text("run_storage: [unclosed\n")
    code, _, err = _health(broken, monkeypatch, capsys)
    assert code == 2
    assert f"cannot read the Dagster instance in {broken}" in err

    with history_instance(tmp_path / "garbled"):
        pass
    for database in (tmp_path / "garbled").rglob("*.db"):
        database.write_bytes(b"not a database" * 100)
    code, _, err = _health(tmp_path / "garbled", monkeypatch, capsys)
    assert code == 2
    assert "cannot read the Dagster instance" in err


def test_the_command_answers_the_same_with_the_pushgateway_down(tmp_path):
    """The real command, as a probe runs it: the gateway's address plays no part."""
    with history_instance(tmp_path / "home") as instance:
        add_history(instance, _fresh_history(time.time()))
    command = [str(Path(sys.executable).parent / "nova-assets"), "health", "--json"]
    answers = []
    for gateway in ("http://127.0.0.1:9091", "http://127.0.0.1:1"):
        env = os.environ | {"DAGSTER_HOME": str(tmp_path / "home"), "PUSHGATEWAY_URL": gateway}
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        answers.append(json.loads(done.stdout))
    for answer in answers:
        for job in answer["jobs"]:
            job.pop("last_success_age_sec")
    assert answers[0] == answers[1]
    assert answers[0]["overall"] == "ok"
