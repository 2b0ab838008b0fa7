"""The local stack starts real Redis, Kafka and Pushgateway processes that answer for real.

Proves that `up` brings all three up and is a no-op the second time, that `down` stops what `up`
started and nothing else, and that a failed start reports the service's own log; and that the
Redis Cluster forms once (three primaries holding every slot, three replicas), takes back a node
killed with SIGKILL, and stops whole. Every test runs on free ports in a temporary state folder,
so the project's default stack is never touched; the Kafka jars are shared with the project's
cache so Maven downloads them once. The Kafka cluster has its own module, test_kafka_cluster.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from confluent_kafka.admin import AdminClient

from nova_assets.local.stack import (
    CLUSTERS,
    OPTIONAL_SERVICES,
    REDIS_CLUSTER_BUS_OFFSET,
    REDIS_CLUSTER_NODES,
    SERVICES,
    StackConfig,
    StackError,
    down,
    free_port_range,
    node_pids,
    nodes,
    start_node,
    started_pid,
    status,
    up,
)
from nova_assets_tests.conftest import JARS_DIR, free_ports


@pytest.fixture
def config(tmp_path: Path, service_binaries: None) -> Iterator[StackConfig]:
    redis_port, kafka_port, controller_port, pushgateway_port = free_ports(4)
    config = StackConfig(
        state_dir=tmp_path / ".nova",
        redis_port=redis_port,
        kafka_port=kafka_port,
        kafka_controller_port=controller_port,
        pushgateway_port=pushgateway_port,
        jars_dir=JARS_DIR,
    )
    yield config
    down(config)


def _redis_pings(port: int) -> bool:
    client = redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def test_up_starts_answering_services_and_down_stops_them(config: StackConfig) -> None:
    messages: list[str] = []
    up(config, log=messages.append)

    assert _redis_pings(config.redis_port)
    ready = f"http://127.0.0.1:{config.pushgateway_port}/-/ready"
    with urllib.request.urlopen(ready, timeout=5) as response:
        assert response.status == 200
    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{config.kafka_port}"})
    assert config.dlq_topic in admin.list_topics(timeout=10).topics
    pids = {name: started_pid(config, name) for name in SERVICES}
    assert all(pids.values()), pids
    assert all(s.answering for s in status(config) if s.name in SERVICES)

    messages.clear()
    up(config, log=messages.append)
    assert {name: started_pid(config, name) for name in SERVICES} == pids
    assert not [message for message in messages if message.startswith("started")], messages
    assert sum(message.startswith("reusing") for message in messages) == len(SERVICES)

    down(config)
    rows = status(config)
    assert [(s.name, s.answering, s.pid) for s in rows if s.service not in CLUSTERS] == [
        (name, False, None) for name in SERVICES + OPTIONAL_SERVICES if name not in CLUSTERS
    ]
    assert not any(s.pid for s in rows)
    assert not list((config.state_dir / "run").glob("*.pid"))


def test_down_leaves_alone_a_redis_it_did_not_start(config: StackConfig, tmp_path: Path) -> None:
    port = config.redis_port
    by_hand = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not _redis_pings(port):
            assert time.monotonic() < deadline, "the hand-started redis-server never answered"
            time.sleep(0.1)
        messages: list[str] = []

        up(config, services=("redis",), log=messages.append)
        assert messages == [f"reusing redis already answering on 127.0.0.1:{port}"]
        assert started_pid(config, "redis") is None

        down(config, services=("redis",))
        assert _redis_pings(port)
        assert by_hand.poll() is None
    finally:
        by_hand.terminate()
        by_hand.wait(timeout=10)


def test_failed_start_reports_the_service_log(config: StackConfig) -> None:
    # A listener that accepts connections but never speaks Redis: not reusable, and in the way.
    with socket.create_server(("127.0.0.1", config.redis_port)):
        with pytest.raises(StackError) as failure:
            up(config, services=("redis",))
    message = str(failure.value)
    assert "redis" in message
    assert "Address already in use" in message  # written by redis-server into its log
    assert str(config.state_dir / "logs" / "redis.log") in message
    assert started_pid(config, "redis") is None


def test_prometheus_runs_on_request_with_the_project_alert_rules(config):
    rules = Path(__file__).parents[1] / "ops" / "prometheus" / "alerts.yml"
    [port] = free_ports(1)
    watched = replace(config, prometheus_port=port, prometheus_rules=rules)
    up(watched, ("pushgateway", "prometheus"))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5) as reply:
            groups = json.load(reply)["data"]["groups"]
        assert [r["name"] for g in groups for r in g["rules"]] == [
            "NovaJobUnhealthy",
            "NovaJobStale",
            "NovaDLQGrowing",
            "NovaDLQPending",
        ]
        assert any(s.name == "prometheus" and s.pid for s in status(watched))
    finally:
        down(watched, ("prometheus", "pushgateway"))
    assert not any(s.answering for s in status(watched) if s.name == "prometheus")


def test_services_follow_a_unix_socket_redis_url(tmp_path: Path, service_binaries: None) -> None:
    """`REDIS_URL=unix://…`: the command starts, reports and stops Redis on that socket."""
    sock = tmp_path / "run" / "redis.sock"
    env = {
        "PATH": os.environ["PATH"],
        "NOVA_HOME": str(tmp_path / ".nova"),
        "REDIS_URL": f"unix://{sock}",
    }
    command = [str(Path(sys.executable).parent / "nova-assets"), "services"]

    def services(action: str) -> str:
        # Kafka and the Pushgateway are the suite's own, reused; only Redis is started here.
        done = subprocess.run(
            [*command, action], env=env, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    try:
        assert f"redis answering on unix:{sock}" in services("up")
        client = redis.Redis(unix_socket_path=str(sock), socket_timeout=2)
        assert client.ping()
        client.close()
        [line] = [line for line in services("status").splitlines() if line.startswith("redis ")]
        assert f"unix:{sock}" in line and " answering (started by nova-assets" in line
    finally:
        services("down")
    assert not sock.exists()


@pytest.fixture
def cluster_config(tmp_path: Path, service_binaries: None) -> Iterator[StackConfig]:
    """Six ports of the test's own (and their cluster bus ports) for a Redis Cluster."""
    first = free_port_range(REDIS_CLUSTER_NODES, bus_offset=REDIS_CLUSTER_BUS_OFFSET)
    config = StackConfig(state_dir=tmp_path / ".nova", redis_cluster_port=first)
    yield config
    down(config, ("redis-cluster",))


