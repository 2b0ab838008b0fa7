"""The code location loads with every resource bound, and its instance config is the design's."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
import redis
import yaml

from nova_assets import definitions
from nova_assets.core.jobs import JOB_TAG
from nova_assets.core.resources import CLICKHOUSE_POOL, ClickHouseResource
from nova_assets.local.instance import initialize_pools, write_instance
from nova_assets_tests import factories
from nova_assets_tests.conftest import free_ports

ROOT = Path(__file__).parents[1]


def _fresh_python(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`python *args` in a fresh process, from the checkout, with only PATH and `env` set."""
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **env},
    )


def test_definitions_load_with_every_resource_bound():
    defs = definitions.defs
    repository = defs.get_repository_def()
    repository.load_all_definitions()
    assert set(defs.resources) >= {"clickhouse", "redis_cache", "kafka_dlq", "job_metrics"}
    for job in repository.get_all_jobs():
        # Every resource key a job needs is provided (Dagster raises otherwise when resolving).
        assert job.resource_defs


def test_the_code_location_loads_in_a_fresh_process():
    completed = _fresh_python(
        "-c",
        "import nova_assets.definitions as d; d.defs.get_repository_def()",
        TRENDING_INTERVAL_SEC="60",
    )
    assert completed.returncode == 0, completed.stderr


def test_a_bad_setting_fails_the_load_naming_the_variable():
    completed = _fresh_python("-c", "import nova_assets.definitions", TRENDING_INTERVAL_SEC="90")
    assert completed.returncode != 0
    assert "TRENDING_INTERVAL_SEC='90' is invalid" in completed.stderr


def test_every_step_touching_clickhouse_declares_the_pool_and_every_job_its_tag():
    repository = definitions.defs.get_repository_def()
    for assets_def in repository.asset_graph.assets_defs:
        for op in assets_def.node_def.iterate_op_defs():
            if "clickhouse" in op.required_resource_keys:
                assert op.pool == CLICKHOUSE_POOL, (assets_def.key, op.name)
    for job in repository.get_all_jobs():
        if not job.name.startswith("__"):
            assert job.tags[JOB_TAG] == job.name


def test_the_production_instance_takes_its_run_limit_from_the_environment(tmp_path, monkeypatch):
    config = yaml.safe_load((ROOT / "deploy" / "dagster.yaml").read_text())
    # Local storage in place of PostgreSQL, to load the rest of the file as it is.
    config["storage"] = {"sqlite": {"base_dir": str(tmp_path / "storage")}}
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("MAX_CONCURRENT_JOBS", "3")
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    try:
        queue = instance.get_concurrency_config().run_queue_config
        assert queue.max_concurrent_runs == 3
        assert queue.tag_concurrency_limits == [
            {"key": JOB_TAG, "value": {"applyLimitPerUniqueValue": True}, "limit": 1}
        ]
        assert instance.run_coordinator.dequeue_interval_seconds == 1
        assert instance.run_retries_enabled and instance.run_monitoring_enabled
    finally:
        instance.dispose()


def test_local_instance_limits_runs_and_the_clickhouse_pool(tmp_path):
    completed = subprocess.run(
        [str(Path(sys.executable).parent / "nova-assets"), "instance", "--home", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        # Any working directory: the template is found from the package.
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "MAX_CONCURRENT_JOBS": "3"},
    )
    assert completed.returncode == 0, completed.stderr
    config = yaml.safe_load((tmp_path / "dagster.yaml").read_text())
    runs = config["concurrency"]["runs"]
    assert runs["max_concurrent_runs"] == 3
    assert runs["tag_concurrency_limits"] == [
        {"key": JOB_TAG, "value": {"applyLimitPerUniqueValue": True}, "limit": 1}
    ]
    assert config["concurrency"]["pools"] == {
        "default_limit": 1,
        "granularity": "op",
        "op_granularity_run_buffer": 3,
    }
    assert config["telemetry"]["enabled"] is False
    assert config["run_monitoring"]["enabled"] is True
    assert config["freshness"]["enabled"] is True
    # The UI's first-visit dialog would cover the buttons an operator reaches for.
    assert config["nux"]["enabled"] is False

    instance = dg.DagsterInstance.from_config(str(tmp_path))
    try:
        queue = instance.get_concurrency_config().run_queue_config
        assert queue.max_concurrent_runs == 3
        assert len(queue.tag_concurrency_limits) == 1
        # Runs whose steps all wait for a slot still start, and wait for it in line.
        assert queue.op_concurrency_slot_buffer == 3
        # A tick's run leaves the queue within a second; one minute's runs launch side by side.
        coordinator = instance.run_coordinator
        assert coordinator.dequeue_interval_seconds == 1 and coordinator.dequeue_use_threads
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
    finally:
        instance.dispose()


