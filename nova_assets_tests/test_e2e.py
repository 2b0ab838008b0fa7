"""The operator's path: `dagster dev` with its daemon keeps the caches fresh without a click.

Starts the real webserver and daemon on a free port, against the real local services and a
freshly seeded embedded ClickHouse, and waits (bounded) for the schedules' ticks to materialize
`trending_posts_1h` and `warmed_feeds`: their Redis keys appear with a fresh `generated_at`.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path

import pytest
import redis
import yaml
from playwright.sync_api import Browser, expect, sync_playwright

from nova_assets.local.stack import StackConfig, down, up
from nova_assets_tests.conftest import PUSHGATEWAY_URL, REDIS_URL, free_ports

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def _graphql(port: int, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["data"]


_LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
  }
}"""


def _launch_like_the_ui(port: int, *assets: str) -> str:
    """Launch a run as the Materialize button does: Dagster's implicit `__ASSET_JOB`."""
    params = {
        "selector": {
            "repositoryLocationName": "nova_assets",
            "repositoryName": "__repository__",
            "jobName": "__ASSET_JOB",
            "assetSelection": [{"path": [asset]} for asset in assets],
        },
        "mode": "default",
        "executionMetadata": {"tags": []},
    }
    launched = _graphql(port, _LAUNCH, {"params": params})["launchPipelineExecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]


_RUNS = """{ runsOrError { ... on Runs { results {
    runId jobName status tags { key value }
    stepStats { stepKey startTime endTime }
} } } }"""


def _runs(port: int) -> list[dict]:
    return _graphql(port, _RUNS)["runsOrError"]["results"]


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["tags"]}


def _poll(what: str, probe, log: Path, timeout_s: float = 240, every_s: float = 2):
    """Call `probe` until it returns something truthy (bounded); fail with the log otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(every_s)
    raise AssertionError(f"{what}: not within {timeout_s} s\n{log.read_text()[-4000:]}")


def _gateway_sample(name: str, **labels: str) -> float | None:
    """A sample the code location pushed to the local Pushgateway (grouping job=nova_assets)."""
    with urllib.request.urlopen(f"{PUSHGATEWAY_URL}/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = {"job": "nova_assets", **labels}
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)\{(.*)\} (\S+)", line)
        if match and match.group(1) == name:
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            if all(found.get(k) == v for k, v in wanted.items()):
                return float(match.group(3))
    return None


def _start_postgres(tmp_path: Path) -> StackConfig:
    """A PostgreSQL of the test's own; its data lives outside the root-only pytest folder."""
    [port] = free_ports(1)
    data = Path(tempfile.mkdtemp(prefix="nova-e2e-pg-"))
    data.rmdir()  # the stack creates it for the `postgres` user
    config = StackConfig(state_dir=tmp_path / "pg-stack", postgres_port=port, postgres_dir=data)
    up(config, services=("postgres",))
    return config


CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextmanager
def _browser() -> Iterator[Browser]:
    """Debian's Chromium, headless, driven by Playwright (no browser is downloaded)."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


def _wait_for_webserver(port: int, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text()[-4000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"dagster dev did not answer on {port}: {log.read_text()[-4000:]}")


@pytest.fixture
def dagster_dev(tmp_path, request):
    """`dagster dev` as `make dev` runs it, on a private NOVA_HOME, DAGSTER_HOME and key prefix.

    Parametrize indirectly with extra environment variables (another Redis, another topic), and
    `"instance": "postgres"` to run on the production instance config (deploy/dagster.yaml) with
    a PostgreSQL of the test's own.
    """
    param = dict(getattr(request, "param", {}))
    on_postgres = param.pop("instance", "local") == "postgres"
    [port] = free_ports(1)
    prefix = f"e2e:{uuid.uuid4().hex[:8]}:"
    nova_home = tmp_path / ".nova"
    dagster_home = nova_home / "dagster"
    env = os.environ | {
        "NOVA_HOME": str(nova_home),
        "DAGSTER_HOME": str(dagster_home),
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": prefix,
        **param,
    }
    env.pop("CLICKHOUSE_URL", None)
    subprocess.run([str(BIN / "nova-assets"), "seed", "--if-empty"], env=env, cwd=ROOT, check=True)
    postgres = None
    if on_postgres:
        postgres = _start_postgres(tmp_path)
        env["DAGSTER_POSTGRES_URL"] = postgres.postgres_url
        config = yaml.safe_load((ROOT / "deploy" / "dagster.yaml").read_text())
        # This test still runs the embedded engine, which admits one process at a time.
        # (`concurrency: pools` would clash with the coordinator's limits; this key does not.)
        config["concurrency"] = {"default_op_concurrency_limit": 1}
        env.setdefault("MAX_CONCURRENT_JOBS", "5")
        dagster_home.mkdir(parents=True)
        (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(config))
    else:
        subprocess.run(
            [str(BIN / "nova-assets"), "instance", "--home", str(dagster_home)],
            env=env,
            cwd=ROOT,
            check=True,
        )
    log = (tmp_path / "dagster-dev.log").open("wb")
    server = subprocess.Popen(
        [
            str(BIN / "dagster"),
            *("dev", "-w", str(ROOT / "workspace.yaml"), "--host", "127.0.0.1"),
            *("--port", str(port)),
        ],
        cwd=dagster_home,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_for_webserver(port, server, tmp_path / "dagster-dev.log")
        yield port, prefix, tmp_path / "dagster-dev.log", env.get("DLQ_TOPIC", "jobs-dlq")
    finally:
        # The whole group: webserver, daemon, code servers and any run still in flight.
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        client = redis.Redis.from_url(env["REDIS_URL"])
        try:
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])
        except redis.ConnectionError:
            pass  # a private Redis the test already stopped
        if postgres is not None:
            down(postgres, services=("postgres",))
            shutil.rmtree(postgres.postgres_data, ignore_errors=True)


@pytest.mark.parametrize("dagster_dev", [{}, {"instance": "postgres"}], indirect=True)
def test_the_daemon_keeps_caches_fresh_and_ui_runs_take_their_turn(dagster_dev):
    port, prefix, log, _ = dagster_dev
    started = datetime.now(UTC)
    # Two Materialize clicks on trending_posts_1h while its schedule ticks every minute.
    ui_runs = [_launch_like_the_ui(port, "trending_posts_1h") for _ in range(2)]
    client = redis.Redis.from_url(REDIS_URL)
    wanted = {f"{prefix}trending:1h": None, "feed": None}

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and None in wanted.values():
        raw = client.get(f"{prefix}trending:1h")
        if raw is not None:
            wanted[f"{prefix}trending:1h"] = json.loads(raw)
        feed_keys = list(client.scan_iter(match=f"{prefix}feed:*", count=1000))
        if len(feed_keys) >= 1000:
            wanted["feed"] = json.loads(client.get(feed_keys[0]))
        time.sleep(2)
    assert None not in wanted.values(), log.read_text()[-4000:]

    for value in wanted.values():
        generated = datetime.fromisoformat(value["generated_at"].replace("Z", "+00:00"))
        assert generated >= started
    assert len(wanted[f"{prefix}trending:1h"]["items"]) == 50

    def scheduled_successes() -> bool:
        by_schedule = {
            (r["jobName"], r["status"]) for r in _runs(port) if "dagster/schedule_name" in _tags(r)
        }
        return {("trending_1h", "SUCCESS"), ("cache_warmer", "SUCCESS")} <= by_schedule

    assert _poll("scheduled trending_1h and cache_warmer runs succeeding", scheduled_successes, log)

    def trending_runs_done() -> list[dict] | None:
        runs = [r for r in _runs(port) if r["runId"] in ui_runs or r["jobName"] == "trending_1h"]
        ui_done = (
            all(r["status"] == "SUCCESS" for r in runs if r["runId"] in ui_runs)
            and len([r for r in runs if r["runId"] in ui_runs]) == 2
        )
        scheduled = [r for r in runs if r["jobName"] == "trending_1h" and r["status"] == "SUCCESS"]
        return runs if ui_done and scheduled else None

    runs = _poll("both UI runs and a scheduled trending_1h run", trending_runs_done, log)
    spans = sorted(
        (step["startTime"], step["endTime"], run["runId"])
        for run in runs
        if run["status"] == "SUCCESS"
        for step in run["stepStats"]
        if step["stepKey"] == "trending_posts_1h"
    )
    assert len(spans) >= 3
    for (_, end, first), (start, _, second) in pairwise(spans):
        assert end <= start, f"runs {first} and {second} materialized trending_posts_1h at once"
    # The UI runs count as runs of trending_1h, the job that owns the asset.
    attributed = _poll(
        "the UI runs attributed to trending_1h",
        lambda: all(
            _tags(r).get("nova/counts_for.trending_1h") == "true"
            for r in _runs(port)
            if r["runId"] in ui_runs
        ),
        log,
        timeout_s=90,
    )
    assert attributed


(PRIVATE_REDIS_PORT,) = free_ports(1)
FAILURE_TOPIC = f"e2e-dlq-{uuid.uuid4().hex[:8]}"


FAILING_REDIS = {
    "REDIS_URL": f"redis://127.0.0.1:{PRIVATE_REDIS_PORT}/0",
    "SUGGESTION_INTERVAL_SEC": "3600",
}


@pytest.mark.parametrize(
    "dagster_dev",
    [
        FAILING_REDIS | {"DLQ_TOPIC": f"{FAILURE_TOPIC}-local"},
        FAILING_REDIS | {"DLQ_TOPIC": f"{FAILURE_TOPIC}-pg", "instance": "postgres"},
    ],
    indirect=True,
)
def test_a_failure_reaches_the_operator_and_its_replay_succeeds(dagster_dev, tmp_path):
    from nova_assets_tests.conftest import create_topic

    port, prefix, log, topic = dagster_dev
    create_topic(topic)
    private = StackConfig(state_dir=tmp_path / "redis-stack", redis_port=PRIVATE_REDIS_PORT)
    # Redis is down from the start: the first trending_1h run fails after its five retries.
    query = (
        "{ runsOrError { ... on Runs { results { runId jobName status tags { key value } } } } }"
    )

    def runs() -> list[dict]:
        return _graphql(port, query)["runsOrError"]["results"]

    def tags(run: dict) -> dict:
        return {t["key"]: t["value"] for t in run["tags"]}

    deadline = time.monotonic() + 240
    failed = None
    while failed is None and time.monotonic() < deadline:
        failed = next(
            (
                r
                for r in runs()
                if r["jobName"] == "trending_1h"
                and r["status"] == "FAILURE"
                and "nova/dlq_delivered" in tags(r)
            ),
            None,
        )
        time.sleep(3)
    assert failed is not None, log.read_text()[-4000:]

    env = os.environ | {"DLQ_TOPIC": topic}
    listed = subprocess.run(
        [str(BIN / "nova-assets"), "dlq", "list", "--job", "trending_1h"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert failed["runId"] in listed and "5/5" in listed
    # What the operator sees in the UI: the run marked failed, with the root error.
    with _browser() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"http://127.0.0.1:{port}/runs/{failed['runId']}")
        expect(page.get_by_text("Failure", exact=True).first).to_be_visible(timeout=60_000)
        expect(page.get_by_text("ConnectionError").first).to_be_visible(timeout=60_000)

    up(private, services=("redis",))
    try:
        started = _graphql(
            port,
            'mutation { startSensor(sensorSelector: {repositoryLocationName: "nova_assets", '
            'repositoryName: "__repository__", sensorName: "dlq_replay"}) '
            "{ __typename } }",
        )
        assert started["startSensor"]["__typename"] == "Sensor"
        replay = None
        deadline = time.monotonic() + 180
        while replay is None and time.monotonic() < deadline:
            replay = next(
                (
                    r
                    for r in runs()
                    if tags(r).get("nova/replay_of") == failed["runId"] and r["status"] == "SUCCESS"
                ),
                None,
            )
            time.sleep(3)
        assert replay is not None, log.read_text()[-4000:]
        assert replay["jobName"] == "trending_1h"
        value = redis.Redis(port=PRIVATE_REDIS_PORT).get(f"{prefix}trending:1h")
        assert value is not None and len(json.loads(value)["items"]) == 50
    finally:
        down(private, services=("redis",))


ARTIFACTS = ROOT / "test-artifacts"
ASSETS = (
    "trending_posts_1h",
    "trending_posts_24h",
    "trending_posts_7d",
    "suggested_users",
    "warmed_feeds",
)


def test_an_operator_materializes_from_the_ui_in_a_real_browser(dagster_dev):
    port, prefix, _, _ = dagster_dev
    ui = f"http://127.0.0.1:{port}"
    ARTIFACTS.mkdir(exist_ok=True)
    clicked_at = datetime.now(UTC)
    with _browser() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        # Every wait is for a state the page must reach (auto-waiting locators), never for
        # the network to fall quiet or a guessed delay.
        page.goto(f"{ui}/assets")
        for asset in ASSETS:
            expect(page.locator("body")).to_contain_text(asset, timeout=60_000)
        page.goto(f"{ui}/asset-groups")
        # The lineage shows each group twice once drawn: in the side tree and as a graph tile.
        for group in ("trending", "suggestions", "feeds"):
            tile = page.get_by_text(group, exact=True).filter(visible=True).nth(1)
            expect(tile).to_be_visible(timeout=60_000)
        page.screenshot(path=ARTIFACTS / "asset-graph.png")

        page.goto(f"{ui}/assets/trending_posts_24h")
        materialize = page.locator("button", has_text="Materialize").first
        expect(materialize).to_be_enabled(timeout=60_000)
        clicked_at = datetime.now(UTC)
        materialize.click()
        toast = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
        expect(toast).to_be_visible(timeout=30_000)
        short_id = re.search(r"[0-9a-f]{8}", toast.inner_text()).group(0)
        recent = _graphql(port, "{ runsOrError(limit: 20) { ... on Runs { results { runId } } } }")
        run_id = next(
            r["runId"] for r in recent["runsOrError"]["results"] if r["runId"].startswith(short_id)
        )
        page.goto(f"{ui}/runs/{run_id}")
        expect(page.get_by_text("Success", exact=True).first).to_be_visible(timeout=180_000)
        # Long past the second after which the UI's first-visit dialog would open: the
        # instance turns it off, so nothing covers the run.
        expect(page.get_by_role("dialog")).to_have_count(0)
        page.screenshot(path=ARTIFACTS / "finished-run.png")

    value = json.loads(redis.Redis.from_url(REDIS_URL).get(f"{prefix}trending:24h"))
    generated = datetime.fromisoformat(value["generated_at"].replace("Z", "+00:00"))
    assert generated >= clicked_at
    assert value["window"] == "24h" and len(value["items"]) == 50
