"""Resources: the only code that builds clients for ClickHouse, Redis, Kafka and the Pushgateway.

Each resource owns its client's lifecycle (created on first use, closed at teardown), sets its
network timeouts in one place and exposes small domain methods, so assets and sensors never touch
a client library directly.
"""

import json
import logging
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import clickhouse_connect
import dagster as dg
import orjson
import pandas as pd
import redis
from clickhouse_connect.driver.client import Client as ClickHouseClient
from clickhouse_connect.driver.exceptions import ProgrammingError
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from dagster_prometheus import PrometheusResource
from pydantic import Field, PrivateAttr
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from nova_assets.contract import DataContractError
from nova_assets.settings import kafka_setting_name, redact_url

CLICKHOUSE_POOL = "clickhouse"
"""Dagster pool of every step that touches ClickHouse (one slot for the embedded engine)."""

# Network timeouts, set once here.
_CLICKHOUSE_CONNECT_TIMEOUT_S = 10
_REDIS_SOCKET_TIMEOUT_S = 5.0
_KAFKA_METADATA_TIMEOUT_S = 10.0

# librdkafka's "end of partition" event; confluent-kafka names it with a leading underscore.
_PARTITION_EOF = getattr(KafkaError, "_PARTITION_EOF")

_KAFKA_LOGGER = logging.getLogger("nova_assets.kafka")

# chdb admits one process per data directory; another process holding it shows up as this error.
_CHDB_BUSY_MARKER = "Unable to open the chdb engine"


def json_dumps(value: Mapping[str, Any]) -> bytes:
    """Serialise a cache value: compact UTF-8 JSON, floats at full precision (never rounded).

    orjson writes the shortest text that reads back as the same float, several times faster than
    the standard library; but it writes NaN and infinity as null, so any null hands the value to
    the strict standard encoder, which refuses them.
    """
    text = orjson.dumps(value)
    if b"null" not in text:
        return text
    try:
        strict = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as exc:  # NaN or infinity: JSON has no such number
        raise DataContractError(f"a cache value cannot be written as JSON: {exc}") from exc
    return strict.encode()


class ClickHouseResource(dg.ConfigurableResource):
    """ClickHouse through clickhouse-connect: the embedded chdb engine or a server over HTTP(S)."""

    url: str = Field(
        description="chdb:///path/to/data for the embedded engine, or http(s)://user:pass@host:8123/"
    )
    query_timeout_s: int = Field(default=120, description="Send/receive timeout of server queries.")
    engine_wait_s: float = Field(
        default=60.0,
        description="How long to wait for another process to release the embedded engine.",
    )

    _client: ClickHouseClient | None = PrivateAttr(default=None)

    @property
    def embedded(self) -> bool:
        return self.url.startswith("chdb:")

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.close()

    def close(self) -> None:
        """Close the client; for the embedded engine this releases the data directory."""
        if self._client is not None:
            client, self._client = self._client, None
            client.close()

    def client(self) -> ClickHouseClient:
        """The resource's client, connected on first use."""
        if self._client is None:
            self._client = self._connect()
        return self._client

    def _connect(self) -> ClickHouseClient:
        if not self.embedded:
            return clickhouse_connect.get_client(
                dsn=self.url,
                connect_timeout=_CLICKHOUSE_CONNECT_TIMEOUT_S,
                send_receive_timeout=self.query_timeout_s,
            )
        deadline = time.monotonic() + self.engine_wait_s
        while True:
            try:
                return clickhouse_connect.get_client(dsn=self.url)
            except ProgrammingError as exc:
                # Another process (a run, the seed command) holds the engine: wait our turn.
                if _CHDB_BUSY_MARKER not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    def query_df(self, sql: str, parameters: Mapping[str, Any] | None = None) -> pd.DataFrame:
        """Run a parameterised query (`{name:Type}` placeholders) and return a DataFrame."""
        return self.client().query_df(sql, parameters=dict(parameters or {}))

    def query_rows(self, sql: str, parameters: Mapping[str, Any] | None = None) -> list[tuple]:
        """Run a parameterised query and return its rows as tuples."""
        return list(self.client().query(sql, parameters=dict(parameters or {})).result_rows)

    def command(self, sql: str, parameters: Mapping[str, Any] | None = None) -> Any:
        """Run a parameterised statement (DDL, INSERT … SELECT) and return its summary."""
        return self.client().command(sql, parameters=dict(parameters or {}))

    def describe(self) -> str:
        """Where the data lives, safe to show (no password)."""
        return redact_url(self.url)


