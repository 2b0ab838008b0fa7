"""`cache_healer`: a cache that went missing is refilled now, not at its next tick an hour away.

Redis can lose its data between two ticks: a restart without persistence, a failover to an empty
replica, a `FLUSHDB` by mistake; and on a first start no cache exists yet. Every 20 s the sensor
reads, for each job's asset, the keys its last materialization wrote (a sample, recorded as
`healing_keys` metadata) and asks Redis for their TTLs in one pipeline. A job is run at once when

- its asset was never materialized, or one of those keys is gone (`nova/reason=cache_missing`);
- one of them expires before the schedule's next tick (`nova/reason=cache_expiring`).

The guarantees of every other run hold: a healing run is a run of the job (one at a time, its
pool slot, its metrics), and a job with a run queued or in progress is left to it (skip, not
queue). Nothing can storm: after a healing run the asset is healed again only once it has been
materialized since (a new loss, as after a second `FLUSHDB`), or, when the cache still cannot be
filled, after one interval of its schedule.
While Redis does not answer, the sensor logs a warning and requests nothing.
"""

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import dagster as dg
import redis

from nova_assets.core.cache_asset import HEALING_KEYS, REASON_TAG
from nova_assets.core.jobs import JobSpec, active_run, job_specs
from nova_assets.core.resources import RedisCacheResource
from nova_assets.core.settings import load_settings
from nova_assets.defs.schedules import cache_jobs

CHECK_EVERY_S = 20
MISSING, EXPIRING = "cache_missing", "cache_expiring"


@dataclass(frozen=True)
class Healing:
    """One job to run now, and why."""

    spec: JobSpec
    reason: str
    detail: str
    materialized_at: float | None = None
    """When the asset was last materialized, if ever."""


@dataclass(frozen=True)
class Watched:
    keys: list[str]
    materialized_at: float


def watched_keys(instance: dg.DagsterInstance, asset: str) -> Watched | None:
    """The keys the asset's last materialization recorded; None if it was never materialized."""
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None or event.asset_materialization is None:
        return None
    recorded = event.asset_materialization.metadata.get(HEALING_KEYS)
    value = recorded.value if recorded is not None else []
    keys = [key for key in value if isinstance(key, str)] if isinstance(value, list) else []
    return Watched(keys, event.timestamp)


def seconds_to_next_tick(spec: JobSpec, now: float) -> float:
    """Every cadence of the schedules fires on multiples of its interval since the epoch (UTC)."""
    return spec.interval_sec - now % spec.interval_sec


def find_gaps(
    instance: dg.DagsterInstance,
    redis_cache: RedisCacheResource,
    specs: Sequence[JobSpec],
    now: float,
) -> list[Healing]:
    """The jobs whose caches are missing or expire before their next tick.

    Raises `redis.RedisError` when Redis does not answer.
    """
    watched = {spec.asset: watched_keys(instance, spec.asset) for spec in specs}
    keys = sorted({key for found in watched.values() if found for key in found.keys})
    ttls = dict(zip(keys, redis_cache.ttls(keys), strict=True))
    gaps = []
    for spec in specs:
        found = watched[spec.asset]
        if found is None:
            gaps.append(Healing(spec, MISSING, "never materialized"))
            continue
        missing = [key for key in found.keys if ttls[key] == -2]
        horizon = seconds_to_next_tick(spec, now)
        expiring = [key for key in found.keys if 0 <= ttls[key] < horizon]
        if missing:
            detail, reason = f"{len(missing)} of {len(found.keys)} keys missing", MISSING
        elif expiring:
            detail, reason = f"{len(expiring)} keys expire within {horizon:.0f} s", EXPIRING
        else:
            continue
        gaps.append(Healing(spec, reason, detail, found.materialized_at))
    return gaps


def plan_healing(
    instance: dg.DagsterInstance,
    gaps: Sequence[Healing],
    requested: Mapping[str, float],
    now: float,
) -> tuple[list[Healing], list[str]]:
    """The gaps to heal now, and why the others wait.

    A job waits while a run of it is in flight, and for an interval after a healing request that
    has not materialized the asset since (the cache cannot be filled: no storm).
    """
    heal, waiting = [], []
    for gap in gaps:
        spec = gap.spec
        last = requested.get(spec.asset, 0.0)
        healed_since = gap.materialized_at is not None and gap.materialized_at > last
        if now - last < spec.interval_sec and not healed_since:
            waiting.append(
                f"{spec.asset}: healing requested {now - last:.0f} s ago and not materialized "
                "since; once per interval"
            )
        elif (active := active_run(instance, spec)) is not None:
            waiting.append(f"{spec.asset}: run {active.dagster_run.run_id} will refill it")
        else:
            heal.append(gap)
    return heal, waiting


def build_cache_healer(
    specs: Sequence[JobSpec], jobs: Sequence[object], *, running: bool = True
) -> dg.SensorDefinition:
    @dg.sensor(
        name="cache_healer",
        description="Runs a job at once when its cache is missing (never materialized, keys gone "
        "after a Redis restart or flush) or expires before the next tick; at most once per "
        "interval per asset, never beside a run in flight.",
        minimum_interval_seconds=CHECK_EVERY_S,
        default_status=(
            dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED
        ),
        jobs=list(jobs),
    )
    def cache_healer(
        context: dg.SensorEvaluationContext, redis_cache: RedisCacheResource
    ) -> dg.SensorResult | dg.SkipReason:
        now = time.time()
        try:
            gaps = find_gaps(context.instance, redis_cache, specs, now)
        except redis.RedisError as exc:
            context.log.warning(f"Redis did not answer, no cache checked this time: {exc}")
            return dg.SkipReason(f"Redis did not answer: {type(exc).__name__}.")
        requested = _parse(context.cursor)
        heal, waiting = plan_healing(context.instance, gaps, requested, now)
        for line in waiting:
            context.log.info(f"Not healing {line}.")
        if not heal:
            return dg.SkipReason(
                "Every cache is in place." if not gaps else f"Waiting: {'; '.join(waiting)}."
            )
        for gap in heal:
            context.log.info(f"Healing {gap.spec.asset} ({gap.reason}: {gap.detail}).")
            requested[gap.spec.asset] = now
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(job_name=gap.spec.name, tags={REASON_TAG: gap.reason}) for gap in heal
            ],
            cursor=json.dumps(requested),
        )

    return cache_healer


def _parse(cursor: str | None) -> dict[str, float]:
    try:
        stored = json.loads(cursor or "{}")
        return {str(k): float(v) for k, v in stored.items()}
    except (ValueError, TypeError, AttributeError):
        return {}


@dg.definitions
def defs() -> dg.Definitions:
    settings = load_settings()
    healer = build_cache_healer(job_specs(settings), cache_jobs(), running=settings.cache_healing)
    return dg.Definitions(sensors=[healer])
