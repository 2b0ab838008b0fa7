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
While Redis does not answer, the sensor logs a warning and requests nothing; once it answers
again, the requests made before the outage are forgotten: a healing run that Redis's going away
failed says nothing about whether the cache can be filled, and Redis is back empty.

An evaluation works within its budget (docs/design.md §10): it looks at the jobs one at a time,
each Redis round trip waits no longer than the budget has left, and when the budget is spent it
requests what it found so far and keeps, in its cursor, the job to look at first next time; the
next evaluation goes on from there, round the jobs, so every job is looked at however slow each
look is.
"""

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import dagster as dg
import redis

from nova_assets.core.bounded import WaitExceeded, call_within
from nova_assets.core.budget import Budget
from nova_assets.core.cache_asset import HEALING_KEYS, REASON_TAG
from nova_assets.core.jobs import JobSpec, active_run, job_specs
from nova_assets.core.resources import RedisCacheResource
from nova_assets.core.settings import load_settings
from nova_assets.defs.schedules import cache_jobs

CHECK_EVERY_S = 20
CURSOR_VERSION = 3
"""2 added where to go on (`next`) to the healing requests; 3 whether Redis was last seen down."""
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


def find_gap(
    instance: dg.DagsterInstance,
    redis_cache: RedisCacheResource,
    spec: JobSpec,
    now: float,
    budget: Budget | None = None,
) -> Healing | None:
    """Whether the job's cache is missing or expires before its next tick, and why.

    The Redis round trip waits no longer than the budget has left. Raises `redis.RedisError` when
    Redis does not answer (`WaitExceeded` when it does not answer in time).
    """
    found = watched_keys(instance, spec.asset)
    if found is None:
        return Healing(spec, MISSING, "never materialized")
    ttls = dict(zip(found.keys, _ttls(redis_cache, found.keys, budget), strict=True))
    missing = [key for key in found.keys if ttls[key] == -2]
    horizon = seconds_to_next_tick(spec, now)
    expiring = [key for key in found.keys if 0 <= ttls[key] < horizon]
    if missing:
        detail, reason = f"{len(missing)} of {len(found.keys)} keys missing", MISSING
    elif expiring:
        detail, reason = f"{len(expiring)} keys expire within {horizon:.0f} s", EXPIRING
    else:
        return None
    return Healing(spec, reason, detail, found.materialized_at)


def find_gaps(
    instance: dg.DagsterInstance,
    redis_cache: RedisCacheResource,
    specs: Sequence[JobSpec],
    now: float,
) -> list[Healing]:
    """The jobs whose caches are missing or expire before their next tick (all of them).

    Raises `redis.RedisError` when Redis does not answer.
    """
    _ttls(redis_cache, [])
    return [gap for spec in specs if (gap := find_gap(instance, redis_cache, spec, now))]


def _ttls(
    redis_cache: RedisCacheResource, keys: Sequence[str], budget: Budget | None = None
) -> list[int]:
    """The keys' TTLs (a PING with none), waiting at most what the budget has left."""
    if budget is None:
        return redis_cache.ttls(keys)
    return call_within(budget.left(), lambda: redis_cache.ttls(keys), "Redis")


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


@dataclass
class HealerCursor:
    """What the healer keeps between evaluations.

    `requested`: asset → when healing was last requested; `next`: the asset to look at first
    (where the last evaluation stopped when its budget ran out), None to start at the first;
    `redis_down`: whether the last evaluation found Redis not answering.
    """

    requested: dict[str, float] = field(default_factory=dict)
    next: str | None = None
    redis_down: bool = False

    @classmethod
    def parse(cls, cursor: str | None) -> "HealerCursor":
        """The stored cursor; older forms (2, asset → time) and anything unreadable carry on."""
        try:
            stored = json.loads(cursor or "{}")
            if isinstance(stored, dict) and stored.get("version") in (2, CURSOR_VERSION):
                following = stored.get("next")
                return cls(
                    _times(stored["requested"]),
                    None if following is None else str(following),
                    stored.get("redis_down") is True,
                )
            return cls(_times(stored))
        except (ValueError, TypeError, AttributeError, KeyError):
            return cls()

    def serialize(self) -> str:
        return json.dumps(
            {
                "version": CURSOR_VERSION,
                "requested": self.requested,
                "next": self.next,
                "redis_down": self.redis_down,
            }
        )


