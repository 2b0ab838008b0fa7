"""The local stack: real Redis, Apache Kafka (KRaft) and a Pushgateway on 127.0.0.1.

`up` installs what is missing, starts each service detached so it outlives the command line,
and returns only once every service answers for real. `down` stops only what `up` started.
On request the stack also runs Prometheus, PostgreSQL, a Redis Cluster (three primaries, three
replicas) and a Kafka cluster (three KRaft nodes in one quorum). A service runs as one process,
a cluster as one process per node; every process is started, awaited, recognised by its pid
file and stopped the same way, and a cluster's nodes start and stop together.
"""

import base64
import hashlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import redis
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic
from redis.backoff import NoBackoff
from redis.retry import Retry

HOST = "127.0.0.1"
SERVICES = ("redis", "kafka", "pushgateway")
CLUSTERS = ("redis-cluster", "kafka-cluster")
"""Started only on request: a Redis Cluster of three primaries and three replicas
(`--with-redis-cluster`) and three Kafka nodes, each broker and controller, in one quorum
(`--with-kafka-cluster`): what production scales out to, on this machine."""
OPTIONAL_SERVICES = ("prometheus", "postgres", *CLUSTERS)
"""Started only on request: Prometheus to watch the alerts locally (`--with-prometheus`),
PostgreSQL for Dagster's production storage (`--with-postgres`, deploy/dagster.yaml), and the
clusters."""

REDIS_CLUSTER_NODES = 6
REDIS_CLUSTER_BUS_OFFSET = 10_000
"""Redis Cluster nodes talk to each other on their port plus this (the cluster bus)."""
KAFKA_CLUSTER_NODES = 3
_REDIS_SLOTS = 16_384

# One apt line for the binaries the stack runs; `prometheus` brings promtool along.
APT_PACKAGES = ("redis-server", "prometheus-pushgateway", "prometheus")
# Which apt packages provide each binary, for a machine that lacks it. redis-server depends on
# redis-tools, but a machine may have lost it since; naming it installs it again.
_BINARY_PACKAGES = {
    "redis-server": APT_PACKAGES,
    "redis-cli": ("redis-tools",),
    "prometheus-pushgateway": APT_PACKAGES,
    "promtool": APT_PACKAGES,
    "prometheus": APT_PACKAGES,
    "pg_ctlcluster": ("postgresql",),
    "java": ("default-jre-headless",),
    "mvn": ("maven",),
}
_BINARIES = {
    "redis": ("redis-server",),
    "kafka": ("java", "mvn"),
    "pushgateway": ("prometheus-pushgateway", "promtool"),
    "prometheus": ("prometheus",),
    "postgres": ("pg_ctlcluster",),
    "redis-cluster": ("redis-server", "redis-cli"),
    "kafka-cluster": ("java", "mvn"),
}
# A cold JVM on a small machine needs far longer than Redis or the Pushgateway; three at once on
# two cores longer still.
_READY_TIMEOUT_S = {
    "redis": 15.0,
    "kafka": 90.0,
    "pushgateway": 15.0,
    "prometheus": 30.0,
    "postgres": 60.0,
    "redis-cluster": 15.0,
    "kafka-cluster": 120.0,
}
_SETTLE_TIMEOUT_S = 60.0
"""For a cluster to become whole once its nodes answer: slots served, replicas in sync."""
_STOP_GRACE_S = {
    "redis": 5.0,
    "kafka": 15.0,
    "pushgateway": 5.0,
    "prometheus": 10.0,
    "postgres": 10.0,
    "redis-cluster": 5.0,
    "kafka-cluster": 15.0,
}
_PROBE_TIMEOUT_S = 1.0
_LOG_TAIL_LINES = 30
# Three JVMs on two cores: smaller heaps, and only the quick JIT compiler (C1), which brings a
# node up in about 60% of the time (6 s instead of 10 s for all three) and spends the cores on
# serving rather than compiling. The single node keeps the JVM's defaults.
_KAFKA_JVM = {
    "kafka": ("-Xmx512m",),
    "kafka-cluster": ("-Xmx384m", "-XX:TieredStopAtLevel=1"),
}


@dataclass(frozen=True)
class Process:
    """One process of the stack: a service of its own, or one node of a cluster."""

    service: str
    name: str
    """Names its pid file (run/<name>.pid) and log (logs/<name>.log): the service's name, or the
    cluster's followed by the node's port (`redis-cluster-7000`) or id (`kafka-cluster-2`)."""
    address: str
    port: int
    node_id: int = 1
    """Kafka's `node.id`; for a Redis Cluster node, its place among the six, 1 to 6."""
    controller_port: int | None = None
    """Where a Kafka node's controller listens."""


