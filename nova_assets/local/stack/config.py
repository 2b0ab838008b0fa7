"""The stack's vocabulary: its services and clusters, their ports and folders, and its error.

`StackConfig` says where everything of one stack lives: the port of each service, and under
`state_dir` each process's pid file, log and data. `Process` is one process of the stack: a
service of its own, or one node of a cluster.
"""

from dataclasses import dataclass
from pathlib import Path

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


class StackError(RuntimeError):
    """A service of the local stack could not be installed, started or reached."""


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
    prometheus_interval: str = "15s"
    """How often the stack's Prometheus scrapes the Pushgateway and evaluates its rules (a
    Prometheus duration): 15s, as ops/prometheus/prometheus.yml; a test shortens it to wait less."""
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

    def kafka_home(self, process: Process) -> Path:
        """A Kafka node's folder: its configuration and, under data/, its logs and metadata."""
        if process.service == "kafka":
            return self.kafka_dir
        return self.state_dir / "kafka-cluster" / str(process.node_id)
