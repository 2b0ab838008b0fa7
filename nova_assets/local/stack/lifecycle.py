"""Bringing the stack up and down as a whole, reporting on it, and restarting one cluster node.

`up` installs what is missing, starts each service not already answering, and returns only once
every service answers for real and every cluster is whole; `down` stops only what `up` started.
The services' own modules say how each one is configured and launched.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nova_assets.local.stack.config import (
    CLUSTERS,
    OPTIONAL_SERVICES,
    SERVICES,
    Process,
    StackConfig,
    StackError,
)
from nova_assets.local.stack.install import BINARIES, install_missing
from nova_assets.local.stack.kafka import ensure_topic, prepare_kafka_nodes
from nova_assets.local.stack.postgres import prepare_postgres
from nova_assets.local.stack.probes import answering
from nova_assets.local.stack.processes import (
    READY_TIMEOUT_S,
    launch,
    registered_pid,
    stop,
    wait_for,
    wait_until_answering,
)
from nova_assets.local.stack.prometheus import prepare_prometheus, prepare_pushgateway
from nova_assets.local.stack.redis import (
    SETTLE_TIMEOUT_S,
    form_redis_cluster,
    prepare_redis,
    prepare_redis_cluster_node,
    redis_node_problem,
)


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    """The service's name, or for a cluster the node's (`redis-cluster-7000`)."""
    address: str
    answering: bool
    pid: int | None
    service: str
    """The service the process belongs to: its own name, or the cluster's."""


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
        name: [process for process in processes if not answering(config, process)]
        for name, processes in groups.items()
    }
    install_missing(
        [binary for name, waiting in to_start.items() if waiting for binary in BINARIES[name]],
        config,
        log,
    )
    for name, processes in groups.items():
        for process in processes:
            if process not in to_start[name]:
                log(f"reusing {process.name} already answering on {process.address}")
        began = time.monotonic()
        pids = _start(config, name, to_start[name], log)
        deadline = time.monotonic() + READY_TIMEOUT_S[name]
        for process, pid in pids.items():
            wait_until_answering(config, process, pid, deadline)
            log(
                f"{process.name} answering on {process.address} "
                f"(pid {pid}, {time.monotonic() - began:.1f} s)"
            )
        if name in ("kafka", "kafka-cluster"):
            ensure_topic(config, name, log)
        elif name == "redis-cluster":
            form_redis_cluster(config, log)


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
        stop(config, name, log)


def status(config: StackConfig) -> list[ServiceStatus]:
    """Reports, for every process, whether it answers on its port and whether `up` started it.

    One row per service, and one per node of each cluster.
    """
    return [
        ServiceStatus(
            name=process.name,
            address=process.address,
            answering=answering(config, process),
            pid=registered_pid(config, process),
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
    return registered_pid(config, _process(config, name))


def nodes(config: StackConfig, cluster: str) -> tuple[Process, ...]:
    """The nodes of `cluster` (from `CLUSTERS`) in order: Redis by port, Kafka by node id."""
    if cluster not in CLUSTERS:
        raise StackError(f"{cluster!r} is not a cluster; choose from {list(CLUSTERS)}")
    return config.processes(cluster)


def node_pids(config: StackConfig, cluster: str) -> dict[str, int | None]:
    """Each node of `cluster` by name, with the pid of its process if `up` started it and it runs.

    This is what to `kill -9` to take a node down; `start_node` brings it back.
    """
    return {node.name: registered_pid(config, node) for node in nodes(config, cluster)}


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
    if answering(config, process):
        log(f"reusing {process.name} already answering on {process.address}")
        return registered_pid(config, process)
    install_missing(list(BINARIES[process.service]), config, log)
    [pid] = _start(config, process.service, [process], log).values()
    wait_until_answering(config, process, pid, time.monotonic() + READY_TIMEOUT_S[process.service])
    if process.service == "redis-cluster":
        wait_for(
            lambda: redis_node_problem(process),
            f"{process.name} (pid {pid}) to report cluster_state:ok",
            SETTLE_TIMEOUT_S,
            [process],
            config,
        )
    return pid


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


def _start(
    config: StackConfig, service: str, processes: Sequence[Process], log: Callable[[str], None]
) -> dict[Process, int]:
    """Launches each of `processes` unless an earlier `up` left it running; their pids.

    Nothing is awaited here, so a cluster's nodes boot side by side.
    """
    pids: dict[Process, int] = {}
    fresh = []
    for process in processes:
        pid = registered_pid(config, process)
        if pid is None:
            fresh.append(process)
        else:
            log(f"{process.name} (pid {pid}) started earlier is not answering yet; waiting for it")
            pids[process] = pid
    for process, command in zip(fresh, _commands(config, service, fresh, log), strict=True):
        pids[process] = launch(config, process, command, log)
    return {process: pids[process] for process in processes}


def _commands(
    config: StackConfig, service: str, processes: Sequence[Process], log: Callable[[str], None]
) -> list[list[str]]:
    """The command line of each of `processes`, their configuration and folders prepared."""
    if not processes:
        return []
    if service in ("kafka", "kafka-cluster"):
        return prepare_kafka_nodes(config, service, processes, log)
    if service == "redis":
        return [prepare_redis(config)]
    if service == "redis-cluster":
        return [prepare_redis_cluster_node(config, node) for node in processes]
    if service == "prometheus":
        return [prepare_prometheus(config)]
    if service == "postgres":
        return [prepare_postgres(config)]
    return [prepare_pushgateway(config)]