@dataclass(frozen=True)
class StackConfig:
    state_dir: Path
    redis_port: int = 6379
    redis_socket: Path | None = None
    """A unix socket for Redis (from a `unix://` REDIS_URL); Redis then listens on no port."""
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    pushgateway_port: int = 9091
    dlq_topic: str = "jobs-dlq"
    jars_dir: Path | None = None
    prometheus_port: int = 9090
    prometheus_rules: Path | None = None
    postgres_port: int = 5432
    postgres_dir: Path | None = None
    """PostgreSQL's data directory (default state_dir/postgres); the `postgres` user owns it."""
    redis_cluster_port: int = 7000
    """The first of the Redis Cluster's six consecutive ports (7000 to 7005); each node's cluster
    bus listens 10000 above its port. `redis-cli --cluster create` picks the primaries."""
    kafka_cluster_port: int = 9192
    """The first of the Kafka cluster's six consecutive ports: node n (1 to 3) serves clients
    on kafka_cluster_port + 2 * (n - 1) (9192, 9194, 9196) and its controller on the port after."""

    @property
    def postgres_data(self) -> Path:
        return self.postgres_dir or self.state_dir / "postgres"

    @property
    def postgres_url(self) -> str:
        """SQLAlchemy URL for Dagster's storage (psycopg2, the driver dagster-postgres uses)."""
        return f"postgresql+psycopg2://postgres@{HOST}:{self.postgres_port}/postgres"

    @property
    def kafka_jars(self) -> Path:
        return self.jars_dir or self.state_dir / "kafka-libs"

    @property
    def kafka_dir(self) -> Path:
        return self.state_dir / "kafka"

    @property
    def kafka_cluster_brokers(self) -> str:
        """The Kafka cluster's three brokers, as KAFKA_BROKERS takes them."""
        return ",".join(node.address for node in self.processes("kafka-cluster"))

    def port(self, service: str) -> int:
        """Where `service` listens; for a cluster, its first port."""
        return {
            "redis": self.redis_port,
            "kafka": self.kafka_port,
            "pushgateway": self.pushgateway_port,
            "prometheus": self.prometheus_port,
            "postgres": self.postgres_port,
            "redis-cluster": self.redis_cluster_port,
            "kafka-cluster": self.kafka_cluster_port,
        }[service]

    def address(self, service: str) -> str:
        """Where `service` listens, as the command line shows it."""
        if service == "redis" and self.redis_socket is not None:
            return f"unix:{self.redis_socket}"
        if service == "redis-cluster":
            last = self.redis_cluster_port + REDIS_CLUSTER_NODES - 1
            return f"{HOST}:{self.redis_cluster_port}-{last}"
        if service == "kafka-cluster":
            return f"{HOST}:" + ",".join(str(node.port) for node in self.processes(service))
        return f"{HOST}:{self.port(service)}"

    def processes(self, service: str) -> tuple[Process, ...]:
        """The processes `service` runs as: one, or a cluster's nodes in order."""
        if service == "redis-cluster":
            return tuple(
                Process(service, f"{service}-{port}", f"{HOST}:{port}", port, node_id=n)
                for n, port in enumerate(
                    range(self.redis_cluster_port, self.redis_cluster_port + REDIS_CLUSTER_NODES),
                    start=1,
                )
            )
        if service == "kafka-cluster":
            ports = [self.kafka_cluster_port + 2 * n for n in range(KAFKA_CLUSTER_NODES)]
            return tuple(
                Process(service, f"{service}-{n}", f"{HOST}:{port}", port, n, port + 1)
                for n, port in enumerate(ports, start=1)
            )
        controller = self.kafka_controller_port if service == "kafka" else None
        return (
            Process(service, service, self.address(service), self.port(service), 1, controller),
        )

    def log_path(self, name: str) -> Path:
        """The log of a service, or of a cluster's node by its name."""
        return self.state_dir / "logs" / f"{name}.log"

    def pid_path(self, name: str) -> Path:
        """The pid file of a service, or of a cluster's node by its name."""
        return self.state_dir / "run" / f"{name}.pid"


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    """The service's name, or for a cluster the node's (`redis-cluster-7000`)."""
    address: str
    answering: bool
    pid: int | None
    service: str
    """The service the process belongs to: its own name, or the cluster's."""


class StackError(RuntimeError):
    """A service of the local stack could not be installed, started or reached."""


def _no_log(message: str) -> None:
    del message


def up(
    config: StackConfig,
    services: Sequence[str] = SERVICES,
    log: Callable[[str], None] = _no_log,
) -> None:
    """Starts the services that are not already answering and waits until each one answers.

    A cluster's nodes start together and `up` returns once the cluster is whole: the Redis
    Cluster created once (`redis-cli --cluster create`) and every node reporting
    `cluster_state:ok` with all slots served and its replicas in sync; the Kafka cluster with all
    three brokers registered and the DLQ topic replicated on all three. A node that was killed is
    started again; nodes already answering are reused.

    Args:
        config: Ports and folders of the stack.
        services: Which services to bring up, from `SERVICES` and `OPTIONAL_SERVICES`.
        log: Receives one line per step, for the command line to show.

    Raises:
        StackError: A service could not be installed, exited, or did not answer in time.
    """
    _check_names(services)
    groups = {name: config.processes(name) for name in services}
    to_start = {
        name: [process for process in processes if not _answering(config, process)]
        for name, processes in groups.items()
    }
    _install_missing(
        [binary for name, waiting in to_start.items() if waiting for binary in _BINARIES[name]],
        config,
        log,
    )
    for name, processes in groups.items():
        for process in processes:
            if process not in to_start[name]:
                log(f"reusing {process.name} already answering on {process.address}")
        began = time.monotonic()
        pids = _start(config, name, to_start[name], log)
        deadline = time.monotonic() + _READY_TIMEOUT_S[name]
        for process, pid in pids.items():
            _wait_until_answering(config, process, pid, deadline)
            log(
                f"{process.name} answering on {process.address} "
                f"(pid {pid}, {time.monotonic() - began:.1f} s)"
            )
        if name in ("kafka", "kafka-cluster"):
            _ensure_topic(config, name, log)
        elif name == "redis-cluster":
            _form_redis_cluster(config, log)


