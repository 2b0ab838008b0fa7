"""The operator's path: `dagster dev` with its daemon keeps the caches fresh without a click.

Starts the real webserver and daemon on a free port, against the real local services and a
freshly seeded embedded ClickHouse, and waits (bounded) for the schedules' ticks to materialize
`trending_posts_1h` and `warmed_feeds`: their Redis keys appear with a fresh `generated_at`.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from nova_assets_tests.conftest import REDIS_URL, free_ports

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def _graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["data"]


@pytest.fixture
def dagster_dev(tmp_path):
    """`dagster dev` as `make dev` runs it, on a private NOVA_HOME, DAGSTER_HOME and key prefix."""
    [port] = free_ports(1)
    prefix = f"e2e:{uuid.uuid4().hex[:8]}:"
    nova_home = tmp_path / ".nova"
    dagster_home = nova_home / "dagster"
    env = os.environ | {
        "NOVA_HOME": str(nova_home),
        "DAGSTER_HOME": str(dagster_home),
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": prefix,
    }
    env.pop("CLICKHOUSE_URL", None)
    for command in (["seed", "--if-empty"], ["instance", "--home", str(dagster_home)]):
        subprocess.run([str(BIN / "nova-assets"), *command], env=env, cwd=ROOT, check=True)
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
        yield port, prefix, tmp_path / "dagster-dev.log"
    finally:
        # The whole group: webserver, daemon, code servers and any run still in flight.
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])


def test_the_daemon_keeps_trending_and_feeds_fresh_without_a_click(dagster_dev):
    port, prefix, log = dagster_dev
    started = datetime.now(UTC)
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

    data = _graphql(
        port,
        "{ runsOrError { ... on Runs { results { jobName status tags { key value } } } } }",
    )
    runs = data["runsOrError"]["results"]
    by_schedule = {
        (r["jobName"], r["status"])
        for r in runs
        if any(t["key"] == "dagster/schedule_name" for t in r["tags"])
    }
    assert ("trending_1h", "SUCCESS") in by_schedule
    assert ("cache_warmer", "SUCCESS") in by_schedule
