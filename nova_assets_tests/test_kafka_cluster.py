"""Three Kafka brokers keep every failed run: one lost mid-burst loses nothing, two make it wait.

The stack's `--with-kafka-cluster` (three KRaft nodes, each broker and controller, in one quorum)
runs on ports of this module's own in a temporary state folder, and each test gets a DLQ topic of
its own, replicated on all three brokers with `min.insync.replicas=2`. Failed runs are real runs
in a real Dagster instance, published by the DLQ publisher's own code (`publish_failed_runs`,
through `KafkaDLQResource`: acks=all, idempotent); brokers die by SIGKILL. What is checked is
what an operator would check: the messages on the topic, read by a consumer from the brokers
still running, and the delivery tag on each run.
"""

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, HTTPServer

import dagster as dg
import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from nova_assets.core.jobs import JOB_TAG, job_specs
from nova_assets.core.resources import AlertWebhookResource, KafkaDLQResource
from nova_assets.core.settings import Settings
from nova_assets.defs.dlq.sensors import PublisherCursor, publish_failed_runs
from nova_assets.defs.dlq.writing import DELIVERED_TAG
from nova_assets.local.stack import (
    HOST,
    KAFKA_CLUSTER_NODES,
    StackConfig,
    down,
    free_port_range,
    node_pids,
    nodes,
    start_node,
    up,
)
from nova_assets_tests.conftest import JARS_DIR

SPECS = job_specs(Settings.from_env({}))


@dg.op
def refresh_trending() -> None:
    raise ConnectionError("Redis at 127.0.0.1:6379 refused the connection")


@dg.job(name="trending_1h", tags={JOB_TAG: "trending_1h"})
def failing_trending() -> None:
    """Stands in for the trending job while its Redis is down: every run fails."""
    refresh_trending()


def fail_runs(instance: dg.DagsterInstance, count: int) -> list[str]:
    """Run the failing job `count` times; the ids of the failed runs, oldest first."""
    results = [
        failing_trending.execute_in_process(instance=instance, raise_on_error=False)
        for _ in range(count)
    ]
    assert not any(result.success for result in results)
    return [result.run_id for result in results]


def evaluate(
    instance: dg.DagsterInstance,
    kafka: KafkaDLQResource,
    cursor: str | None = None,
    alerts: AlertWebhookResource | None = None,
) -> tuple[str, int, int]:
    """One evaluation of the DLQ publisher: (its new cursor, delivered, still pending)."""
    try:
        new, delivered, pending = publish_failed_runs(
            instance,
            PublisherCursor.parse(cursor),
            kafka,
            alerts or AlertWebhookResource(),
            dg.get_dagster_logger(),
            SPECS,
        )
    finally:
        kafka.close()  # as at the end of a sensor tick: what is still queued is flushed
    return new.serialize(), delivered, pending


def dlq(
    config: StackConfig, brokers: str | None = None, timeout_s: float = 10.0
) -> KafkaDLQResource:
    """The DLQ resource on the cluster's topic, as a sensor tick builds it."""
    return KafkaDLQResource(
        brokers=brokers or config.kafka_cluster_brokers,
        topic=config.dlq_topic,
        delivery_timeout_s=timeout_s,
    )


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, service_binaries: None
) -> Iterator[StackConfig]:
    """The three-node cluster, started once for the module and stopped at its end."""
    config = StackConfig(
        state_dir=tmp_path_factory.mktemp("kafka-cluster"),
        kafka_cluster_port=free_port_range(2 * KAFKA_CLUSTER_NODES),
        jars_dir=JARS_DIR,
    )
    try:
        up(config, ("kafka-cluster",))
        yield config
    finally:
        down(config, ("kafka-cluster",))


@pytest.fixture
def dlq_cluster(cluster: StackConfig) -> StackConfig:
    """All three brokers running and a DLQ topic of the test's own, its three replicas in sync.

    A broker an earlier test killed is started again.
    """
    config = replace(cluster, dlq_topic=f"dlq-{uuid.uuid4().hex[:8]}")
    up(config, ("kafka-cluster",))
    return config


def partition(config: StackConfig, brokers: str | None = None) -> tuple[int, list[int]]:
    """The leader and in-sync replicas of the topic's partition, as the brokers report them.

    A broker whose metadata has not caught up with the controller yet lists the topic without
    its partition: it is asked again, for up to 30 s.
    """
    admin = AdminClient(
        {"bootstrap.servers": brokers or config.kafka_cluster_brokers, "log_level": 0}
    )
    deadline = time.monotonic() + 30
    while True:
        topic = admin.list_topics(config.dlq_topic, timeout=5).topics[config.dlq_topic]
        if 0 in topic.partitions:
            return topic.partitions[0].leader, sorted(topic.partitions[0].isrs)
        assert time.monotonic() < deadline, f"no partition listed for {config.dlq_topic}: {topic}"
        time.sleep(0.2)