# Replace a cache value atomically, unless the new ranking is empty and the current one is not.
# One script, so a reader never sees the key missing, partial or without its TTL; and resending it
# after a reconnect (redis-py retries a command whose reply was lost) gives the same result.
_REPLACE_SCRIPT = """
if ARGV[3] == '1' then
  local current = redis.call('GET', KEYS[1])
  if current then
    local ok, decoded = pcall(cjson.decode, current)
    if ok and type(decoded) == 'table' and type(decoded['items']) == 'table'
        and #decoded['items'] > 0 then
      return 0
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""


class RedisCacheResource(dg.ConfigurableResource):
    """The Redis that serves Nova's read caches: JSON values, always written with their TTL."""

    url: str = Field(description="redis://[:password@]host:port/db")
    key_prefix: str = Field(default="nova:cache:", description="Prefix of every cache key.")
    retries: int = Field(default=3, description="Retries of a command on connection errors.")
    socket_timeout_s: float = Field(
        default=_REDIS_SOCKET_TIMEOUT_S, description="Connect and read timeout of every command."
    )

    _client: redis.Redis | None = PrivateAttr(default=None)
    _replace: Any = PrivateAttr(default=None)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.close()

    def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            client.close()

    def client(self) -> redis.Redis:
        """The resource's client: timeouts and a jittered exponential retry on connection errors."""
        if self._client is None:
            self._client = redis.Redis.from_url(
                self.url,
                socket_timeout=self.socket_timeout_s,
                socket_connect_timeout=self.socket_timeout_s,
                retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), self.retries),
                retry_on_error=[redis.ConnectionError, redis.TimeoutError],
                health_check_interval=30,
                client_name="nova_assets",
            )
            self._replace = self._client.register_script(_REPLACE_SCRIPT)
        return self._client

    def key(self, *parts: object) -> str:
        """A cache key under the configured prefix, e.g. nova:cache:feed:42 for ("feed", 42)."""
        return self.key_prefix + ":".join(str(p) for p in parts)

    def set_json(self, key: str, value: Mapping[str, Any], ttl_s: int) -> None:
        """Write one JSON value with its TTL in the same command."""
        self.client().set(key, json_dumps(value), ex=_positive(ttl_s))

    def set_many_json(self, entries: Iterable[tuple[str, Mapping[str, Any], int]]) -> int:
        """Write many JSON values, each with its TTL, in one pipeline round trip.

        A value whose `items` list is empty goes through the atomic replace script in the same
        pipeline, so it never replaces a non-empty value (DESIGN.md §4). Every value is absolute,
        so a pipeline resent after a reconnect rewrites the same data.

        Returns:
            How many values were written; the others kept a previous non-empty value.
        """
        client = self.client()
        pipe = client.pipeline(transaction=False)
        count = 0
        for key, value, ttl_s in entries:
            text, ttl = json_dumps(value), _positive(ttl_s)
            if _is_empty_ranking(value):
                self._replace(keys=[key], args=[text, ttl, "1"], client=pipe)
            else:
                pipe.set(key, text, ex=ttl)
            count += 1
        if not count:
            return 0
        # SET answers True; the script 1 when it wrote, 0 when it kept the previous value.
        return sum(1 for reply in pipe.execute() if reply)

    def replace_ranking(self, key: str, value: Mapping[str, Any], ttl_s: int) -> bool:
        """Atomically replace a ranking; an empty `items` list never replaces a non-empty one.

        Returns:
            True if the value was written, False if the previous non-empty value was kept.
        """
        self.client()
        empty = "1" if _is_empty_ranking(value) else "0"
        return bool(self._replace(keys=[key], args=[json_dumps(value), _positive(ttl_s), empty]))

    def get_json(self, key: str) -> dict[str, Any] | None:
        raw = self.client().get(key)
        return None if raw is None else json.loads(raw)

    def ttl(self, key: str) -> int:
        """Seconds left on `key`: -1 without a TTL, -2 when missing (Redis semantics)."""
        return int(self.client().ttl(key))