def down(
    config: StackConfig,
    services: Sequence[str] = SERVICES,
    log: Callable[[str], None] = _no_log,
) -> None:
    """Stops the services that `up` started, and nothing else.

    Every process of one service (a cluster's nodes) is sent SIGTERM at once and given the
    service's grace time together; what still runs after it gets SIGKILL.

    Args:
        config: Ports and folders of the stack.
        services: Which services to stop, from `SERVICES` and `OPTIONAL_SERVICES`.
        log: Receives one line per step, for the command line to show.
    """
    _check_names(services)
    for name in services:
        _stop(config, name, log)


def status(config: StackConfig) -> list[ServiceStatus]:
    """Reports, for every process, whether it answers on its port and whether `up` started it.

    One row per service, and one per node of each cluster.
    """
    return [
        ServiceStatus(
            name=process.name,
            address=process.address,
            answering=_answering(config, process),
            pid=_started_pid(config, process),
            service=name,
        )
        for name in SERVICES + OPTIONAL_SERVICES
        for process in config.processes(name)
    ]


def started_pid(config: StackConfig, name: str) -> int | None:
    """Returns the pid of the running service or cluster node `name` that `up` started, or None.

    The pid file alone is not trusted: pids are reused, so the process must also be alive and
    its command line must be the one `up` launched for this stack.

    Args:
        config: Ports and folders of the stack.
        name: A service of one process (`redis`, `kafka`, …) or a cluster's node
            (`redis-cluster-7000`, `kafka-cluster-2`; see `nodes`).
    """
    return _started_pid(config, _process(config, name))


def nodes(config: StackConfig, cluster: str) -> tuple[Process, ...]:
    """The nodes of `cluster` (from `CLUSTERS`) in order: Redis by port, Kafka by node id."""
    if cluster not in CLUSTERS:
        raise StackError(f"{cluster!r} is not a cluster; choose from {list(CLUSTERS)}")
    return config.processes(cluster)


def node_pids(config: StackConfig, cluster: str) -> dict[str, int | None]:
    """Each node of `cluster` by name, with the pid of its process if `up` started it and it runs.

    This is what to `kill -9` to take a node down; `start_node` brings it back.
    """
    return {node.name: _started_pid(config, node) for node in nodes(config, cluster)}


def start_node(config: StackConfig, name: str, log: Callable[[str], None] = _no_log) -> int | None:
    """Starts one node of a cluster again (after a `kill -9`, say) and waits until it serves.

    Only that node is started: the rest of the cluster is neither touched nor awaited. A Redis
    node serves once it reports `cluster_state:ok` (a primary that was replaced comes back as a
    replica of its successor); a Kafka node once it is registered with the quorum and unfenced,
    which needs a second controller running. A node already answering is left as it is.

    Args:
        config: Ports and folders of the stack.
        name: The node, as `nodes` and `node_pids` name it (also any service of one process).
        log: Receives one line per step.

    Returns:
        The node's pid, or None when it answers but nova-assets did not start it.

    Raises:
        StackError: The node exited, or did not serve in time.
    """
    process = _process(config, name)
    if _answering(config, process):
        log(f"reusing {process.name} already answering on {process.address}")
        return _started_pid(config, process)
    _install_missing(list(_BINARIES[process.service]), config, log)
    [pid] = _start(config, process.service, [process], log).values()
    _wait_until_answering(
        config, process, pid, time.monotonic() + _READY_TIMEOUT_S[process.service]
    )
    if process.service == "redis-cluster":
        _wait_for(
            lambda: _redis_node_problem(process),
            f"{process.name} (pid {pid}) to report cluster_state:ok",
            _SETTLE_TIMEOUT_S,
            [process],
            config,
        )
    return pid


