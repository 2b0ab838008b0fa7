"""Readiness probes: whether a process of the stack answers for real, asked once.

Each probe speaks the service's own protocol (a Redis PING, the Pushgateway's and Prometheus's
`/-/ready`, a PostgreSQL login, Kafka metadata listing the broker) with a short timeout and no
retries: the callers poll.
"""

import socket
import urllib.error
import urllib.request

import redis
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from redis.backoff import NoBackoff
from redis.retry import Retry

from nova_assets.local.stack.config import HOST, Process, StackConfig

_PROBE_TIMEOUT_S = 1.0


def answering(config: StackConfig, process: Process) -> bool:
    """Whether `process` answers on its port (or Redis on its socket) in its own protocol."""
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


def redis_probe(**where: str | int) -> redis.Redis:
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
    client = redis_probe(**where)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


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


def kafka_admin(bootstrap: str) -> AdminClient:
    """An admin client for `bootstrap` that stays quiet while the brokers boot."""
    # log_level 0 keeps librdkafka from printing "connection refused" while the broker boots.
    return AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})


def _kafka_brokers(bootstrap: str) -> dict:
    # Metadata lists only brokers that registered with the controller, so a non-empty list
    # means the node is serving, not merely listening.
    try:
        return kafka_admin(bootstrap).list_topics(timeout=2 * _PROBE_TIMEOUT_S).brokers
    except KafkaException:
        return {}