def _times(stored: Mapping) -> dict[str, float]:
    """The requests by asset, without times that are not finite (an infinite one waits forever)."""
    times = {str(asset): float(at) for asset, at in stored.items()}
    return {asset: at for asset, at in times.items() if math.isfinite(at)}


def in_turn(specs: Sequence[JobSpec], first: str | None) -> list[JobSpec]:
    """The jobs in order, starting at the one whose asset is `first` (if it is still there)."""
    start = next((i for i, spec in enumerate(specs) if spec.asset == first), 0)
    return [*specs[start:], *specs[:start]]


def build_cache_healer(
    specs: Sequence[JobSpec],
    jobs: Sequence[object],
    *,
    running: bool = True,
    budget: Callable[[], Budget] = Budget.for_sensor,
) -> dg.SensorDefinition:
    """`cache_healer` for the jobs; `budget` gives each evaluation its budget (the tests' less)."""

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
        evaluation = budget()
        now = time.time()
        cursor = HealerCursor.parse(context.cursor)
        order = in_turn(specs, cursor.next)
        gaps: list[Healing] = []
        heal: list[Healing] = []
        waiting: list[str] = []
        looked = 0
        try:
            # Redis answers first, so nothing is requested while it is down, not even for a cache
            # never materialized (a run could not fill it either).
            _ttls(redis_cache, [], evaluation)
            if cursor.redis_down:
                # Back after an outage, most likely empty: a healing run that the outage failed
                # must not hold its asset back for an interval.
                if cursor.requested:
                    context.log.info(
                        "Redis answers again: healing requested before the outage no longer "
                        f"waits ({', '.join(sorted(cursor.requested))})."
                    )
                cursor.requested, cursor.redis_down = {}, False
            for spec in order:
                if evaluation.exhausted:
                    break
                try:
                    gap = find_gap(context.instance, redis_cache, spec, now, evaluation)
                except WaitExceeded as exc:
                    # Redis answered the first call: the budget ran out waiting, not Redis.
                    context.log.warning(f"{spec.asset}: {exc}; looked at next time.")
                    break
                if gap is not None:
                    gaps.append(gap)
                    now_heal, now_waiting = plan_healing(
                        context.instance, [gap], cursor.requested, now
                    )
                    heal += now_heal
                    waiting += now_waiting
                looked += 1
        except (redis.RedisError, WaitExceeded) as exc:
            context.log.warning(f"Redis did not answer, no cache checked this time: {exc}")
            cursor.redis_down = True
            context.update_cursor(cursor.serialize())
            return dg.SkipReason(f"Redis did not answer: {type(exc).__name__}.")
        cursor.next = order[looked].asset if looked < len(order) else None
        for line in waiting:
            context.log.info(f"Not healing {line}.")
        unseen = len(order) - looked
        later = f" {unseen} jobs left for the next evaluation (budget spent)." if unseen else ""
        if not heal:
            summary = f"Waiting: {'; '.join(waiting)}." if gaps else "Every cache is in place."
            if unseen and not gaps:
                summary = "Every cache looked at is in place."
            context.update_cursor(cursor.serialize())
            return dg.SkipReason(summary + later)
        for gap in heal:
            context.log.info(f"Healing {gap.spec.asset} ({gap.reason}: {gap.detail}).")
            cursor.requested[gap.spec.asset] = now
        if later:
            context.log.info(later.strip())
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(job_name=gap.spec.name, tags={REASON_TAG: gap.reason}) for gap in heal
            ],
            cursor=cursor.serialize(),
        )

    return cache_healer


@dg.definitions
def defs() -> dg.Definitions:
    settings = load_settings()
    healer = build_cache_healer(job_specs(settings), cache_jobs(), running=settings.cache_healing)
    return dg.Definitions(sensors=[healer])
