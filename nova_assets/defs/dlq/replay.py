"""`dlq_replay`: each failed run on the dead-letter topic run again once, by its asset keys.

The topic is read as a stream, one message at a time, within the sensor budget (docs/design.md
§10): an evaluation stops when the budget is spent or when it has read `REPLAY_MAX_MESSAGES` or
`REPLAY_MAX_BYTES`, returns the run requests it gathered, and its cursor points just past the
last message it handled, so the next tick goes on from there and nothing handled is read again.
A backlog of the largest messages the topic accepts therefore drains over a few ticks instead of
outlasting Dagster's sensor timeout on every one.
"""

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from nova_assets.core.budget import Budget
from nova_assets.core.jobs import JobSpec
from nova_assets.core.resources import KafkaDLQResource, KafkaRecord
from nova_assets.defs.dlq.reading import parse_message
from nova_assets.defs.dlq.writing import REPLAY_TAG

REPLAY_MAX_MESSAGES = 1_000
"""Messages one evaluation reads at most."""
REPLAY_MAX_BYTES = 64 * 1024 * 1024
"""Bytes of messages one evaluation reads at most."""
REPLAY_MAX_REQUESTS = 100
"""Run requests one evaluation returns at most (the daemon launches each one)."""


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


@dataclass
class ReplayPass:
    """What one evaluation did: the offsets after what it handled and the runs it requests."""

    offsets: dict[int, int]
    requests: dict[str, dg.RunRequest] = field(default_factory=dict)
    read: int = 0
    size: int = 0
    stopped: str | None = None
    """Why it stopped before the end of the topic; None when it read up to the end."""


def replay_pass(
    instance: dg.DagsterInstance,
    kafka_dlq: KafkaDLQResource,
    specs: Sequence[JobSpec],
    offsets: Mapping[int, int],
    budget: Budget,
    log: Any,
) -> ReplayPass:
    """Read the topic on from `offsets`, one message at a time, until its end or a bound.

    The budget is checked before each message (the first one received is handled whatever is
    left), and a message is counted in the offsets only once handled, so the offsets returned
    are exactly past what was handled. Every wait for the broker takes what is left of the
    budget.
    """
    asset_jobs = {spec.asset: spec.name for spec in specs}
    done = ReplayPass(dict(offsets))
    with kafka_dlq.reader(budget) as reader:
        ranges = {}
        for partition, (low, high) in reader.bounds().items():
            start = done.offsets.get(partition, low)
            if start > high:
                log.warning(
                    f"The stored offset {start} of {kafka_dlq.topic}:{partition} is past the "
                    f"partition's end ({high}): the topic was recreated or moved. Reading it "
                    f"again from {low}; run keys keep replays from repeating."
                )
                start = done.offsets[partition] = low
            ranges[partition] = (max(start, low), high)
        for record in reader.records(ranges):
            # One message in hand is always handled, so every evaluation moves on, however
            # little of the budget setting up the reader left.
            if budget.exhausted and done.read:
                break
            _handle(instance, specs, asset_jobs, kafka_dlq.topic, record, done, log)
            if done.read >= REPLAY_MAX_MESSAGES:
                done.stopped = f"read {REPLAY_MAX_MESSAGES} messages, the most per evaluation"
            elif done.size >= REPLAY_MAX_BYTES:
                done.stopped = f"read {done.size} bytes, {REPLAY_MAX_BYTES} at most per evaluation"
            elif len(done.requests) >= REPLAY_MAX_REQUESTS:
                done.stopped = f"{REPLAY_MAX_REQUESTS} run requests, the most per evaluation"
            if done.stopped:
                return done
        if not reader.done:
            done.stopped = f"the evaluation's budget of {budget.seconds:g} s was spent"
    return done


def _handle(
    instance: dg.DagsterInstance,
    specs: Sequence[JobSpec],
    asset_jobs: Mapping[str, str],
    topic: str,
    record: KafkaRecord,
    done: ReplayPass,
    log: Any,
) -> None:
    """Handle one message: its replays join the requests, or it is skipped with a reason."""
    done.offsets[record.partition] = record.offset + 1
    done.read += 1
    done.size += len(record.value)
    parsed = parse_message(record.value, asset_jobs)
    where = f"{topic}:{record.partition}:{record.offset}"
    if isinstance(parsed, str):
        log.warning(f"Skipping DLQ message {where}: {parsed}.")
        return
    if parsed.replay_of is not None:
        log.info(
            f"Not replaying DLQ message {where}: run {parsed.run_id} was itself a replay "
            f"of {parsed.replay_of}. Replay it with `nova-assets dlq replay "
            f"{parsed.run_id}` once its fault is fixed."
        )
        return
    try:
        replays = plan_replays(instance, specs, parsed.run_id, parsed.asset_keys, parsed.job_name)
    except Exception as exc:  # the instance refused what the message names
        log.warning(f"Skipping DLQ message {where}: {type(exc).__name__}: {exc}")
        return
    for replay in replays:
        done.requests[replay.run_key] = dg.RunRequest(
            run_key=replay.run_key,
            job_name=replay.job_name,
            asset_selection=[dg.AssetKey.from_user_string(k) for k in replay.asset_keys],
            run_config=replay.run_config,
            tags=replay.tags,
        )


def build_dlq_replay_sensor(
    jobs: Sequence[Any],
    specs: Sequence[JobSpec],
    budget: Callable[[], Budget] = Budget.for_sensor,
) -> dg.SensorDefinition:
    """`dlq_replay`: replays each failed run once, by its asset keys, with its run config.

    Args:
        jobs: The jobs it may launch.
        specs: Those jobs' specs: which asset (and op) each owns.
        budget: Makes each evaluation's budget (the sensor budget; a test may shrink it).
    """

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
        spend = budget()
        offsets = {int(p): o for p, o in json.loads(context.cursor or "{}").items()}
        done = replay_pass(context.instance, kafka_dlq, specs, offsets, spend, context.log)
        context.update_cursor(json.dumps({str(p): o for p, o in sorted(done.offsets.items())}))
        summary = f"{done.read} message(s), {done.size} bytes, read in {spend.spent():.1f} s"
        if done.stopped:
            summary += f"; stopped ({done.stopped}), the next evaluation goes on from there"
        context.log.info(f"dlq_replay: {summary}.")
        if not done.requests:
            return dg.SkipReason(f"No DLQ message to replay ({summary}).")
        return list(done.requests.values())

    return dlq_replay