def writable(config: StackConfig, brokers: str) -> bool:
    """Whether the partition has a leader and the two in-sync replicas a write needs."""
    try:
        leader, in_sync = partition(config, brokers)
    except KafkaException:  # no broker answered the metadata request in time
        return False
    return leader >= 0 and len(in_sync) >= 2


def brokers_except(config: StackConfig, *node_ids: int) -> str:
    return ",".join(n.address for n in nodes(config, "kafka-cluster") if n.node_id not in node_ids)


def kill(config: StackConfig, node_id: int) -> None:
    """SIGKILL one broker (and its controller: they share the process), and see it gone."""
    name = f"kafka-cluster-{node_id}"
    os.kill(node_pids(config, "kafka-cluster")[name], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while node_pids(config, "kafka-cluster")[name] is not None:
        assert time.monotonic() < deadline, f"{name} still runs after SIGKILL"
        time.sleep(0.05)


@contextmanager
def webhook(on_post: Callable[[int], None]) -> Iterator[AlertWebhookResource]:
    """An alert webhook on 127.0.0.1 calling `on_post(n)` at its n-th post, before answering.

    The publisher posts once per message the brokers acknowledged, right after tagging its run.
    """
    posts: list[bytes] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            posts.append(self.rfile.read(int(self.headers["Content-Length"])))
            on_post(len(posts))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer((HOST, 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield AlertWebhookResource(url=f"http://{HOST}:{server.server_port}/hook")
    finally:
        server.shutdown()
        server.server_close()


def on_topic(config: StackConfig, brokers: str) -> list[dict]:
    """Every message of the topic, read by a consumer that knows only `brokers`."""
    return [json.loads(record.value) for record in dlq(config, brokers).read()]


def test_a_broker_killed_mid_burst_loses_none_of_twelve_failures(
    instance: dg.DagsterInstance, dlq_cluster: StackConfig
) -> None:
    config = dlq_cluster
    leader, in_sync = partition(config)
    assert in_sync == [1, 2, 3]
    run_ids = fail_runs(instance, 12)

    # The partition's leader dies right after the fourth message is acknowledged: the fifth is
    # sent while the cluster notices and elects a new leader among the two in-sync followers.
    killed_at: list[int] = []

    def kill_the_leader_after_four(posts: int) -> None:
        if posts == 4:
            kill(config, leader)
            killed_at.append(posts)

    with webhook(kill_the_leader_after_four) as alerts:
        cursor, pending = None, None
        for _ in range(3):
            cursor, _, pending = evaluate(instance, dlq(config, timeout_s=20.0), cursor, alerts)
            if pending == 0:
                break
    assert killed_at == [4]
    assert pending == 0

    survivors = brokers_except(config, leader)
    messages = on_topic(config, survivors)
    # All twelve, each once: acks=all kept the first four, idempotence kept the retried fifth
    # from landing twice.
    assert sorted(m["run_id"] for m in messages) == sorted(run_ids)
    assert {m["job_name"] for m in messages} == {"trending_1h"}
    assert all(instance.get_run_by_id(run_id).tags.get(DELIVERED_TAG) for run_id in run_ids)
    new_leader, in_sync = partition(config, survivors)
    assert new_leader != leader
    assert leader not in in_sync


def test_with_two_brokers_lost_delivery_waits_and_completes_when_one_returns(
    instance: dg.DagsterInstance, dlq_cluster: StackConfig
) -> None:
    config = dlq_cluster
    leader, _ = partition(config)
    returning = next(n.node_id for n in nodes(config, "kafka-cluster") if n.node_id != leader)
    kill(config, leader)
    kill(config, returning)
    run_ids = fail_runs(instance, 3)

    # One broker left: the quorum is lost, the partition has no leader, and a write would need
    # two replicas in sync anyway. The runs wait, none marked delivered.
    cursor, delivered, pending = evaluate(instance, dlq(config, timeout_s=3.0))
    assert (delivered, pending) == (0, 3)
    assert not any(DELIVERED_TAG in instance.get_run_by_id(run_id).tags for run_id in run_ids)

    start_node(config, f"kafka-cluster-{returning}")
    # Back to a quorum of two: wait, as an operator watching the topic would, until the
    # partition has a leader and the two in-sync replicas min.insync.replicas asks for.
    running = brokers_except(config, leader)
    deadline = time.monotonic() + 60
    while not writable(config, running):
        assert time.monotonic() < deadline, "the partition got no leader with two in sync"
        time.sleep(0.2)

    _, delivered, pending = evaluate(instance, dlq(config), cursor)
    assert (delivered, pending) == (3, 0)
    assert all(instance.get_run_by_id(run_id).tags.get(DELIVERED_TAG) for run_id in run_ids)
    messages = on_topic(config, running)
    assert [m["run_id"] for m in messages] == run_ids
    assert {m["job_name"] for m in messages} == {"trending_1h"}