def free_port_range(count: int, *, bus_offset: int = 0) -> int:
    """The first of `count` consecutive ports free on HOST, for a cluster beside another stack.

    With `bus_offset`, the ports that far above them are free too (a Redis Cluster's bus,
    `REDIS_CLUSTER_BUS_OFFSET`). Ports are drawn at random from 15000 to 22000, below the kernel's
    ephemeral range (from 32768) even with a bus offset of 10000, so an outgoing connection never
    takes one before the cluster binds it, and two callers rarely draw the same range.
    """
    for _ in range(200):
        first = random.randrange(15_000, 22_000 - count)
        wanted = [first + i + offset for i in range(count) for offset in {0, bus_offset}]
        if all(_port_free(port) for port in wanted):
            return first
    raise StackError(f"found no {count} consecutive free ports on {HOST} in 15000-22000")


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def _check_names(services: Sequence[str]) -> None:
    known = SERVICES + OPTIONAL_SERVICES
    unknown = sorted(set(services) - set(known))
    if unknown:
        raise StackError(f"unknown service(s) {unknown}; choose from {list(known)}")


def _process(config: StackConfig, name: str) -> Process:
    for service in SERVICES + OPTIONAL_SERVICES:
        for process in config.processes(service):
            if process.name == name:
                return process
    choices = [p.name for s in SERVICES + OPTIONAL_SERVICES for p in config.processes(s)]
    raise StackError(f"no service or cluster node named {name!r}; choose from {choices}")


