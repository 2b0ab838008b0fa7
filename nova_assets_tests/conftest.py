"""Shared fixtures: the real local services, isolated per test by key prefix and topic name.

`make test` starts Redis, Kafka and the Pushgateway on their default local ports before pytest
runs; ClickHouse is the embedded chdb engine in a temporary directory. The embedded engine admits
one data directory per process, so every test shares the session's `clickhouse` resource.

Markers follow the fixtures: a test that takes a fixture of `SERVICE_FIXTURES` is marked
`services` (and `e2e` for `dagster_dev`), so `make test-fast` (`-m "not services"`) runs exactly
the tests that need no service and nobody has to remember a marker.
"""

import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import redis
import sqlalchemy
from confluent_kafka.admin import AdminClient, NewTopic
from redis.crc import key_slot

from nova_assets.core.resources import ClickHouseResource, KafkaDLQResource, RedisCacheResource
from nova_assets.local.stack import (
    REDIS_CLUSTER_BUS_OFFSET,
    REDIS_CLUSTER_NODES,
    StackConfig,
    down,
    free_port_range,
    node_pids,
    start_node,
    started_pid,
    up,
)

REDIS_URL = "redis://127.0.0.1:6379/15"
KAFKA_BROKERS = "127.0.0.1:9092"
PUSHGATEWAY_URL = "http://127.0.0.1:9091"
JARS_DIR = Path(__file__).parents[1] / ".nova" / "kafka-libs"
"""The project's Kafka jar cache, shared by private test stacks so Maven downloads once."""


SERVICE_FIXTURES = {
    "redis_cache",
    "raw_redis",
    "kafka_dlq",
    "private_kafka",
    "pushgateway",
    "redis_url",
    "service_binaries",
    "dagster_dev",
    "redis_cluster",
}
"""Fixtures that need a running service, or the binaries the stack installs (root, network)."""


E2E_START_ORDER = (
    "test_failures_reach_the_operator_however_launched_and_are_replayed_once[dagster_dev0]",
    "test_an_operator_materializes_from_the_ui_in_a_real_browser",
    "test_failures_reach_the_operator_however_launched_and_are_replayed_once[dagster_dev1]",
    "test_the_daemon_keeps_caches_fresh_ui_runs_take_their_turn_and_old_runs_go[dagster_dev0]",
    "test_caches_fill_at_start_and_heal_after_a_flush_and_an_outage",
    "test_after_a_hard_kill_the_orphaned_run_fails_frees_its_slot_and_reaches_the_dlq",
    "test_the_daemon_keeps_caches_fresh_ui_runs_take_their_turn_and_old_runs_go[dagster_dev1]",
)
"""The end-to-end tests run before the rest, in this order. pytest-xdist hands each worker two
tests to begin with, so each long test is paired with a short one: the workers finish at about
the same time instead of one working through two five-minute tests at the end."""


def _start_order(item: pytest.Item) -> int:
    return next(
        (i for i, name in enumerate(E2E_START_ORDER) if item.name.startswith(name)),
        len(E2E_START_ORDER),
    )


def pytest_configure(config: pytest.Config) -> None:
    """Interrupts work in the tests and the processes they start, however pytest was started.

    A shell starting pytest in the background leaves SIGINT ignored, and Dagster, run in process,
    then maps SIGTERM onto that: every process a test starts would inherit both ignored, and a
    `dagster dev` told to stop would run on until it is killed.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & SERVICE_FIXTURES:
            item.add_marker(pytest.mark.services)
        if "dagster_dev" in used:
            item.add_marker(pytest.mark.e2e)
    items.sort(key=_start_order)  # stable: everything else keeps its order


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The local Redis's URL (`make test` started it), database 15 for tests."""
    return REDIS_URL


@pytest.fixture(scope="session")
def pushgateway() -> str:
    """The local Pushgateway's URL (`make test` started it)."""
    return PUSHGATEWAY_URL


@pytest.fixture(scope="session")
def service_binaries() -> None:
    """For tests that start services of their own: the stack's binaries are installed.

    `make test` installs them (apt, Maven) before pytest runs; this fixture marks the tests that
    rely on that, so the fast lane leaves them out.
    """


def free_ports(count: int) -> list[int]:
    """Distinct free local ports (every socket is held open until all are bound)."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


class GateProxy:
    """A TCP proxy to a local server whose requests a test can hold back and let go.

    While held, nothing a client sends reaches the server: a run writing through it stands still
    at a known point, so a test can interrupt it there instead of racing it.
    """

    def __init__(self, upstream_port: int) -> None:
        self._upstream = upstream_port
        self._open = threading.Event()
        self._open.set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._open.set()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self._upstream))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, gated: bool) -> None:
        try:
            while data := source.recv(65536):
                if gated:
                    self._open.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                sock.close()


@pytest.fixture(scope="session")
def postgres_server(
    tmp_path_factory: pytest.TempPathFactory, service_binaries: None
) -> Iterator[str]:
    """A PostgreSQL of the tests' own; its URL.

    Its data lives outside the root-only pytest folder, for the `postgres` user.
    """
    [port] = free_ports(1)
    data = Path(tempfile.mkdtemp(prefix="nova-tests-pg-"))
    data.rmdir()  # the stack creates it for the `postgres` user
    config = StackConfig(
        state_dir=tmp_path_factory.mktemp("pg-stack"), postgres_port=port, postgres_dir=data
    )
    up(config, services=("postgres",))
    try:
        yield config.postgres_url
    finally:
        down(config, services=("postgres",))
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """The URL of a database of the test's own on the tests' PostgreSQL."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return f"{postgres_server.rsplit('/', 1)[0]}/{name}"


