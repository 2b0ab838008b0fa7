"""`dlq_publisher`: every failed run of this code location to the dead-letter topic, at least once.

Dagster's `run_failure_sensor` moves its cursor even when its evaluation raises, so publishing from
it would lose the message whenever Kafka is down. `dlq_publisher` instead walks the instance's
failed runs itself and marks a run only once the broker acknowledged all of its messages (one
per job it counts for): the tag `nova/dlq_delivered` on the run is the durable record (the
metrics count it), and the cursor only moves past runs that carry it. A run that could not be
delivered is tried again at the next evaluation, so Kafka being down delays messages and loses
none. Each evaluation works within the sensor budget (docs/design.md §10): a slow broker or a
slow webhook costs what is left of it, never more, and the next tick goes on.
"""

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg

from nova_assets.core.budget import Budget
from nova_assets.core.jobs import JOB_TAG, JobSpec, jobs_of_run
from nova_assets.core.resources import AlertWebhookResource, Delivery, KafkaDLQResource
from nova_assets.defs.dlq.writing import (
    DELIVERED_TAG,
    DELIVERED_VALUE,
    UNDELIVERABLE_TAG,
    build_messages,
    encode,
)

LOOKBACK = timedelta(minutes=10)
"""How far behind its watermark the publisher looks again. A run's update time is its failure
event's own time, taken by the process that failed: a host whose clock runs behind, or a failure
stored late, stamps a run earlier than one already handled."""
LOOKBACK_S = LOOKBACK.total_seconds()

RUNS_PER_PAGE = 100
"""Failed runs the publisher reads per page."""


@dataclass(frozen=True)
class PublisherCursor:
    """Every failed run updated before `watermark - LOOKBACK`, or before `start`, is handled.

    `start` is the time of the publisher's first evaluation: failures older than the publisher
    (the history of an instance it joins) are not its to send.
    """

    watermark: float = 0.0
    start: float = 0.0

    @classmethod
    def starting_at(cls, now: float) -> "PublisherCursor":
        return cls(watermark=now, start=now)

    @classmethod
    def parse(cls, raw: str | None) -> "PublisherCursor":
        if not raw:
            return cls()
        stored = json.loads(raw)
        return cls(float(stored["watermark"]), float(stored.get("start", 0.0)))

    def serialize(self) -> str:
        return json.dumps({"watermark": self.watermark, "start": self.start})

    def handled(self, record: dg.RunRecord) -> "PublisherCursor":
        return replace(self, watermark=max(self.watermark, record.update_timestamp.timestamp()))

    @property
    def since(self) -> datetime:
        return datetime.fromtimestamp(max(self.start, self.watermark - LOOKBACK_S), UTC)


def is_ours(
    instance: dg.DagsterInstance,
    run: dg.DagsterRun,
    specs: Sequence[JobSpec],
    location: str | None = None,
) -> bool:
    """Whether a run belongs to this code location.

    It does when launched from it (checked when both origins are known) and it is one of its
    jobs' runs or a run materializing one of their assets.
    """
    origin = run.remote_job_origin
    if location is not None and origin is not None and origin.location_name != location:
        return False
    return JOB_TAG in run.tags or bool(jobs_of_run(instance, run, specs))


def publish_failed_runs(
    instance: dg.DagsterInstance,
    cursor: PublisherCursor,
    kafka_dlq: KafkaDLQResource,
    alerts: AlertWebhookResource,
    log: Any,
    specs: Sequence[JobSpec] = (),
    location: str | None = None,
    budget: Budget | None = None,
) -> tuple[PublisherCursor, int, int]:
    """Publish this code location's failed runs not yet delivered, oldest failure first.

    Every evaluation looks again at the failed runs updated since `watermark - LOOKBACK`, page by
    page, and skips those tagged delivered (or undeliverable): a run stamped earlier than one
    already handled (a failure stored late, or by a host whose clock runs behind) is still found,
    and any number of delivered runs in that span never stalls the walk. Runs of other code
    locations sharing the instance are passed over. It stops when `budget` (default: the sensor
    budget) is spent; every wait for the broker and the webhook takes what is left of it.

    Returns:
        The new cursor, how many messages were delivered, and how many runs of the page at hand
        still wait (more may follow it).
    """
    budget = budget if budget is not None else Budget.for_sensor()
    since = cursor.since
    delivered = 0
    seen: set[str] = set()
    while True:
        records = instance.get_run_records(
            filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE], updated_after=since),
            order_by="update_timestamp",
            ascending=True,
            limit=RUNS_PER_PAGE,
        )
        new_runs = 0
        for position, record in enumerate(records):
            run = record.dagster_run
            if run.run_id in seen:
                continue
            seen.add(run.run_id)
            new_runs += 1
            handled = DELIVERED_TAG in run.tags or UNDELIVERABLE_TAG in run.tags
            if handled or not is_ours(instance, run, specs, location):
                cursor = cursor.handled(record)
                continue
            if budget.exhausted:
                return cursor, delivered, len(records) - position
            acknowledged, settled = _publish_run(
                instance, record, kafka_dlq, alerts, log, specs, budget
            )
            delivered += acknowledged
            if not settled:
                return cursor, delivered, len(records) - position
            cursor = cursor.handled(record)
        if len(records) < RUNS_PER_PAGE:
            return cursor, delivered, 0
        # The next page starts just before the last run of this one (`updated_after` is strict),
        # so runs sharing its instant are not skipped; those read twice are in `seen`. A page of
        # nothing new (a hundred runs of one microsecond) moves past that instant.
        last = records[-1].update_timestamp
        since = last - timedelta(microseconds=1) if new_runs else last


