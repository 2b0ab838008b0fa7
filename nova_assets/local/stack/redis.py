"""Redis: the single cache server, and the Redis Cluster of three primaries and three replicas.

Neither persists anything (a cache is recomputed, not restored). Each cluster node keeps its
nodes.conf in a folder of its own, so a node started again rejoins as what it was. The cluster
is created once with `redis-cli --cluster create`, and counts as formed only when it is whole:
every slot served, three primaries and three replicas in sync, and every node agreeing on it.
"""

import subprocess
import time
from collections.abc import Callable

import redis

from nova_assets.local.stack.config import (
    HOST,
    REDIS_CLUSTER_NODES,
    Process,
    StackConfig,
    StackError,
)
from nova_assets.local.stack.probes import redis_probe
from nova_assets.local.stack.processes import LOG_TAIL_LINES, wait_for

SETTLE_TIMEOUT_S = 60.0
"""For a cluster to become whole once its nodes answer: slots served, replicas in sync."""
_REDIS_SLOTS = 16_384
# A cache needs no snapshots: `save ""` and no AOF keep the disk quiet.
_REDIS_NO_PERSISTENCE = ("--save", "", "--appendonly", "no")


def prepare_redis(config: StackConfig) -> list[str]:
    """The single Redis server, on its port or, with `redis_socket`, on a unix socket only."""
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
    return command


def prepare_redis_cluster_node(config: StackConfig, node: Process) -> list[str]:
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


def redis_node_problem(node: Process) -> str | None:
    """What keeps a Redis Cluster node from serving its part, or None when it does."""
    client = redis_probe(port=node.port)
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
        problem = redis_node_problem(node)
        if problem is not None:
            return problem
        client = redis_probe(port=node.port)
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


def form_redis_cluster(config: StackConfig, log: Callable[[str], None]) -> None:
    """Creates the cluster unless its nodes already form one, then waits until it is whole."""
    cluster = config.processes("redis-cluster")
    fresh = True
    for node in cluster:
        client = redis_probe(port=node.port)
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
            timeout=SETTLE_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            output = "\n".join((result.stdout + result.stderr).splitlines()[-LOG_TAIL_LINES:])
            raise StackError(
                f"`{' '.join(command)}` failed (exit code {result.returncode}):\n{output}\n"
                "Run `nova-assets services down`, remove "
                f"{config.state_dir / 'redis-cluster'} and run `nova-assets services up "
                "--with-redis-cluster` again."
            )
        log(f"created the Redis Cluster on {config.address('redis-cluster')}")
    wait_for(
        lambda: _redis_cluster_problem(config),
        "the Redis Cluster to become whole",
        SETTLE_TIMEOUT_S,
        cluster,
        config,
    )
    log(
        f"redis-cluster ok on {config.address('redis-cluster')}: 3 primaries serving all "
        f"{_REDIS_SLOTS} slots, 3 replicas in sync ({time.monotonic() - began:.1f} s)"
    )