def _started_pid(config: StackConfig, process: Process) -> int | None:
    try:
        pid = int(config.pid_path(process.name).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None
    if _running(pid) and all(marker in cmdline for marker in _cmdline_markers(config, process)):
        return pid
    return None


def _cmdline_markers(config: StackConfig, process: Process) -> tuple[str, ...]:
    port = process.port
    # Redis rewrites its process title to "redis-server 127.0.0.1:<port>" (or "unixsocket:<path>"),
    # followed by "[cluster]" on a cluster node.
    redis_title = f"unixsocket:{config.redis_socket}" if config.redis_socket else f"{HOST}:{port}"
    return {
        "redis": ("redis-server", redis_title),
        "redis-cluster": ("redis-server", f"{HOST}:{port} [cluster]"),
        "kafka": ("kafka.Kafka", str(_kafka_home(config, process) / "server.properties")),
        "kafka-cluster": ("kafka.Kafka", str(_kafka_home(config, process) / "server.properties")),
        "pushgateway": ("pushgateway", f"--web.listen-address={HOST}:{port}"),
        "prometheus": ("prometheus", f"--web.listen-address={HOST}:{port}"),
        "postgres": ("postgres", str(config.postgres_data), f"-p {port}"),
    }[process.service]


# --- probes -----------------------------------------------------------------------------------


def _answering(config: StackConfig, process: Process) -> bool:
    service = process.service
    if service == "redis" and config.redis_socket is not None:
        return _redis_answers(unix_socket_path=str(config.redis_socket))
    # A closed port answers at once; the protocol probes below would wait for their timeouts.
    try:
        socket.create_connection((HOST, process.port), timeout=_PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    if service in ("redis", "redis-cluster"):
        return _redis_answers(port=process.port)
    if service in ("pushgateway", "prometheus"):
        return _pushgateway_answers(process.port)
    if service == "postgres":
        return _postgres_answers(process.port)
    brokers = _kafka_brokers(process.address)
    # A cluster node serves once the quorum registered and unfenced it: it lists itself.
    return process.node_id in brokers if service == "kafka-cluster" else bool(brokers)


def _redis_probe(**where: str | int) -> redis.Redis:
    """A client at `port=` on HOST, or at `unix_socket_path=`, for one answer and no retries."""
    return redis.Redis(
        host=HOST,
        **where,
        socket_timeout=_PROBE_TIMEOUT_S,
        socket_connect_timeout=_PROBE_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )


def _redis_answers(**where: str | int) -> bool:
    """Whether Redis at `port=` on HOST, or at `unix_socket_path=`, answers a PING."""
    # No retries: a probe answers once, and the callers poll.
    client = _redis_probe(**where)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _redis_node_problem(node: Process) -> str | None:
    """What keeps a Redis Cluster node from serving its part, or None when it does."""
    client = _redis_probe(port=node.port)
    try:
        info = client.cluster("INFO")
        if info["cluster_state"] != "ok":
            return f"{node.address} reports cluster_state:{info['cluster_state']}"
        if int(info["cluster_slots_ok"]) != _REDIS_SLOTS:
            return f"{node.address} sees {info['cluster_slots_ok']} of {_REDIS_SLOTS} slots served"
        replication = client.info("replication")
        if replication["role"] == "slave" and replication.get("master_link_status") != "up":
            return f"replica {node.address} is not in sync with its primary yet"
        return None
    except redis.RedisError as error:
        return f"{node.address}: {error}"
    finally:
        client.close()


def _redis_cluster_problem(config: StackConfig) -> str | None:
    """What keeps the Redis Cluster from being whole, or None when it is.

    Whole: every node reports `cluster_state:ok` with every slot served, replicas are in sync,
    and every node's own view (CLUSTER NODES, what clients are routed by) shows the same six
    nodes: three primaries holding slots and three replicas, none failing or still joining.
    """
    for node in config.processes("redis-cluster"):
        problem = _redis_node_problem(node)
        if problem is not None:
            return problem
        client = _redis_probe(port=node.port)
        try:
            view = client.cluster("NODES")
        except redis.RedisError as error:
            return f"{node.address}: {error}"
        finally:
            client.close()
        peers = list(view.values())
        primaries = sum("master" in peer["flags"] and bool(peer["slots"]) for peer in peers)
        replicas = sum("slave" in peer["flags"] for peer in peers)
        # "fail?" (suspected), "fail", "handshake" (still joining), "noaddr" (address unknown).
        troubled = [
            peer["flags"]
            for peer in peers
            if any(bad in peer["flags"] for bad in ("fail", "handshake", "noaddr"))
        ]
        if (len(view), primaries, replicas, troubled) != (REDIS_CLUSTER_NODES, 3, 3, []):
            return (
                f"{node.address} sees {len(view)} nodes: {primaries} primaries holding slots, "
                f"{replicas} replicas" + (f", flagged {troubled}" if troubled else "")
            )
    return None


def _form_redis_cluster(config: StackConfig, log: Callable[[str], None]) -> None:
    """Creates the cluster unless its nodes already form one, then waits until it is whole."""
    cluster = config.processes("redis-cluster")
    fresh = True
    for node in cluster:
        client = _redis_probe(port=node.port)
        try:
            info = client.cluster("INFO")
        except redis.ResponseError as error:
            raise StackError(
                f"Redis on {node.address} answers but is no cluster node ({error}). Stop it, or "
                "choose other ports with --redis-cluster-port; then run `nova-assets services "
                "up --with-redis-cluster` again."
            ) from error
        finally:
            client.close()
        # A node restarted from its nodes.conf knows its peers at once, even before it is ok.
        fresh = (
            fresh and info["cluster_known_nodes"] == "1" and info["cluster_slots_assigned"] == "0"
        )
    began = time.monotonic()
    if fresh:
        addresses = [node.address for node in cluster]
        command = ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "1"]
        result = subprocess.run(
            [*command, "--cluster-yes"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_SETTLE_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            output = "\n".join((result.stdout + result.stderr).splitlines()[-_LOG_TAIL_LINES:])
            raise StackError(
                f"`{' '.join(command)}` failed (exit code {result.returncode}):\n{output}\n"
                "Run `nova-assets services down`, remove "
                f"{config.state_dir / 'redis-cluster'} and run `nova-assets services up "
                "--with-redis-cluster` again."
            )
        log(f"created the Redis Cluster on {config.address('redis-cluster')}")
    _wait_for(
        lambda: _redis_cluster_problem(config),
        "the Redis Cluster to become whole",
        _SETTLE_TIMEOUT_S,
        cluster,
        config,
    )
    log(
        f"redis-cluster ok on {config.address('redis-cluster')}: 3 primaries serving all "
        f"{_REDIS_SLOTS} slots, 3 replicas in sync ({time.monotonic() - began:.1f} s)"
    )


def _wait_for(
    problem: Callable[[], str | None],
    what: str,
    timeout_s: float,
    processes: Sequence[Process],
    config: StackConfig,
) -> None:
    """Polls `problem` until it returns None; past `timeout_s`, fails with the last problem."""
    deadline = time.monotonic() + timeout_s
    while (found := problem()) is not None:
        if time.monotonic() >= deadline:
            logs = ", ".join(str(config.log_path(process.name)) for process in processes)
            raise StackError(
                f"waited {timeout_s:.0f} s for {what}: {found}. See {logs}; then run "
                "`nova-assets services down` and `up` again."
            )
        time.sleep(0.2)


def _postgres_answers(port: int) -> bool:
    import psycopg2  # comes with dagster-postgres

    try:
        psycopg2.connect(
            host=HOST, port=port, user="postgres", dbname="postgres", connect_timeout=1
        ).close()
    except psycopg2.Error:
        return False
    return True


def _pushgateway_answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(
            f"http://{HOST}:{port}/-/ready", timeout=_PROBE_TIMEOUT_S
        ) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _kafka_admin(bootstrap: str) -> AdminClient:
    # log_level 0 keeps librdkafka from printing "connection refused" while the broker boots.
    return AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})


def _kafka_brokers(bootstrap: str) -> dict:
    # Metadata lists only brokers that registered with the controller, so a non-empty list
    # means the node is serving, not merely listening.
    try:
        return _kafka_admin(bootstrap).list_topics(timeout=2 * _PROBE_TIMEOUT_S).brokers
    except KafkaException:
        return {}


def _ensure_topic(config: StackConfig, service: str, log: Callable[[str], None]) -> None:
    """Creates the dead-letter topic, which also proves the brokers accept writes to metadata.

    On the cluster it is replicated on all three brokers with `min.insync.replicas=2`, so a
    write acknowledged by all in-sync replicas (acks=all) survives the loss of any one broker.
    """
    cluster = config.processes(service)
    topic, bootstrap = config.dlq_topic, ",".join(node.address for node in cluster)
    replicas = len(cluster)
    settings = {"min.insync.replicas": "2"} if replicas > 1 else {}
    logs = ", ".join(str(config.log_path(node.name)) for node in cluster)
    admin = _kafka_admin(bootstrap)
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
    tail = _tail(config.log_path(service)) if replicas == 1 else f"See {logs}."
    raise StackError(
        f"Kafka topic {topic!r} on {bootstrap} got no leader with {replicas} in-sync "
        f"replica(s) within 30 s.\n{tail}\n"
        "Run `nova-assets services down`, then `nova-assets services up` again."
    )


# --- installing -------------------------------------------------------------------------------


def _install_missing(binaries: list[str], config: StackConfig, log: Callable[[str], None]) -> None:
    missing = sorted({binary for binary in binaries if shutil.which(binary) is None})
    if not missing:
        return
    packages = list(dict.fromkeys(pkg for binary in missing for pkg in _BINARY_PACKAGES[binary]))
    install_line = "apt-get install -y " + " ".join(packages)
    if os.geteuid() != 0 or not Path("/etc/debian_version").exists() or not shutil.which("apt-get"):
        raise StackError(
            f"{', '.join(missing)} not found on PATH. Install them (on Debian/Ubuntu: "
            f"`sudo {install_line}`), then run `nova-assets services up` again."
        )
    log(f"{', '.join(missing)} missing; running apt-get update and {install_line}")
    apt_log = config.state_dir / "logs" / "apt.log"
    apt_log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with apt_log.open("wb") as out:
        for command in (["apt-get", "update"], ["apt-get", "install", "-y", *packages]):
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                check=False,
            )
            if result.returncode != 0:
                raise StackError(
                    f"`{' '.join(command)}` failed with exit code {result.returncode}.\n"
                    f"{_tail(apt_log)}\nFix the apt error above, or run `{install_line}` "
                    "yourself, then run `nova-assets services up` again."
                )
    still_missing = [binary for binary in missing if shutil.which(binary) is None]
    if still_missing:
        raise StackError(
            f"{still_missing} still not on PATH after `{install_line}`; see {apt_log}."
        )