def _cluster_state(port: int) -> tuple[dict, dict]:
    """CLUSTER INFO and CLUSTER NODES as the node on `port` sees them."""
    client = redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2)
    try:
        return client.cluster("INFO"), client.cluster("NODES")
    finally:
        client.close()


def _roles(port: int) -> tuple[dict[str, list], dict[str, str]]:
    """Primaries (address: slot ranges) and replicas (address: its primary's address)."""
    _, view = _cluster_state(port)
    by_id = {node["node_id"]: address for address, node in view.items()}
    primaries = {a: n["slots"] for a, n in view.items() if "master" in n["flags"]}
    replicas = {a: by_id[n["master_id"]] for a, n in view.items() if "slave" in n["flags"]}
    return primaries, replicas


def test_a_redis_cluster_forms_once_takes_back_a_killed_node_and_stops(
    cluster_config: StackConfig, tmp_path: Path
) -> None:
    config = cluster_config
    messages: list[str] = []
    up(config, ("redis-cluster",), log=messages.append)

    ports = [node.port for node in nodes(config, "redis-cluster")]
    assert ports == list(range(config.redis_cluster_port, config.redis_cluster_port + 6))
    assert sum(m.startswith("created the Redis Cluster") for m in messages) == 1
    for port in ports:
        info, _ = _cluster_state(port)
        assert info["cluster_state"] == "ok", (port, info)
        assert (info["cluster_known_nodes"], info["cluster_slots_ok"]) == ("6", "16384")
    primaries, replicas = _roles(ports[0])
    assert len(primaries) == 3 and len(replicas) == 3
    assert all(primaries.values())
    served = sorted(
        slot for ranges in primaries.values() for lo, hi in ranges for slot in (int(lo), int(hi))
    )
    # Three contiguous ranges that cover 0-16383 exactly, one per primary.
    assert served[0] == 0 and served[-1] == 16383
    assert sum(int(hi) - int(lo) + 1 for r in primaries.values() for lo, hi in r) == 16384
    assert set(replicas.values()) == set(primaries)
    pids = node_pids(config, "redis-cluster")
    assert all(pids.values()), pids
    rows = [s for s in status(config) if s.service == "redis-cluster"]
    assert [(s.name, s.answering, s.pid) for s in rows] == [
        (name, True, pid) for name, pid in pids.items()
    ]

    # A replica killed with SIGKILL comes back as the replica it was.
    victim = next(f"redis-cluster-{address.rsplit(':', 1)[1]}" for address in replicas)
    os.kill(pids[victim], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while node_pids(config, "redis-cluster")[victim] is not None:
        assert time.monotonic() < deadline, "the killed node is still running"
        time.sleep(0.05)
    restarted = start_node(config, victim)
    assert restarted not in (None, pids[victim])
    messages.clear()
    up(config, ("redis-cluster",), log=messages.append)
    assert not [m for m in messages if m.startswith(("started", "created"))], messages
    assert _roles(ports[0])[1] == replicas

    # Another stack on the same ports reuses the cluster, and its `down` leaves it alone.
    bystander = replace(config, state_dir=tmp_path / "other")
    messages.clear()
    up(bystander, ("redis-cluster",), log=messages.append)
    assert sum(m.startswith("reusing redis-cluster-") for m in messages) == 6, messages
    down(bystander, ("redis-cluster",))
    assert all(_redis_pings(port) for port in ports)

    down(config, ("redis-cluster",))
    assert not any(s.answering for s in status(config) if s.service == "redis-cluster")
    assert not any(node_pids(config, "redis-cluster").values())
    assert not list((config.state_dir / "run").glob("*.pid"))
