"""Shared fixtures: the real local services, isolated per test by key prefix and topic name.

`make test` starts Redis, Kafka and the Pushgateway on their default local ports before pytest
runs; ClickHouse is the embedded chdb engine in a temporary directory. The embedded engine admits
one data directory per process, so every test shares the session's `clickhouse` resource.

Markers follow the fixtures: a test that takes a fixture of `SERVICE_FIXTURES` is marked
`services` (and `e2e` for `dagster_dev`), so `make test-fast` (`-m "not services"`) runs exactly
the tests that need no service and nobody has to remember a marker.
"""

import os
import signal
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import redis
from confluent_kafka.admin import AdminClient, NewTopic

from nova_assets.core.resources import ClickHouseResource, KafkaDLQResource, RedisCacheResource
from nova_assets.local.stack import StackConfig, down, started_pid, up

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
}
"""Fixtures that need a running service, or the binaries the stack installs (root, network)."""


E2E_START_ORDER = (
    "test_failures_reach_the_operator_however_launched_and_are_replayed_once[dagster_dev0]",
    "test_an_operator_materializes_from_the_ui_in_a_real_browser",
    "test_failures_reach_the_operator_however_launched_and_are_replayed_once[dagster_dev1]",
    "test_the_daemon_keeps_caches_fresh_and_ui_runs_take_their_turn[dagster_dev0]",
    "test_caches_fill_at_start_and_heal_after_a_flush_and_an_outage",
    "test_after_a_hard_kill_the_orphaned_run_fails_frees_its_slot_and_reaches_the_dlq",
    "test_the_daemon_keeps_caches_fresh_and_ui_runs_take_their_turn[dagster_dev1]",
)
"""The end-to-end tests run before the rest, in this order. pytest-xdist hands each worker two
tests to begin with, so each long test is paired with a short one: the workers finish at about
the same time instead of one working through two five-minute tests at the end."""


def _start_order(item: pytest.Item) -> int:
    return next(
        (i for i, name in enumerate(E2E_START_ORDER) if item.name.startswith(name)),
        len(E2E_START_ORDER),
    )


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


def kafka_for(config: StackConfig) -> KafkaDLQResource:
    """The DLQ resource on a private broker, with a short delivery timeout."""
    return KafkaDLQResource(
        brokers=f"127.0.0.1:{config.kafka_port}", topic=config.dlq_topic, delivery_timeout_s=3.0
    )
