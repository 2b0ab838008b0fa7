"""The DLQ's two sensors: `dlq_publisher` sends failed runs to Kafka, `dlq_replay` runs them again.

Dagster's `run_failure_sensor` moves its cursor even when its evaluation raises, so publishing from
it would lose the message whenever Kafka is down. `dlq_publisher` instead walks the instance's
failed runs itself and marks a run only once the broker acknowledged its message: the tag
`nova/dlq_delivered` on the run is the durable record (the metrics count it), and the cursor
only moves past runs that carry it. A run that could not be delivered is tried again at the next
evaluation, so Kafka being down delays messages and loses none.
"""

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg

from nova_assets.core.jobs import JOB_TAG, JobSpec, job_specs, jobs_of_run
from nova_assets.core.resources import AlertWebhookResource, Delivery, KafkaDLQResource
from nova_assets.core.settings import load_settings
from nova_assets.defs.dlq.reading import parse_message
from nova_assets.defs.dlq.writing import (
    DELIVERED_TAG,
    DELIVERED_VALUE,
    REPLAY_TAG,
    UNDELIVERABLE_TAG,
    build_message,
    encode,
)
from nova_assets.defs.schedules import cache_jobs

PUBLISH_BUDGET_S = 30.0
"""Time one evaluation may spend publishing, well inside the sensor evaluation timeout (60 s)."""

LOOKBACK = timedelta(minutes=10)
"""How far behind its watermark the publisher looks again. A run's update time is its failure
event's own time, taken by the process that failed: a host whose clock runs behind, or a failure
stored late, stamps a run earlier than one already handled."""

RUNS_PER_PAGE = 100
"""Failed runs the publisher reads per page; DLQ messages the replay reads per evaluation."""


# -- the publisher ----------------------------------------------------------------------------


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


LOOKBACK_S = LOOKBACK.total_seconds()


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
) -> tuple[PublisherCursor, int, int]:
    """Publish this code location's failed runs not yet delivered, oldest failure first.

    Every evaluation looks again at the failed runs updated since `watermark - LOOKBACK`, page by
    page, and skips those tagged delivered (or undeliverable): a run stamped earlier than one
    already handled (a failure stored late, or by a host whose clock runs behind) is still found,
    and any number of delivered runs in that span never stalls the walk. Runs of other code
    locations sharing the instance are passed over.

    Returns:
        The new cursor, how many messages were delivered, and how many runs of the page at hand
        still wait (more may follow it).
    """
    since = cursor.since
    deadline = time.monotonic() + PUBLISH_BUDGET_S
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
            if time.monotonic() >= deadline:
                return cursor, delivered, len(records) - position
            message = build_message(instance, record, specs)
            delivery = _deliver(kafka_dlq, message)
            if delivery.permanent:
                reason = f"{delivery.error}"[:200]
                instance.add_run_tags(run.run_id, {UNDELIVERABLE_TAG: reason})
                log.error(
                    f"The DLQ message of run {run.run_id} ({message['job_name']}) can never be "
                    f"delivered to {kafka_dlq.topic}: {reason}. The run is tagged "
                    f"{UNDELIVERABLE_TAG} and counted in job_dlq_pending; replay it with "
                    f"`nova-assets dlq replay {run.run_id}` once its fault is fixed."
                )
                alerts.notify_failure(message)
                cursor = cursor.handled(record)
                continue
            if not delivery:
                log.warning(
                    f"Kafka did not acknowledge the DLQ message of run {run.run_id} "
                    f"({message['job_name']}): {delivery.error}. It stays pending and is sent "
                    "again at the next evaluation."
                )
                return cursor, delivered, len(records) - position
            instance.add_run_tags(run.run_id, {DELIVERED_TAG: DELIVERED_VALUE})
            alerts.notify_failure(message)
            delivered += 1
            cursor = cursor.handled(record)
        if len(records) < RUNS_PER_PAGE:
            return cursor, delivered, 0
        # The next page starts just before the last run of this one (`updated_after` is strict),
        # so runs sharing its instant are not skipped; those read twice are in `seen`. A page of
        # nothing new (a hundred runs of one microsecond) moves past that instant.
        last = records[-1].update_timestamp
        since = last - timedelta(microseconds=1) if new_runs else last


def _deliver(kafka_dlq: KafkaDLQResource, message: dict[str, Any]) -> Delivery:
    """Publish `message`; one the broker refuses as such is sent once more, cut to a quarter."""
    raw = encode(message)
    delivery = kafka_dlq.publish(message["job_name"], raw)
    if not delivery.permanent:
        return delivery
    try:
        cut = encode(message, limit=len(raw) // 4)
    except ValueError:  # even without stack and message it is larger than that
        return delivery
    again = kafka_dlq.publish(message["job_name"], cut)
    if again.permanent:
        return Delivery(f"{delivery.error}; cut to {len(cut)} bytes: {again.error}", True)
    return again


def build_dlq_publisher(specs: Sequence[JobSpec]) -> dg.SensorDefinition:
    """`dlq_publisher`: every finally failed run to the dead-letter topic, at least once."""

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
        )
        context.update_cursor(cursor.serialize())
        if pending:
            return dg.SkipReason(
                f"Delivered {delivered} DLQ message(s); {pending} failed run(s) wait."
            )
        return dg.SkipReason(f"Delivered {delivered} DLQ message(s); nothing pending.")

    return dlq_publisher