def _publish_run(
    instance: dg.DagsterInstance,
    record: dg.RunRecord,
    kafka_dlq: KafkaDLQResource,
    alerts: AlertWebhookResource,
    log: Any,
    specs: Sequence[JobSpec],
    budget: Budget,
) -> tuple[int, bool]:
    """Publish one failed run's messages; (messages acknowledged, whether the run is settled).

    A run is settled once every message is acknowledged (tagged delivered) or one is refused for
    good (tagged undeliverable). Otherwise it stays pending and all of its messages are sent
    again at the next evaluation: at least once, and the replay's run key (run and job) keeps a
    message delivered twice from replaying twice.
    """
    run_id = record.dagster_run.run_id
    messages = build_messages(instance, record, specs)
    acknowledged, refused = 0, []
    for message in messages:
        delivery = _deliver(kafka_dlq, message, budget)
        if delivery.permanent:
            refused.append(f"{message['job_name']}: {delivery.error}")
        elif not delivery:
            log.warning(
                f"Kafka did not acknowledge the DLQ message of run {run_id} "
                f"({message['job_name']}): {delivery.error}. It stays pending and is sent "
                "again at the next evaluation."
            )
            return acknowledged, False
        else:
            acknowledged += 1
    if refused:
        reason = "; ".join(refused)[:200]
        instance.add_run_tags(run_id, {UNDELIVERABLE_TAG: reason})
        log.error(
            f"A DLQ message of run {run_id} can never be delivered to {kafka_dlq.topic}: "
            f"{reason}. The run is tagged {UNDELIVERABLE_TAG} and counted in job_dlq_pending; "
            f"replay it with `nova-assets dlq replay {run_id}` once its fault is fixed."
        )
    else:
        instance.add_run_tags(run_id, {DELIVERED_TAG: DELIVERED_VALUE})
    alerts.notify_failure(_alert(messages), timeout_s=budget.left())
    return acknowledged, True


def _alert(messages: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One alert per failed run, naming every job it failed for."""
    if len(messages) == 1:
        return messages[0]
    return messages[0] | {
        "job_name": ", ".join(m["job_name"] for m in messages),
        "asset_keys": [key for m in messages for key in m["asset_keys"]],
    }


def _deliver(kafka_dlq: KafkaDLQResource, message: dict[str, Any], budget: Budget) -> Delivery:
    """Publish `message`; one the broker refuses as such is sent once more, cut to a quarter."""
    raw = encode(message)
    delivery = kafka_dlq.publish(message["job_name"], raw, timeout_s=budget.left())
    if not delivery.permanent:
        return delivery
    try:
        cut = encode(message, limit=len(raw) // 4)
    except ValueError:  # even without stack and message it is larger than that
        return delivery
    again = kafka_dlq.publish(message["job_name"], cut, timeout_s=budget.left())
    if again.permanent:
        return Delivery(f"{delivery.error}; cut to {len(cut)} bytes: {again.error}", True)
    return again


def build_dlq_publisher(
    specs: Sequence[JobSpec], budget: Callable[[], Budget] = Budget.for_sensor
) -> dg.SensorDefinition:
    """`dlq_publisher`: every finally failed run to the dead-letter topic, at least once.

    Args:
        specs: The jobs whose runs (and whose assets' runs) it publishes.
        budget: Makes each evaluation's budget (the sensor budget; a test may shrink it).
    """

    @dg.sensor(
        name="dlq_publisher",
        description="Publishes every finally failed run to the Kafka dead-letter topic, at least "
        "once.",
        minimum_interval_seconds=15,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def dlq_publisher(
        context: dg.SensorEvaluationContext,
        kafka_dlq: KafkaDLQResource,
        alerts: AlertWebhookResource,
    ) -> dg.SkipReason:
        spend = budget()
        if context.cursor:
            cursor = PublisherCursor.parse(context.cursor)
        else:
            cursor = PublisherCursor.starting_at(time.time())
            context.log.info(
                "First evaluation: failed runs from now on are published; older ones are not."
            )
        origin = context.code_location_origin
        cursor, delivered, pending = publish_failed_runs(
            context.instance,
            cursor,
            kafka_dlq,
            alerts,
            context.log,
            specs,
            origin.location_name if origin is not None else None,
            spend,
        )
        context.update_cursor(cursor.serialize())
        took = f"in {spend.spent():.1f} s of a {spend.seconds:g} s budget"
        if pending:
            return dg.SkipReason(
                f"Delivered {delivered} DLQ message(s) {took}; {pending} failed run(s) wait for "
                "the next evaluation."
            )
        return dg.SkipReason(f"Delivered {delivered} DLQ message(s) {took}; nothing pending.")

    return dlq_publisher
