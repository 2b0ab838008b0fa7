"""The local stack: real Redis, Apache Kafka (KRaft) and a Pushgateway on 127.0.0.1.

`up` installs what is missing, starts each service detached so it outlives the command line,
and returns only once every service answers for real. `down` stops only what `up` started.
On request the stack also runs Prometheus, PostgreSQL, a Redis Cluster (three primaries, three
replicas) and a Kafka cluster (three KRaft nodes in one quorum). A service runs as one process,
a cluster as one process per node; every process is started, awaited, recognised by its pid
file and stopped the same way, and a cluster's nodes start and stop together.

The modules, from the ground up:

- `config`: the services, their ports and folders (`StackConfig`), and `StackError`.
- `probes`: whether a process answers for real, in its own protocol.
- `processes`: launching, recognising (pid files), awaiting and stopping processes; free ports.
- `install`: binaries from apt, Kafka's jars from Maven Central.
- `redis`, `kafka`, `prometheus` (with the Pushgateway), `postgres`: each service's command
  line and configuration, and what makes a cluster whole.
- `lifecycle`: `up`, `down`, `status` and restarting one cluster node.
"""

from nova_assets.local.stack.config import (
    CLUSTERS,
    HOST,
    KAFKA_CLUSTER_NODES,
    OPTIONAL_SERVICES,
    REDIS_CLUSTER_BUS_OFFSET,
    REDIS_CLUSTER_NODES,
    SERVICES,
    Process,
    StackConfig,
    StackError,
)
from nova_assets.local.stack.lifecycle import (
    ServiceStatus,
    down,
    node_pids,
    nodes,
    start_node,
    started_pid,
    status,
    up,
)
from nova_assets.local.stack.processes import free_port_range

__all__ = [
    "CLUSTERS",
    "HOST",
    "KAFKA_CLUSTER_NODES",
    "OPTIONAL_SERVICES",
    "REDIS_CLUSTER_BUS_OFFSET",
    "REDIS_CLUSTER_NODES",
    "SERVICES",
    "Process",
    "ServiceStatus",
    "StackConfig",
    "StackError",
    "down",
    "free_port_range",
    "node_pids",
    "nodes",
    "start_node",
    "started_pid",
    "status",
    "up",
]