def postgres_home(path: Path, url: str) -> str:
    """A Dagster home at `path` storing everything in the PostgreSQL at `url`."""
    path.mkdir()
    (path / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\n"
        f"storage:\n  postgres:\n    postgres_url: {json.dumps(url)}\n"
    )
    return str(path)


@pytest.fixture(scope="session")
def clickhouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseResource]:
    resource = ClickHouseResource(url=f"chdb://{tmp_path_factory.mktemp('clickhouse')}")
    yield resource
    resource.close()


@pytest.fixture
def redis_cache() -> Iterator[RedisCacheResource]:
    """A cache resource on the local Redis whose keys live under a prefix unique to the test."""
    resource = RedisCacheResource(url=REDIS_URL, key_prefix=f"test:{uuid.uuid4().hex[:8]}:")
    yield resource
    client = resource.client()
    keys = list(client.scan_iter(match=resource.key_prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    resource.close()


@pytest.fixture
def raw_redis() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    yield client
    client.close()


def create_topic(name: str, partitions: int = 1, config: dict[str, str] | None = None) -> None:
    admin = AdminClient({"bootstrap.servers": KAFKA_BROKERS})
    topic = NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})
    futures = admin.create_topics([topic])
    futures[name].result(timeout=30)


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    """A Dagster instance of the test's own, in a temporary directory."""
    with dg.instance_for_test() as test_instance:
        yield test_instance


@pytest.fixture
def kafka_dlq() -> KafkaDLQResource:
    """A DLQ resource on the local broker with a fresh topic of its own."""
    topic = f"test-dlq-{uuid.uuid4().hex[:8]}"
    create_topic(topic)
    return KafkaDLQResource(brokers=KAFKA_BROKERS, topic=topic, delivery_timeout_s=5.0)


@pytest.fixture
def private_kafka(tmp_path: Path, service_binaries: None) -> Iterator[StackConfig]:
    """A broker of the test's own, which the test may stop, pause and restart."""
    _, port, controller, _ = free_ports(4)
    config = StackConfig(
        state_dir=tmp_path / ".nova",
        kafka_port=port,
        kafka_controller_port=controller,
        jars_dir=JARS_DIR,
        dlq_topic="jobs-dlq",
    )
    up(config, services=("kafka",))
    yield config
    pid = started_pid(config, "kafka")
    if pid:
        os.kill(pid, signal.SIGCONT)
    down(config, services=("kafka",))


@dataclass
class RedisCluster:
    """A local Redis Cluster of the tests' own: three primaries, three replicas."""

    config: StackConfig
    ports: list[int]

    @property
    def url(self) -> str:
        """REDIS_URL as an operator would give it: one node, any of them."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)

    def _view(self) -> redis.Redis:
        """A node that answers, to read the cluster's view from."""
        for port in self.ports:
            client = self.node(port)
            try:
                client.ping()
                return client
            except redis.ConnectionError:
                client.close()
        raise AssertionError("no node of the cluster answers")

    def primary_port_of(self, key: str) -> int:
        """The port of the primary that serves `key`'s slot now."""
        slot = key_slot(key.encode())
        for start, end, primary, *_ in self._view().cluster("SLOTS"):
            if start <= slot <= end:
                return int(primary[1])
        raise AssertionError(f"slot {slot} is served by no node")

    def primary_ids(self) -> list[str]:
        """Node ids of the primaries that hold slots."""
        nodes = self._view().cluster("NODES")
        return [
            info["node_id"]
            for info in nodes.values()
            if "master" in info["flags"] and info["slots"] and "fail" not in info["flags"]
        ]

    def pid_of(self, port: int) -> int:
        return int(self.node(port).info("server")["process_id"])

    def wait_ok(self, timeout_s: float = 60.0) -> None:
        """Until every node answers and reports cluster_state:ok with all slots served."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                infos = [self.node(port).cluster("INFO") for port in self.ports]
                if all(
                    info["cluster_state"] == "ok" and int(info["cluster_slots_ok"]) == 16384
                    for info in infos
                ):
                    return
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, "the cluster did not return to cluster_state:ok"
            time.sleep(0.2)

    def restore(self) -> None:
        """Restart any node that was killed (it rejoins as a replica), then wait until ok."""
        for name, pid in node_pids(self.config, "redis-cluster").items():
            if pid is None:
                start_node(self.config, name)
        self.wait_ok()


def kafka_for(config: StackConfig) -> KafkaDLQResource:
    """The DLQ resource on a private broker, with a short delivery timeout."""
    return KafkaDLQResource(
        brokers=f"127.0.0.1:{config.kafka_port}", topic=config.dlq_topic, delivery_timeout_s=3.0
    )


@pytest.fixture(scope="module")
def redis_cluster(
    tmp_path_factory: pytest.TempPathFactory, service_binaries: None
) -> Iterator[RedisCluster]:
    """A Redis Cluster of the module's own (three primaries, three replicas) on free ports."""
    first = free_port_range(REDIS_CLUSTER_NODES, bus_offset=REDIS_CLUSTER_BUS_OFFSET)
    config = StackConfig(
        state_dir=tmp_path_factory.mktemp("redis-cluster"), redis_cluster_port=first
    )
    up(config, services=("redis-cluster",))
    yield RedisCluster(config, [first + n for n in range(REDIS_CLUSTER_NODES)])
    down(config, services=("redis-cluster",))
