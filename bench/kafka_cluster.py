"""Benchmark of a burst of failures published to three Kafka brokers beside one, in the same run.

    .venv/bin/python bench/kafka_cluster.py [--bursts 12,100]

A burst is N failed runs' DLQ messages (about 2.9 KB each, as `encode` builds them) sent one
after the other through `KafkaDLQResource.publish`, as the publisher sends them: each waits for
its acknowledgement (acks=all, idempotent) before the next goes. The targets, in the same run:
the local stack's single broker (KAFKA_BROKERS, 127.0.0.1:9092 by default; `nova-assets
services up` starts it), and three KRaft nodes (`--with-kafka-cluster`) started here on free
ports in a temporary folder and stopped at the end. Each target gets a topic of its own, one
partition, replicated on every broker (`min.insync.replicas=2` on the three), so on the cluster
an acknowledgement waits for a follower to fetch the message. Producers are warm (the first
send fetches the producer id); each burst is timed REPEAT times and the median is printed with
the cluster's ratio to the single broker. All three nodes share this machine's cores with the
single broker and the client, and run the JVM's quick compiler only (the stack's setting for
them), so the figure is the cost of replication on one machine, not a cluster's capacity.
"""

import argparse
import logging
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from confluent_kafka.admin import AdminClient, NewTopic

from nova_assets.core.resources import KafkaDLQResource
from nova_assets.core.settings import Settings
from nova_assets.defs.dlq import writing
from nova_assets.local import stack

REPEAT = 5
JARS_DIR = Path(__file__).parents[1] / ".nova" / "kafka-libs"
"""The project's Kafka jar cache, so Maven is not asked again."""


def payload(run: int) -> bytes:
    """One failed run's DLQ message, of the size a failure with a short stack trace makes."""
    frames = "".join(
        f'  File "/app/nova_assets/defs/trending/assets.py", line {100 + i}, in step_{i}\n'
        "    rows = clickhouse.query_df(SQL, parameters)\n"
        for i in range(20)
    )
    return writing.encode(
        {
            "schema": writing.SCHEMA,
            "job_name": "trending_1h",
            "run_id": f"{uuid.uuid4()}-{run}",
            "asset_keys": ["trending_posts_1h"],
            "failed_steps": ["trending_posts_1h"],
            "error": {
                "type": "ConnectionError",
                "message": "Redis at 127.0.0.1:6379 refused the connection",
                "stack": frames,
            },
            "retry_count": 5,
            "max_retries": 5,
            "tags": {"nova/job": "trending_1h", "dagster/schedule_name": "trending_1h_schedule"},
            "replay_of": None,
            "truncated": False,
        }
    )


def burst_seconds(kafka: KafkaDLQResource, size: int) -> list[float]:
    """Seconds per burst of `size` acknowledged messages, REPEAT times."""
    messages = [payload(i) for i in range(size)]
    seconds = []
    for _ in range(REPEAT):
        started = time.perf_counter()
        for message in messages:
            delivery = kafka.publish("trending_1h", message)
            assert delivery, delivery.error
        seconds.append(time.perf_counter() - started)
    return seconds


def measure(brokers: str, topic: str, sizes: list[int]) -> dict[int, list[float]]:
    kafka = KafkaDLQResource(brokers=brokers, topic=topic)
    try:
        assert kafka.publish("warm-up", payload(0)), "the first message was not acknowledged"
        return {size: burst_seconds(kafka, size) for size in sizes}
    finally:
        kafka.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bursts", default="12,100")
    sizes = [int(size) for size in parser.parse_args().bursts.split(",")]
    # librdkafka's retries while a fresh broker loads its coordinators are no news here.
    logging.getLogger("nova_assets.kafka").setLevel(logging.ERROR)
    single_brokers = ",".join(Settings.from_env().kafka_brokers)

    admin = AdminClient({"bootstrap.servers": single_brokers})
    single_topic = f"bench-dlq-{uuid.uuid4().hex[:8]}"
    admin.create_topics([NewTopic(single_topic, 1, 1)])[single_topic].result(timeout=30)
    with tempfile.TemporaryDirectory() as scratch:
        config = stack.StackConfig(
            state_dir=Path(scratch),
            kafka_cluster_port=stack.free_port_range(2 * stack.KAFKA_CLUSTER_NODES),
            jars_dir=JARS_DIR if JARS_DIR.is_dir() else None,
            dlq_topic="bench-dlq",
        )
        try:
            started = time.perf_counter()
            stack.up(config, ("kafka-cluster",))
            start_s = time.perf_counter() - started
            single = measure(single_brokers, single_topic, sizes)
            cluster = measure(config.kafka_cluster_brokers, config.dlq_topic, sizes)
        finally:
            stack.down(config, ("kafka-cluster",))
            admin.delete_topics([single_topic])[single_topic].result(timeout=30)

    print(f"\n## DLQ bursts published with acks=all (median of {REPEAT}, ms)\n")
    print("| burst | one broker | ms/message | three brokers | ms/message | three / one |")
    print("|---:|---:|---:|---:|---:|---:|")
    for size in sizes:
        one, three = statistics.median(single[size]), statistics.median(cluster[size])
        print(
            f"| {size} | {one * 1000:,.0f} | {one * 1000 / size:.1f} | {three * 1000:,.0f} "
            f"| {three * 1000 / size:.1f} | {three / one:.2f}x |"
        )
    print(f"\nThe three nodes started, formatted and took the topic in {start_s:.1f} s.")


if __name__ == "__main__":
    main()