def _is_empty_ranking(value: Mapping[str, Any]) -> bool:
    return "items" in value and not value["items"]


def _positive(ttl_s: int) -> int:
    if ttl_s <= 0:
        raise ValueError(f"a cache TTL must be positive, got {ttl_s}")
    return int(ttl_s)


@dataclass(frozen=True)
class KafkaRecord:
    """One message read back from a topic."""

    partition: int
    offset: int
    key: str | None
    value: bytes
    timestamp_ms: int


class KafkaDLQResource(dg.ConfigurableResource):
    """Kafka for the dead-letter queue: an idempotent producer and an offset-driven reader."""

    brokers: str = Field(description="Comma-separated host:port list (KAFKA_BROKERS).")
    topic: str = Field(default="jobs-dlq", description="The dead-letter topic (DLQ_TOPIC).")
    passthrough_env: list[str] = Field(
        default_factory=list,
        description="KAFKA_* variables handed to librdkafka as is (KAFKA_SASL_USERNAME → "
        "sasl.username); only their names are stored here, their values are read at run time.",
    )
    delivery_timeout_s: float = Field(
        default=10.0, description="How long publish() waits for the broker's delivery report."
    )

    _producer: Producer | None = PrivateAttr(default=None)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.close()

    def close(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            producer.flush(self.delivery_timeout_s)

    def client_config(self) -> dict[str, Any]:
        """Librdkafka settings shared by producer and consumer, pass-through included."""
        config: dict[str, Any] = {
            "bootstrap.servers": self.brokers,
            "socket.timeout.ms": int(_KAFKA_METADATA_TIMEOUT_S * 1000),
            # librdkafka's own log lines go through Python logging instead of raw stderr.
            "logger": _KAFKA_LOGGER,
        }
        for name in self.passthrough_env:
            config[kafka_setting_name(name)] = dg.EnvVar(name).get_value()
        return config

    def _get_producer(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(
                {
                    **self.client_config(),
                    "enable.idempotence": True,
                    "acks": "all",
                    # librdkafka gives up on the message itself at the bound, so the delivery
                    # report always arrives and publish() never waits longer than that.
                    "message.timeout.ms": int(self.delivery_timeout_s * 1000),
                    "linger.ms": 5,
                }
            )
        return self._producer

    def publish(self, key: str, value: bytes) -> bool:
        """Send one message and wait (at most `delivery_timeout_s`) for its delivery report.

        Returns:
            True once the broker acknowledged it (acks=all), False if it was not delivered in time.
        """
        outcome: list[KafkaError | None] = []
        producer = self._get_producer()
        try:
            producer.produce(
                self.topic,
                key=key.encode(),
                value=value,
                on_delivery=lambda e, _m: outcome.append(e),
            )
        except (KafkaException, BufferError):
            return False
        deadline = time.monotonic() + self.delivery_timeout_s + 1.0
        while not outcome and time.monotonic() < deadline:
            producer.poll(0.1)
        return bool(outcome) and outcome[0] is None

    def bounds(self, timeout_s: float = _KAFKA_METADATA_TIMEOUT_S) -> dict[int, tuple[int, int]]:
        """Each partition's (low, high) watermark offsets: its oldest kept and next offset."""
        consumer = Consumer({**self.client_config(), "group.id": "nova-assets-reader"})
        try:
            return {
                partition: consumer.get_watermark_offsets(
                    TopicPartition(self.topic, partition), timeout=timeout_s
                )
                for partition in sorted(self._partitions(consumer, timeout_s))
            }
        finally:
            consumer.close()

    def _partitions(self, consumer: Consumer, timeout_s: float) -> list[int]:
        metadata = consumer.list_topics(self.topic, timeout=timeout_s)
        topic = metadata.topics.get(self.topic)
        if topic is None or topic.error is not None:
            raise KafkaException(
                topic.error if topic else KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
            )
        return list(topic.partitions)

    def read(
        self,
        start_offsets: Mapping[int, int] | None = None,
        *,
        max_messages: int | None = None,
        timeout_s: float = _KAFKA_METADATA_TIMEOUT_S,
    ) -> list[KafkaRecord]:
        """Read the topic from `start_offsets` (partition → offset; default: its start) to its end.

        Returns the records in (partition, offset) order. Reads through `assign`, so nothing is
        committed and no consumer group is joined.
        """
        consumer = Consumer(
            {
                **self.client_config(),
                "group.id": "nova-assets-reader",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            }
        )
        try:
            return self._read(consumer, dict(start_offsets or {}), max_messages, timeout_s)
        finally:
            consumer.close()

    def _read(
        self,
        consumer: Consumer,
        start_offsets: dict[int, int],
        max_messages: int | None,
        timeout_s: float,
    ) -> list[KafkaRecord]:
        assignment = []
        ends: dict[int, int] = {}
        for partition in sorted(self._partitions(consumer, timeout_s)):
            low, high = consumer.get_watermark_offsets(
                TopicPartition(self.topic, partition), timeout=timeout_s
            )
            start = max(start_offsets.get(partition, low), low)
            if start < high:
                assignment.append(TopicPartition(self.topic, partition, start))
                ends[partition] = high
        records: list[KafkaRecord] = []
        if not assignment:
            return records
        consumer.assign(assignment)
        deadline = time.monotonic() + timeout_s
        while ends and time.monotonic() < deadline:
            if max_messages is not None and len(records) >= max_messages:
                break
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error() is not None:
                if message.error().code() == _PARTITION_EOF:
                    ends.pop(message.partition(), None)
                    continue
                raise KafkaException(message.error())
            key = message.key()
            records.append(
                KafkaRecord(
                    partition=message.partition(),
                    offset=message.offset(),
                    key=key.decode() if key is not None else None,
                    value=message.value() or b"",
                    timestamp_ms=message.timestamp()[1],
                )
            )
            if message.offset() + 1 >= ends.get(message.partition(), 0):
                ends.pop(message.partition(), None)
        records.sort(key=lambda r: (r.partition, r.offset))
        return records[:max_messages] if max_messages is not None else records


class AlertWebhookResource(dg.ConfigurableResource):
    """Posts a Slack-compatible message for each final failure, when a webhook URL is set."""

    url: str | None = Field(default=None, description="ALERT_WEBHOOK_URL; unset sends nothing.")
    ui_url: str = Field(default="http://127.0.0.1:3000", description="Base URL of the Dagster UI.")
    timeout_s: float = Field(default=5.0, description="Seconds before a post gives up.")

    def notify_failure(self, message: Mapping[str, Any]) -> bool:
        """Post one failure; returns whether it was posted. Never raises: alerts are best effort."""
        if not self.url:
            return False
        error = message.get("error") or {}
        run_link = f"{self.ui_url.rstrip('/')}/runs/{message['run_id']}"
        text = (
            f":rotating_light: *{message['job_name']}* failed after "
            f"{message.get('retry_count', 0)} retries — assets {', '.join(message['asset_keys'])}\n"
            f"{error.get('type', 'Error')}: {str(error.get('message', ''))[:500]}\n"
            f"<{run_link}|Open the run>"
        )
        body = json.dumps({"text": text}).encode()
        request = urllib.request.Request(
            self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s):
                return True
        except OSError as exc:
            dg.get_dagster_logger().warning(f"Could not post the failure alert: {exc}")
            return False


class JobMetricsResource(PrometheusResource):
    """dagster-prometheus' resource with a short timeout and pushes that never raise."""

    timeout: int = Field(default=3, description="Seconds before a push to the gateway gives up.")

    def push(self, job: str, grouping_key: Mapping[str, str] | None = None) -> bool:
        """Push the registry; on failure log a warning and return False instead of raising."""
        try:
            self.push_to_gateway(job=job, grouping_key=dict(grouping_key or {}))
        except Exception as exc:  # a metrics outage must never fail a run or a sensor
            dg.get_dagster_logger().warning(
                f"Could not push metrics to the Pushgateway at {redact_url(self.gateway)}: {exc}"
            )
            return False
        return True
