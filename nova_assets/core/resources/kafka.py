"""Kafka for the dead-letter queue: an idempotent producer and a streaming, offset-driven reader.

Readers of the DLQ never hold the topic: `reader()` yields one record at a time, librdkafka's
prefetch is capped (`READ_QUEUE_KB`, `READ_FETCH_BYTES`), and every wait (metadata, watermarks,
each poll) takes what is left of the caller's `Budget`, so a reader stops on time whatever the
topic holds (docs/design.md §10).
"""

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import dagster as dg
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from pydantic import Field

from nova_assets.core.budget import Budget
from nova_assets.core.resources.base import (
    KAFKA_DELIVERY_TIMEOUT_S,
    KAFKA_METADATA_TIMEOUT_S,
    ClientResource,
)
from nova_assets.core.settings import kafka_setting_name

# librdkafka's "end of partition" event; confluent-kafka names it with a leading underscore.
_PARTITION_EOF = getattr(KafkaError, "_PARTITION_EOF")

_KAFKA_LOGGER = logging.getLogger("nova_assets.kafka")

READ_QUEUE_KB = 8 * 1024
"""Kilobytes of messages librdkafka prefetches for a reader (its default, 64 MiB, is a window
of its own)."""
READ_FETCH_BYTES = 8 * 1024 * 1024
"""The most one fetch from the broker returns (librdkafka's default is 50 MB). A larger message
still arrives, alone."""
POLL_S = 0.5
"""The longest single wait for the next message; shorter when the budget has less left."""


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


class TopicReader:
    """One consumer on the topic, reading ranges of offsets within a budget.

    It reads through `assign`, so nothing is committed and no consumer group is joined.
    """

    def __init__(self, consumer: Consumer, topic: str, budget: Budget) -> None:
        self._consumer = consumer
        self.topic = topic
        self.budget = budget
        self.done = False
        """Whether the last `records` iteration reached the end of every range."""

    def _wait(self) -> float:
        return self.budget.left(KAFKA_METADATA_TIMEOUT_S)

    def partitions(self) -> list[int]:
        metadata = self._consumer.list_topics(self.topic, timeout=self._wait())
        topic = metadata.topics.get(self.topic)
        if topic is None or topic.error is not None:
            raise KafkaException(
                topic.error if topic else KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
            )
        return sorted(topic.partitions)

    def bounds(self) -> dict[int, tuple[int, int]]:
        """Each partition's (low, high) watermark offsets: its oldest kept and next offset."""
        return {
            partition: self._consumer.get_watermark_offsets(
                TopicPartition(self.topic, partition), timeout=self._wait()
            )
            for partition in self.partitions()
        }

    def records(self, ranges: Mapping[int, tuple[int, int]]) -> Iterator[KafkaRecord]:
        """The records of each partition's [start, end) range, one at a time, as they arrive.

        Offsets rise within a partition; partitions interleave. The iteration ends when every
        range is read or the budget is spent (then `done` stays false): a caller that stops
        early, or is stopped, has handled exactly the records it took.
        """
        ends = {p: end for p, (start, end) in ranges.items() if start < end}
        starts = {p: ranges[p][0] for p in ends}
        self.done = not ends
        if not ends:
            return
        self._consumer.assign([TopicPartition(self.topic, p, starts[p]) for p in sorted(ends)])
        while ends:
            wait = self.budget.left(POLL_S)
            if wait <= 0:
                return
            message = self._consumer.poll(wait)
            if message is None:
                continue
            error = message.error()
            partition = message.partition()
            if error is not None:
                if error.code() == _PARTITION_EOF:
                    ends.pop(partition, None)
                    self.done = not ends
                    continue
                raise KafkaException(error)
            offset = message.offset()
            if partition not in ends or offset < starts[partition]:
                continue  # prefetched for an earlier assignment
            if offset >= ends[partition]:
                ends.pop(partition)  # past the range: compacted or transactional gaps
                self.done = not ends
                continue
            if offset + 1 >= ends[partition]:
                ends.pop(partition)
                self.done = not ends
            key = message.key()
            yield KafkaRecord(
                partition=partition,
                offset=offset,
                key=key.decode(errors="backslashreplace") if key is not None else None,
                value=message.value() or b"",
                timestamp_ms=message.timestamp()[1],
            )


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

    def publish(self, key: str, value: bytes, timeout_s: float | None = None) -> "Delivery":
        """Send one message and wait for its delivery report.

        It waits at most `delivery_timeout_s`, or `timeout_s` when that is less (what the caller's
        budget has left). A message with no report by then is withdrawn from the producer, so
        closing it does not wait either; the broker may still have stored it, which the caller
        treats as not delivered and sends again later (at least once).

        Returns:
            The outcome, true once the broker acknowledged the message (acks=all); otherwise it
            says why, and whether sending the same message again can ever succeed.
        """
        outcome: list[KafkaError | None] = []
        producer = self._get_producer()
        wait = self.delivery_timeout_s + 1.0
        if timeout_s is not None:
            wait = min(wait, max(timeout_s, 0.0))
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
        deadline = time.monotonic() + wait
        while not outcome and (left := deadline - time.monotonic()) > 0:
            producer.poll(min(0.1, left))
        if not outcome:
            producer.poll(0)
        if not outcome:
            producer.purge(in_queue=True, in_flight=True, blocking=False)
            producer.poll(0)
            return Delivery(error=f"no delivery report within {wait:.1f} s")
        return Delivery() if outcome[0] is None else Delivery.of(outcome[0])

    def _consumer(self) -> Consumer:
        return Consumer(
            {
                **self.client_config(),
                "group.id": "nova-assets-reader",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "queued.max.messages.kbytes": READ_QUEUE_KB,
                "fetch.max.bytes": READ_FETCH_BYTES,
            }
        )

    @contextmanager
    def reader(self, budget: Budget | None = None) -> Iterator[TopicReader]:
        """A `TopicReader` whose every wait ends by `budget` (default: the metadata timeout)."""
        consumer = self._consumer()
        try:
            yield TopicReader(consumer, self.topic, budget or Budget(KAFKA_METADATA_TIMEOUT_S))
        finally:
            consumer.close()

    def bounds(self, timeout_s: float = KAFKA_METADATA_TIMEOUT_S) -> dict[int, tuple[int, int]]:
        """Each partition's (low, high) watermark offsets: its oldest kept and next offset."""
        with self.reader(Budget(timeout_s)) as reader:
            return reader.bounds()

    def read(
        self,
        start_offsets: Mapping[int, int] | None = None,
        *,
        max_messages: int | None = None,
        timeout_s: float = KAFKA_METADATA_TIMEOUT_S,
    ) -> list[KafkaRecord]:
        """The topic from `start_offsets` (partition → offset; default: its start) to its end.

        A list, for a few messages (a check of what was published); the DLQ's readers stream
        through `reader()` instead. Returns the records in (partition, offset) order.
        """
        starts = dict(start_offsets or {})
        records: list[KafkaRecord] = []
        with self.reader(Budget(timeout_s)) as reader:
            ranges = {
                p: (max(starts.get(p, low), low), high)
                for p, (low, high) in reader.bounds().items()
            }
            for record in reader.records(ranges):
                if max_messages is not None and len(records) >= max_messages:
                    break
                records.append(record)
        records.sort(key=lambda r: (r.partition, r.offset))
        return records