def _kafka_jars(config: StackConfig, log: Callable[[str], None]) -> Path:
    """Resolves Kafka's runtime jars from Maven Central once, and again only if the POM changes."""
    jars = config.kafka_jars
    pom = resources.files(__package__).joinpath("kafka_pom.xml").read_text()
    stamp = hashlib.sha256(pom.encode()).hexdigest()
    marker = jars / ".resolved"
    if marker.is_file() and marker.read_text() == stamp:
        return jars
    log(f"resolving Kafka jars from Maven Central into {jars} (once)")
    jars.parent.mkdir(parents=True, exist_ok=True)
    # Resolve beside the cache and swap it in whole, so an interrupted download never looks done.
    with tempfile.TemporaryDirectory(prefix=f".{jars.name}-", dir=jars.parent) as staging:
        (Path(staging) / "pom.xml").write_text(pom)
        libs = Path(staging) / "libs"
        command = [
            "mvn", "-q", "-B", "-f", str(Path(staging) / "pom.xml"),
            "dependency:copy-dependencies", "-DincludeScope=runtime",
            f"-DoutputDirectory={libs}",
        ]  # fmt: skip
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            output = "\n".join((result.stdout + result.stderr).splitlines()[-_LOG_TAIL_LINES:])
            raise StackError(
                f"Maven could not resolve Kafka's jars (exit code {result.returncode}):\n{output}\n"
                "Check that Maven Central is reachable (proxy settings in ~/.m2/settings.xml), "
                "then run `nova-assets services up` again."
            )
        (libs / ".resolved").write_text(stamp)
        shutil.rmtree(jars, ignore_errors=True)
        libs.rename(jars)
    return jars


# --- starting and stopping --------------------------------------------------------------------


def _start(
    config: StackConfig, service: str, processes: Sequence[Process], log: Callable[[str], None]
) -> dict[Process, int]:
    """Launches each of `processes` unless an earlier `up` left it running; their pids.

    Nothing is awaited here, so a cluster's nodes boot side by side.
    """
    pids: dict[Process, int] = {}
    fresh = []
    for process in processes:
        pid = _started_pid(config, process)
        if pid is None:
            fresh.append(process)
        else:
            log(f"{process.name} (pid {pid}) started earlier is not answering yet; waiting for it")
            pids[process] = pid
    for process, command in zip(fresh, _commands(config, service, fresh, log), strict=True):
        pids[process] = _launch(config, process, command, log)
    return {process: pids[process] for process in processes}


