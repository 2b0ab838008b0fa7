"""Apache Kafka in KRaft mode: the single broker, and the cluster of three nodes in one quorum.

Every node is broker and controller at once, runs from the jar cache (see `install`), and keeps
its configuration and data in a folder of its own. Its storage is formatted once with the
cluster's id; on the cluster, every replicated topic gets a replica on each node with
`min.insync.replicas=2`, so any one node may be lost. `up` ends by creating the dead-letter
topic, which proves the brokers accept writes.
"""

import base64
import secrets
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import NewTopic

from nova_assets.local.stack.config import HOST, Process, StackConfig, StackError
from nova_assets.local.stack.install import kafka_jars
from nova_assets.local.stack.probes import kafka_admin
from nova_assets.local.stack.processes import LOG_TAIL_LINES, tail

# Three JVMs on two cores: smaller heaps, and only the quick JIT compiler (C1), which brings a
# node up in about 60% of the time the full JIT takes (6 s rather than 10 s for all three) and
# spends the cores on serving rather than compiling. The single node keeps the JVM's defaults.
_KAFKA_JVM = {
    "kafka": ("-Xmx512m",),
    "kafka-cluster": ("-Xmx384m", "-XX:TieredStopAtLevel=1"),
}

_LOG4J2_PROPERTIES = """\
status = warn
# Kafka's own shutdown hook logs its clean shutdown; log4j's hook must not close the log first.
shutdownHook = disable
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
"""


def prepare_kafka_nodes(
    config: StackConfig, service: str, processes: Sequence[Process], log: Callable[[str], None]
) -> list[list[str]]:
    """The server command of each of `processes`, each node configured and its storage formatted.

    Resolves the jars first if needed (see `install.kafka_jars`).
    """
    jars = kafka_jars(config, log)
    cluster_id = _kafka_cluster_id(config, service)
    # Formatting a node's storage starts a JVM of its own: the nodes format side by side.
    with ThreadPoolExecutor(len(processes)) as pool:
        return list(pool.map(lambda p: _prepare_node(config, p, jars, cluster_id), processes))


def _kafka_cluster_id(config: StackConfig, service: str) -> str:
    """The id every node of one Kafka cluster formats its storage with, drawn once."""
    folder = config.kafka_dir if service == "kafka" else config.state_dir / "kafka-cluster"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cluster-id"
    if not path.exists():
        path.write_text(_new_cluster_id())
    return path.read_text()


