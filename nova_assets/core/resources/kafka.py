"""Kafka for the dead-letter queue: an idempotent producer and an offset-driven reader."""

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from pydantic import Field

from nova_assets.core.resources.base import (
    KAFKA_DELIVERY_TIMEOUT_S,
    KAFKA_METADATA_TIMEOUT_S,
    ClientResource,
)
from nova_assets.core.settings import kafka_setting_name

# librdkafka's "end of partition" event; confluent-kafka names it with a leading underscore.
_PARTITION_EOF = getattr(KafkaError, "_PARTITION_EOF")

_KAFKA_LOGGER = logging.getLogger("nova_assets.kafka")


@dataclass(frozen=True)
class KafkaRecord:
    """One message read back from a topic."""

    partition: int
    offset: int
    key: str | None
    value: bytes
    timestamp_ms: int


PERMANENT_DELIVERY_ERRORS = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,  # over the topic's max.message.bytes
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.UNKNOWN_TOPIC_OR_PART,  # no such topic, and the broker does not create it
        getattr(KafkaError, "_UNKNOWN_TOPIC"),  # the same, as librdkafka names it
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    }
)
"""Delivery errors that sending the same message again cannot fix."""


@dataclass(frozen=True)
class Delivery:
    """The outcome of one publish: true when acknowledged, else why not."""

    error: str | None = None
    permanent: bool = False
    """True when the broker refused this very message: resending it cannot succeed."""

    def __bool__(self) -> bool:
        return self.error is None

    @classmethod
    def of(cls, error: KafkaError | None) -> "Delivery":
        if not isinstance(error, KafkaError):
            return cls(error=f"unknown producer error {error!r}")
        return cls(error=error.str(), permanent=error.code() in PERMANENT_DELIVERY_ERRORS)


class KafkaDLQResource(ClientResource):
    """Kafka for the dead-letter queue: an idempotent producer and an offset-driven reader."""

    brokers: str = Field(description="Comma-separated host:port list (KAFKA_BROKERS).")
    topic: str = Field(default="jobs-dlq", description="The dead-letter topic (DLQ_TOPIC).")
    passthrough_env: list[str] = Field(
        default_factory=list,
        description="KAFKA_* variables handed to librdkafka as is (KAFKA_SASL_USERNAME → "
        "sasl.username); only their names are stored here, their values are read at run time.",
    )
    delivery_timeout_s: float = Field(
        default=KAFKA_DELIVERY_TIMEOUT_S,
        description="How long publish() waits for the broker's delivery report.",
    )

    def _release(self, client: Producer) -> None:
        # A producer has nothing to close: flushing delivers what is still queued.
        client.flush(self.delivery_timeout_s)

    def client_config(self) -> dict[str, Any]:
        """Librdkafka settings shared by producer and consumer, pass-through included."""
        config: dict[str, Any] = {
            "bootstrap.servers": self.brokers,
            "socket.timeout.ms": int(KAFKA_METADATA_TIMEOUT_S * 1000),
            # librdkafka's own log lines go through Python logging instead of raw stderr.
            "logger": _KAFKA_LOGGER,
        }
        for name in self.passthrough_env:
            config[kafka_setting_name(name)] = dg.EnvVar(name).get_value()
        return config

    def _get_producer(self) -> Producer:
        if self._client is None:
            self._client = Producer(
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
        return self._client

    def publish(self, key: str, value: bytes) -> "Delivery":
        """Send one message and wait (at most `delivery_timeout_s`) for its delivery report.

        Returns:
            The outcome, true once the broker acknowledged the message (acks=all); otherwise it
            says why, and whether sending the same message again can ever succeed.
        """
        outcome: list[KafkaError | None] = []
        producer = self._get_producer()
        try:
            producer.produce(
                self.topic,
                key=key.encode(errors="backslashreplace"),
                value=value,
                on_delivery=lambda e, _m: outcome.append(e),
            )
        except KafkaException as exc:
            return Delivery.of(exc.args[0] if exc.args else None)
        except BufferError as exc:
            return Delivery(error=f"the producer's queue is full ({exc})")
        deadline = time.monotonic() + self.delivery_timeout_s + 1.0
        while not outcome and time.monotonic() < deadline:
            producer.poll(0.1)
        if not outcome:
            return Delivery(error="no delivery report in time")
        return Delivery() if outcome[0] is None else Delivery.of(outcome[0])

    def bounds(self, timeout_s: float = KAFKA_METADATA_TIMEOUT_S) -> dict[int, tuple[int, int]]:
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
        timeout_s: float = KAFKA_METADATA_TIMEOUT_S,
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
                    key=key.decode(errors="backslashreplace") if key is not None else None,
                    value=message.value() or b"",
                    timestamp_ms=message.timestamp()[1],
                )
            )
            if message.offset() + 1 >= ends.get(message.partition(), 0):
                ends.pop(message.partition(), None)
        records.sort(key=lambda r: (r.partition, r.offset))
        return records[:max_messages] if max_messages is not None else records