def _run_two_at_once(dagster_home: Path, env: dict[str, str]) -> list[tuple[bool, dict]]:
    """Two `dagster job execute` processes at once; their runs as the instance recorded them."""
    command = [
        str(Path(sys.executable).parent / "dagster"),
        *("job", "execute", "-m", "nova_assets_tests.pool_jobs", "-j", "engine_job"),
    ]
    # Create the instance's storage first: two processes racing to create it would collide.
    dg.DagsterInstance.from_config(str(dagster_home)).dispose()
    workers = [
        subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for _ in range(2)
    ]
    outputs = [worker.communicate(timeout=120)[0].decode()[-3000:] for worker in workers]
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        runs = instance.get_runs()
        records = instance.fetch_materializations(dg.AssetKey("holds_the_engine"), limit=10)
    assert len(runs) == 2, outputs
    metadata = {r.run_id: r.asset_materialization.metadata for r in records.records}
    return [(r.status == dg.DagsterRunStatus.SUCCESS, metadata.get(r.run_id, {})) for r in runs]


def test_two_runs_on_the_embedded_engine_are_serialised_by_the_pool(clickhouse, tmp_path):
    clickhouse.close()  # this process must not hold the engine while the runs use it
    subprocess.run(
        [str(Path(sys.executable).parent / "nova-assets"), "instance", "--home", str(tmp_path)],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    env = os.environ | {"DAGSTER_HOME": str(tmp_path), "NOVA_TEST_CLICKHOUSE_URL": clickhouse.url}
    outcomes = _run_two_at_once(tmp_path, env)
    assert [success for success, _ in outcomes] == [True, True]
    spans = sorted((m["started"].value, m["ended"].value) for _, m in outcomes)
    assert spans[0][1] <= spans[1][0], f"the two steps overlapped: {spans}"


def _run_events(home: Path, job: str) -> tuple[str, list[dg.EventLogEntry]] | None:
    """The run of `job` in the instance at `home`, with its events so far, once it exists."""
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs(dg.RunsFilter(job_name=job))
        return (runs[0].run_id, list(instance.all_logs(runs[0].run_id))) if runs else None


def _when(events: list[dg.EventLogEntry], kind: dg.DagsterEventType) -> float | None:
    return next((e.timestamp for e in events if e.dagster_event_type == kind), None)


def test_a_step_waiting_to_retry_leaves_the_engine_to_another_runs_step(
    clickhouse, tmp_path, redis_url
):
    """While trending_24h waits to retry (Redis refuses it), trending_1h's step uses the engine.

    Both are the project's jobs, launched from the CLI with the local instance. Every step runs
    in its run's own process, which lives on between attempts; the engine must be let go with
    the pool slot, or the other run's step, holding the slot, cannot open it until the failing
    run ends (its retries take a minute).
    """
    # chdb opens one data directory per process: the tests' shared engine is let go first.
    clickhouse.close()
    url = f"chdb://{tmp_path / 'clickhouse'}"
    engine = ClickHouseResource(url=url)
    factories.reset(engine)
    as_of = datetime.now(UTC)
    factories.insert_posts(engine, factories.post(1, 7, factories.ago(as_of, hours=2)))
    factories.insert_events(engine, [(factories.ago(as_of, minutes=5), 8, 1, "like")])
    engine.close()
    home = tmp_path / "dagster"
    write_instance(home, max_concurrent_jobs=5)
    initialize_pools(home, [CLICKHOUSE_POOL])
    dg.DagsterInstance.from_config(str(home)).dispose()
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    env = {
        "PATH": "/usr/bin:/bin",
        "DAGSTER_HOME": str(home),
        "CLICKHOUSE_URL": url,
        "REDIS_KEY_PREFIX": prefix,
    }
    dead_redis = f"redis://127.0.0.1:{free_ports(1)[0]}/0"
    execute = [str(Path(sys.executable).parent / "dagster"), "job", "execute", "-m"]
    failing = subprocess.Popen(
        [*execute, "nova_assets.definitions", "-j", "trending_24h"],
        cwd=ROOT,
        env=env | {"REDIS_URL": dead_redis},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            found = _run_events(home, "trending_24h")
            if found and _when(found[1], dg.DagsterEventType.STEP_UP_FOR_RETRY):
                break
            assert time.monotonic() < deadline, "trending_24h never asked for a retry"
            time.sleep(0.2)
        served = subprocess.run(
            [*execute, "nova_assets.definitions", "-j", "trending_1h"],
            cwd=ROOT,
            env=env | {"REDIS_URL": redis_url},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert served.returncode == 0, served.stdout[-3000:] + served.stderr[-3000:]
        _, served_events = _run_events(home, "trending_1h")
        _, failing_events = _run_events(home, "trending_24h")
        # The trending_1h run was done while trending_24h was still between its attempts.
        assert _when(failing_events, dg.DagsterEventType.RUN_FAILURE) is None
        assert _when(served_events, dg.DagsterEventType.RUN_SUCCESS) is not None
        value = redis.Redis.from_url(redis_url).get(f"{prefix}trending:1h")
        assert [item["post_id"] for item in json.loads(value)["items"]] == [1]
    finally:
        os.killpg(failing.pid, signal.SIGKILL)
        failing.wait(timeout=30)
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)
        client.close()


def _claim_slot(home: str, run: int, barrier, claimed) -> None:
    instance = dg.DagsterInstance.from_config(home)
    barrier.wait()
    status = instance.event_log_storage.claim_concurrency_slot(CLICKHOUSE_POOL, f"run{run}", "s")
    claimed.put(status.is_claimed)
    instance.dispose()


def test_processes_claiming_the_engine_slot_at_once_get_it_one_at_a_time(tmp_path):
    """Six processes claim the `clickhouse` slot at the same instant: exactly one gets it.

    On Dagster's plain SQLite storage the same trial hands the one slot to two or more processes
    in about half of the attempts (SQLite ignores `SELECT … FOR UPDATE`); the local instance's
    storage takes a file lock around every claim.
    """
    context = multiprocessing.get_context("fork")
    for trial in range(5):
        home = tmp_path / str(trial)
        write_instance(home, max_concurrent_jobs=5)  # as `nova-assets instance` does
        initialize_pools(home, [CLICKHOUSE_POOL])
        barrier, claimed = context.Barrier(6), context.Queue()
        workers = [
            context.Process(target=_claim_slot, args=(str(home), run, barrier, claimed))
            for run in range(6)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
        assert [worker.exitcode for worker in workers] == [0] * 6
        assert sorted(claimed.get(timeout=5) for _ in workers) == [False] * 5 + [True]


def test_every_asset_fails_freshness_after_three_missed_intervals():
    repository = definitions.defs.get_repository_def()
    cadence = {
        "trending_posts_1h": 60,
        "trending_posts_24h": 300,
        "trending_posts_7d": 3600,
        "suggested_users": 600,
        "warmed_feeds": 60,
    }
    specs = {
        spec.key.to_user_string(): spec
        for assets_def in repository.asset_graph.assets_defs
        for spec in assets_def.specs
    }
    assert set(specs) == set(cadence)
    for name, seconds in cadence.items():
        policy = specs[name].freshness_policy
        assert policy.fail_window.to_timedelta().total_seconds() == 3 * seconds, name
        assert policy.warn_window.to_timedelta().total_seconds() == 2 * seconds, name


def test_the_code_location_matches_its_snapshot():
    """Asset keys, checks, op names, jobs, crons and sensors change only on purpose."""
    completed = _fresh_python("-m", "nova_assets_tests.snapshot")
    assert completed.returncode == 0, completed.stderr
    stored = json.loads((ROOT / "nova_assets_tests" / "code_location.json").read_text())
    assert json.loads(completed.stdout) == stored, (
        "the code location changed; if on purpose, regenerate the snapshot with "
        "`python -m nova_assets_tests.snapshot > nova_assets_tests/code_location.json`"
    )


def _dg(*args: str) -> subprocess.CompletedProcess:
    venv = Path(sys.executable).parents[1]
    return subprocess.run(
        [str(venv / "bin" / "dg"), *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "VIRTUAL_ENV": str(venv)},
    )


def test_dg_checks_and_lists_the_definitions():
    checked = _dg("check", "defs")
    assert checked.returncode == 0, checked.stderr
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr

    listed = _dg("list", "defs", "--json")
    assert listed.returncode == 0, listed.stderr
    found = json.loads(listed.stdout)
    stored = json.loads((ROOT / "nova_assets_tests" / "code_location.json").read_text())
    assert {a["asset_key"] for a in found["assets"]} == set(stored["assets"])
    assert {j["name"] for j in found["jobs"]} >= set(stored["jobs"])
    assert {s["name"]: s["cron_schedule"] for s in found["schedules"]} == {
        name: s["cron"] for name, s in stored["schedules"].items()
    }
    assert {s["name"] for s in found["sensors"]} == set(stored["sensors"])


def test_the_layers_lint_rule_stops_core_and_defs_importing_local_tooling():
    """Ruff's banned-import rule (TID251) is what keeps the dev tooling out of the code location."""
    ruff = Path(sys.executable).parent / "ruff"
    for path, banned in [
        ("nova_assets/defs/probe.py", True),
        ("nova_assets/core/probe.py", True),
        ("nova_assets/definitions.py", False),
    ]:
        completed = subprocess.run(
            [str(ruff), "check", "--select", "TID251", "--stdin-filename", path, "-"],
            input="from nova_assets.local import seed\n",
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
        )
        assert ("TID251" in completed.stdout) is banned, (path, completed.stdout)


def test_with_a_clickhouse_server_each_asset_has_a_one_slot_pool_of_its_own(tmp_path, monkeypatch):
    """However a run was launched, two never materialize one asset at once (docs/design.md §5)."""
    probe = (
        "import json, nova_assets.definitions as d;"
        "r = d.defs.get_repository_def();"
        "print(json.dumps({"
        "'pools': {s.key.to_user_string(): {o.name: o.pool for o in a.node_def.iterate_op_defs()}"
        " for a in r.asset_graph.assets_defs for s in a.specs},"
        "'executors': {j.name: j.executor_def.name for j in r.get_all_jobs()}}))"
    )
    completed = _fresh_python(
        "-c", probe, CLICKHOUSE_URL="https://user:pw@clickhouse.example:8443/"
    )
    assert completed.returncode == 0, completed.stderr
    probed = json.loads(completed.stdout.strip().splitlines()[-1])
    pools = probed["pools"]
    assert len(pools) == 5
    for asset in set(pools) - {"suggested_users"}:
        assert pools[asset] == {asset: f"clickhouse/{asset}"}
    # Suggestions: the plan and the finish hold the asset's pool; the shards run side by side,
    # as many as the job's multiprocess executor allows.
    assert pools["suggested_users"] == {
        "plan_suggestions": "clickhouse/suggested_users",
        "rank_suggestions": None,
        "finish_suggestions": "clickhouse/suggested_users",
    }
    executors = probed["executors"]
    assert executors.pop("suggested_users") == "multiprocess"
    assert set(executors.values()) == {"in_process"}

    config = yaml.safe_load((ROOT / "deploy" / "dagster.yaml").read_text())
    config["storage"] = {"sqlite": {"base_dir": str(tmp_path / "storage")}}
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("MAX_CONCURRENT_JOBS", "5")
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    try:
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        assert instance.run_monitoring_max_runtime_seconds == 3600
    finally:
        instance.dispose()


@pytest.mark.parametrize(("value", "status"), [("on", "RUNNING"), ("OFF", "STOPPED")])
def test_cache_healing_sets_the_healers_default_status(value, status):
    probe = _fresh_python(
        "-c",
        "import nova_assets.definitions as d; "
        "print(d.defs.resolve_sensor_def('cache_healer').default_status.value)",
        CACHE_HEALING=value,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split()[-1] == status


def test_cache_healing_takes_on_or_off_only():
    from nova_assets.core.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match="CACHE_HEALING='maybe' is invalid: expected on or off"):
        Settings.from_env({"CACHE_HEALING": "maybe"})