def _commands(
    config: StackConfig, service: str, processes: Sequence[Process], log: Callable[[str], None]
) -> list[list[str]]:
    if not processes:
        return []
    if service in ("kafka", "kafka-cluster"):
        jars = _kafka_jars(config, log)
        cluster_id = _kafka_cluster_id(config, service)
        # Formatting a node's storage starts a JVM of its own: the nodes format side by side.
        with ThreadPoolExecutor(len(processes)) as pool:
            return list(pool.map(lambda p: _prepare_kafka(config, p, jars, cluster_id), processes))
    if service == "redis":
        data_dir = config.state_dir / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            "redis-server", "--port", str(config.redis_port), "--bind", HOST,
            "--dir", str(data_dir), "--daemonize", "no", *_REDIS_NO_PERSISTENCE,
        ]  # fmt: skip
        if config.redis_socket is not None:
            config.redis_socket.parent.mkdir(parents=True, exist_ok=True)
            command += [
                "--port", "0", "--unixsocket", str(config.redis_socket), "--unixsocketperm", "700",
            ]  # fmt: skip
        return [command]
    if service == "redis-cluster":
        return [_redis_cluster_node(config, node) for node in processes]
    if service == "prometheus":
        return [_prepare_prometheus(config)]
    if service == "postgres":
        return [_prepare_postgres(config)]
    # Memory only: Debian's build defaults --persistence.file to a path shared by every
    # gateway on the machine, so it is cleared explicitly. Our metrics are recomputed from
    # durable state at each push, never read back from the gateway.
    return [
        [
            "prometheus-pushgateway",
            f"--web.listen-address={HOST}:{config.pushgateway_port}",
            "--persistence.file=",
        ]
    ]


# A cache needs no snapshots: `save ""` and no AOF keep the disk quiet.
_REDIS_NO_PERSISTENCE = ("--save", "", "--appendonly", "no")


def _redis_cluster_node(config: StackConfig, node: Process) -> list[str]:
    """One Redis Cluster node, with its data and nodes.conf in a folder of its own.

    nodes.conf is the node's view of the cluster, so a node started again rejoins as what it was.
    """
    data_dir = config.state_dir / "redis-cluster" / str(node.port)
    data_dir.mkdir(parents=True, exist_ok=True)
    return [
        "redis-server", "--port", str(node.port), "--bind", HOST, "--dir", str(data_dir),
        "--daemonize", "no", *_REDIS_NO_PERSISTENCE,
        "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
        # A primary silent for 2 s is failed over: a `kill -9` costs seconds, not the 15 s default.
        "--cluster-node-timeout", "2000",
        # A replica's first sync starts at once, not after the 5 s a primary waits for others.
        "--repl-diskless-sync-delay", "0",
    ]  # fmt: skip


def _launch(
    config: StackConfig, process: Process, command: list[str], log: Callable[[str], None]
) -> int:
    """Starts `command` detached, its output in the process's log; writes and returns its pid."""
    log_path = config.log_path(process.name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if log_path.exists():
        # Keep the previous run's log one step back: it holds the story of the last shutdown.
        log_path.replace(log_path.with_suffix(".log.1"))
    postgres = process.service == "postgres"
    with log_path.open("wb") as out:
        # A new session detaches the service from the terminal, so it outlives the command line.
        # PostgreSQL will not run as root: it runs as the `postgres` user, in its own folder.
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=config.postgres_data if postgres else config.state_dir,
            start_new_session=True,
            user="postgres" if postgres and os.geteuid() == 0 else None,
        )
    pid = child.pid
    config.pid_path(process.name).parent.mkdir(parents=True, exist_ok=True)
    config.pid_path(process.name).write_text(f"{pid}\n")
    # Popen warns when dropped while its child runs; this child is meant to outlive us.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        del child
    log(f"started {process.name} (pid {pid}), log in {log_path}")
    return pid


def _stop(config: StackConfig, service: str, log: Callable[[str], None]) -> None:
    processes = config.processes(service)
    running: dict[Process, int] = {}
    not_ours = []
    for process in processes:
        pid_path = config.pid_path(process.name)
        pid = _started_pid(config, process)
        if pid is not None:
            running[process] = pid
        elif pid_path.exists():
            log(f"{process.name}: the process in {pid_path} is gone; removing the stale pid file")
            pid_path.unlink()
        else:
            not_ours.append(process.name)
    if len(not_ours) == len(processes):
        log(f"{service}: not started by nova-assets; leaving it alone")
    else:
        for name in not_ours:
            log(f"{name}: not started by nova-assets; leaving it alone")
    for process, pid in running.items():
        log(f"stopping {process.name} (pid {pid})")
    grace_s = _STOP_GRACE_S[service]
    killed = _terminate(list(running.values()), grace_s)
    for process, pid in running.items():
        if pid in killed:
            log(f"{process.name} (pid {pid}) ignored SIGTERM for {grace_s:.0f} s; killed it")
        config.pid_path(process.name).unlink(missing_ok=True)


def _postgres_bin(program: str) -> str:
    # Debian installs the server outside PATH, under its major version.
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{program}"))
    if not found:
        raise StackError(
            f"{program} not found under /usr/lib/postgresql; apt-get install postgresql"
        )
    return str(found[-1])