# -- replay -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replay:
    """One run that replays (part of) a failed run: a job, its asset, the failed run's config."""

    job_name: str
    asset_keys: tuple[str, ...]
    run_config: dict[str, Any]
    replay_of: str

    @property
    def run_key(self) -> str:
        """One replay per failed run and job, however often its message was delivered."""
        return f"replay:{self.replay_of}:{self.job_name}"

    @property
    def tags(self) -> dict[str, str]:
        return {REPLAY_TAG: self.replay_of}


def plan_replays(
    instance: dg.DagsterInstance,
    specs: Sequence[JobSpec],
    run_id: str,
    asset_keys: Sequence[str],
    job_name: str | None = None,
) -> list[Replay]:
    """The runs that replay `asset_keys` of failed run `run_id`: one per job owning some of them.

    Each gets the failed run's run config (so a run that failed as of an instant is replayed as of
    it), limited to the job's own op; a failed run no longer in the instance replays with the
    job's defaults. No asset keys: the whole of `job_name`, when it is one of ours.
    """
    failed = instance.get_run_by_id(run_id)
    run_config = dict(failed.run_config) if failed is not None else {}
    replays = []
    for spec in specs:
        wanted = spec.asset in asset_keys or (not asset_keys and spec.name == job_name)
        if wanted:
            replays.append(
                Replay(spec.name, (spec.asset,), _config_for(run_config, spec.step), run_id)
            )
    return replays


def _config_for(run_config: Mapping[str, Any], step: str) -> dict[str, Any]:
    """The run config with only `step`'s entry under `ops` (another op would fail validation)."""
    config = dict(run_config)
    ops = config.pop("ops", None)
    if isinstance(ops, Mapping) and step in ops:
        config["ops"] = {step: ops[step]}
    return config


def build_dlq_replay_sensor(jobs: Sequence[Any], specs: Sequence[JobSpec]) -> dg.SensorDefinition:
    """`dlq_replay`: replays each failed run once, by its asset keys, with its run config.

    Args:
        jobs: The jobs it may launch.
        specs: Those jobs' specs: which asset (and op) each owns.
    """
    asset_jobs = {spec.asset: spec.name for spec in specs}

    @dg.sensor(
        name="dlq_replay",
        description="Replays the dead-letter queue: each failed run once, by its assets, with "
        "its run config; failed replays are left to an operator (`nova-assets dlq replay`). "
        "Stopped by default; turn it on to drain the queue.",
        minimum_interval_seconds=15,
        default_status=dg.DefaultSensorStatus.STOPPED,
        jobs=list(jobs),
    )
    def dlq_replay(context: dg.SensorEvaluationContext, kafka_dlq: KafkaDLQResource):
        offsets = {int(p): o for p, o in json.loads(context.cursor or "{}").items()}
        for partition, (low, high) in kafka_dlq.bounds().items():
            if offsets.get(partition, low) > high:
                context.log.warning(
                    f"The stored offset {offsets[partition]} of {kafka_dlq.topic}:{partition} is "
                    f"past the partition's end ({high}): the topic was recreated or moved. "
                    f"Reading it again from {low}; run keys keep replays from repeating."
                )
                offsets[partition] = low
        records = kafka_dlq.read(offsets, max_messages=RUNS_PER_PAGE)
        requests: dict[str, dg.RunRequest] = {}
        for record in records:
            offsets[record.partition] = record.offset + 1
            parsed = parse_message(record.value, asset_jobs)
            where = f"{kafka_dlq.topic}:{record.partition}:{record.offset}"
            if isinstance(parsed, str):
                context.log.warning(f"Skipping DLQ message {where}: {parsed}.")
                continue
            if parsed.replay_of is not None:
                context.log.info(
                    f"Not replaying DLQ message {where}: run {parsed.run_id} was itself a replay "
                    f"of {parsed.replay_of}. Replay it with `nova-assets dlq replay "
                    f"{parsed.run_id}` once its fault is fixed."
                )
                continue
            try:
                replays = plan_replays(
                    context.instance, specs, parsed.run_id, parsed.asset_keys, parsed.job_name
                )
            except Exception as exc:  # the instance refused what the message names
                context.log.warning(f"Skipping DLQ message {where}: {type(exc).__name__}: {exc}")
                continue
            for replay in replays:
                requests[replay.run_key] = dg.RunRequest(
                    run_key=replay.run_key,
                    job_name=replay.job_name,
                    asset_selection=[dg.AssetKey.from_user_string(k) for k in replay.asset_keys],
                    run_config=replay.run_config,
                    tags=replay.tags,
                )
        context.update_cursor(json.dumps({str(p): o for p, o in offsets.items()}))
        if not requests:
            return dg.SkipReason(f"No DLQ message to replay ({len(records)} read).")
        return list(requests.values())

    return dlq_replay


@dg.definitions
def defs() -> dg.Definitions:
    specs = job_specs(load_settings())
    return dg.Definitions(
        sensors=[build_dlq_publisher(specs), build_dlq_replay_sensor(cache_jobs(), specs)]
    )