def _new_cluster_id() -> str:
    # What `StorageTool random-uuid` prints, without starting a JVM: 16 random bytes as
    # unpadded URL-safe base64. A leading '-' would be read as an option, so draw again.
    while True:
        cluster_id = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _prepare_node(config: StackConfig, node: Process, jars: Path, cluster_id: str) -> list[str]:
    """Writes a node's configuration, formats its storage once, and returns the server command."""
    home = config.kafka_home(node)
    home.mkdir(parents=True, exist_ok=True)
    properties = home / "server.properties"
    log4j = home / "log4j2.properties"
    properties.write_text(_server_properties(config, node))
    log4j.write_text(_LOG4J2_PROPERTIES)
    java = [
        "java", *_KAFKA_JVM[node.service], f"-Dlog4j2.configurationFile={log4j}",
        "-cp", f"{jars}/*",
    ]  # fmt: skip
    # A formatted node holds meta.properties; skipping the format spares a JVM start on restart.
    if (home / "data" / "meta.properties").exists():
        return [*java, "kafka.Kafka", str(properties)]
    format_command = [
        *java, "kafka.tools.StorageTool", "format", "-t", cluster_id,
        "-c", str(properties), "--ignore-formatted",
    ]  # fmt: skip
    result = subprocess.run(
        format_command, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        output = "\n".join((result.stdout + result.stderr).splitlines()[-LOG_TAIL_LINES:])
        raise StackError(
            f"formatting Kafka's storage in {home / 'data'} failed "
            f"(exit code {result.returncode}):\n{output}\n"
            f"If the folder holds another cluster's data, remove {home} and run "
            "`nova-assets services up` again."
        )
    return [*java, "kafka.Kafka", str(properties)]


def _server_properties(config: StackConfig, node: Process) -> str:
    voters = config.processes(node.service)
    # Every replicated topic gets a replica on each node; with three, a write needs two of them
    # in sync, so one node may be lost without losing an acknowledged write or availability.
    replicas = str(len(voters))
    min_isr = str(min(2, len(voters)))
    settings = {
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        "controller.quorum.voters": ",".join(
            f"{v.node_id}@{HOST}:{v.controller_port}" for v in voters
        ),
        "listeners": f"PLAINTEXT://{node.address},CONTROLLER://{HOST}:{node.controller_port}",
        "advertised.listeners": f"PLAINTEXT://{node.address}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(config.kafka_home(node) / "data"),
        "offsets.topic.replication.factor": replicas,
        "transaction.state.log.replication.factor": replicas,
        "transaction.state.log.min.isr": min_isr,
        "share.coordinator.state.topic.replication.factor": replicas,
        "share.coordinator.state.topic.min.isr": min_isr,
        "default.replication.factor": replicas,
        "min.insync.replicas": min_isr,
        # The cleaner's buffer (128 MiB by default) is taken from the heap at start.
        "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        # Fast consumer groups for tests and the local loop.
        "group.initial.rebalance.delay.ms": "0",
        "offsets.topic.num.partitions": "1",
        "group.min.session.timeout.ms": "1000",
        # After a kill the controller holds the old registration until its session expires
        # (9 s by default): the broker's partitions wait that long for a new leader, and a
        # restarted broker that long to be unfenced.
        "broker.heartbeat.interval.ms": "500",
        "broker.session.timeout.ms": "4000",
    }
    return "".join(f"{key}={value}\n" for key, value in settings.items())


def ensure_topic(config: StackConfig, service: str, log: Callable[[str], None]) -> None:
    """Creates the dead-letter topic, which also proves the brokers accept writes to metadata.

    On the cluster it is replicated on all three brokers with `min.insync.replicas=2`, so a
    write acknowledged by all in-sync replicas (acks=all) survives the loss of any one broker.
    """
    cluster = config.processes(service)
    topic, bootstrap = config.dlq_topic, ",".join(node.address for node in cluster)
    replicas = len(cluster)
    settings = {"min.insync.replicas": "2"} if replicas > 1 else {}
    logs = ", ".join(str(config.log_path(node.name)) for node in cluster)
    admin = kafka_admin(bootstrap)
    new = NewTopic(topic, num_partitions=1, replication_factor=replicas, config=settings)
    # Keep `admin` referenced until the future resolves: dropping it cancels the request.
    future = admin.create_topics([new])[topic]
    try:
        future.result(timeout=30)
        log(f"created Kafka topic {topic!r}" + (f" ({replicas} replicas)" if replicas > 1 else ""))
    except KafkaException as error:
        if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise StackError(
                f"Kafka on {bootstrap} answers but creating topic {topic!r} failed: {error}. "
                f"See {logs}, then run `nova-assets services down` and `up`."
            ) from error
    # Wait until every partition has a leader and, on the cluster, all replicas in sync, so
    # producers can write the moment `up` returns and any one broker may then be lost.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            partitions = admin.list_topics(topic=topic, timeout=5).topics[topic].partitions
        except KafkaException:
            partitions = {}
        wrong = [p for p in partitions.values() if len(p.replicas) != replicas]
        if wrong:
            raise StackError(
                f"Kafka topic {topic!r} on {bootstrap} exists with {len(wrong[0].replicas)} "
                f"replica(s) per partition, not {replicas}. Delete it (or choose another "
                "DLQ_TOPIC), then run `nova-assets services up` again."
            )
        if partitions and all(
            p.leader >= 0 and len(p.isrs) == replicas for p in partitions.values()
        ):
            if replicas > 1:
                log(
                    f"{service} ok on {config.address(service)}: {replicas} brokers, topic "
                    f"{topic!r} with all {replicas} replicas in sync (min.insync.replicas=2)"
                )
            return
        time.sleep(0.2)
    tail_or_logs = tail(config.log_path(service)) if replicas == 1 else f"See {logs}."
    raise StackError(
        f"Kafka topic {topic!r} on {bootstrap} got no leader with {replicas} in-sync "
        f"replica(s) within 30 s.\n{tail_or_logs}\n"
        "Run `nova-assets services down`, then `nova-assets services up` again."
    )