def _prepare_postgres(config: StackConfig) -> list[str]:
    """A cluster of our own (trust auth on 127.0.0.1 only), created once, run as `postgres`.

    PostgreSQL refuses to run as root, so the data directory belongs to the `postgres` user and
    the server starts under it.
    """
    data = config.postgres_data
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True)
        shutil.chown(data, user="postgres", group="postgres")
        subprocess.run(
            [_postgres_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"],
            user="postgres",
            check=True,
            capture_output=True,
        )
    return [
        _postgres_bin("postgres"),
        "-D", str(data),
        "-p", str(config.postgres_port),
        "-c", f"listen_addresses={HOST}",
        "-c", f"unix_socket_directories={data}",
    ]  # fmt: skip


def _prepare_prometheus(config: StackConfig) -> list[str]:
    """A Prometheus scraping the local Pushgateway and evaluating the project's alert rules."""
    prometheus_dir = config.state_dir / "prometheus"
    prometheus_dir.mkdir(parents=True, exist_ok=True)
    rules = [str(config.prometheus_rules)] if config.prometheus_rules else []
    settings = prometheus_dir / "prometheus.yml"
    settings.write_text(
        "global: {scrape_interval: 15s, evaluation_interval: 15s}\n"
        f"rule_files: {rules}\n"
        "scrape_configs:\n"
        "  - job_name: pushgateway\n"
        "    honor_labels: true\n"
        f"    static_configs: [{{targets: ['{HOST}:{config.pushgateway_port}']}}]\n"
    )
    return [
        "prometheus",
        f"--config.file={settings}",
        f"--storage.tsdb.path={prometheus_dir / 'data'}",
        f"--web.listen-address={HOST}:{config.prometheus_port}",
    ]


def _kafka_home(config: StackConfig, process: Process) -> Path:
    """A Kafka node's folder: its configuration and, under data/, its logs and metadata."""
    if process.service == "kafka":
        return config.kafka_dir
    return config.state_dir / "kafka-cluster" / str(process.node_id)


def _kafka_cluster_id(config: StackConfig, service: str) -> str:
    """The id every node of one Kafka cluster formats its storage with, drawn once."""
    folder = config.kafka_dir if service == "kafka" else config.state_dir / "kafka-cluster"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cluster-id"
    if not path.exists():
        path.write_text(_new_cluster_id())
    return path.read_text()


def _prepare_kafka(config: StackConfig, node: Process, jars: Path, cluster_id: str) -> list[str]:
    """Writes a node's configuration, formats its storage once, and returns the server command."""
    home = _kafka_home(config, node)
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
        output = "\n".join((result.stdout + result.stderr).splitlines()[-_LOG_TAIL_LINES:])
        raise StackError(
            f"formatting Kafka's storage in {home / 'data'} failed "
            f"(exit code {result.returncode}):\n{output}\n"
            f"If the folder holds another cluster's data, remove {home} and run "
            "`nova-assets services up` again."
        )
    return [*java, "kafka.Kafka", str(properties)]


def _new_cluster_id() -> str:
    # What `StorageTool random-uuid` prints, without starting a JVM: 16 random bytes as
    # unpadded URL-safe base64. A leading '-' would be read as an option, so draw again.
    while True:
        cluster_id = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


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
        "log.dirs": str(_kafka_home(config, node) / "data"),
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


def _wait_until_answering(config: StackConfig, process: Process, pid: int, deadline: float) -> None:
    timeout = _READY_TIMEOUT_S[process.service]
    while time.monotonic() < deadline:
        if not _running(pid):
            config.pid_path(process.name).unlink(missing_ok=True)
            raise StackError(
                f"{process.name} (pid {pid}) exited before answering on {process.address}.\n"
                f"{_tail(config.log_path(process.name))}\n"
                f"If port {process.port} is taken by another program, stop it or choose another "
                "port; then run `nova-assets services up` again."
            )
        if _answering(config, process):
            return
        time.sleep(0.2)
    raise StackError(
        f"{process.name} (pid {pid}) did not answer on {process.address} within {timeout:.0f} s.\n"
        f"{_tail(config.log_path(process.name))}\n"
        "Run `nova-assets services down`, fix the cause shown above, "
        "then `nova-assets services up`."
    )


def _terminate(pids: Sequence[int], grace_s: float) -> set[int]:
    """Sends SIGTERM to every pid, then SIGKILL to those still running `grace_s` later.

    Returns:
        The pids that needed SIGKILL.
    """
    remaining = list(pids)
    killed: set[int] = set()
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if sig == signal.SIGKILL:
            killed = set(remaining)
        for pid in remaining:
            try:
                os.kill(pid, sig)
                # A stopped process (tests SIGSTOP Kafka) acts on SIGTERM only once continued.
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        remaining = [pid for pid in remaining if _running(pid)]
        while remaining and time.monotonic() < deadline:
            time.sleep(0.1)
            remaining = [pid for pid in remaining if _running(pid)]
        if not remaining:
            break
    return killed


def _running(pid: int) -> bool:
    """True while `pid` runs; a process that exited but was not yet reaped counts as gone."""
    try:
        # Reap it if it is our own child (as in tests), so it does not linger as a zombie.
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the parenthesised command name, which may itself hold spaces.
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
    except OSError:
        return f"(no log at {path})"
    return f"--- last {len(lines)} lines of {path} ---\n" + "\n".join(lines)
