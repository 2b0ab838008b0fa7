"""What Redis serves for each cache: keys present, items, `generated_at` age, TTL left.

`nova-assets health` judges a job by what a reader gets as well as by its runs (docs/design.md
§4, §10). Trending has one key per window; suggestions and feeds have one per user, so a bounded
sample is read: the keys the asset's last materialization recorded (`healing_keys`, at most
`HEALING_SAMPLE`), the same keys `cache_healer` watches. One pipeline reads every job's keys
(a GET and a TTL each), after the connection's own round trip: a few round trips in all, whatever
the number of users or the age of the instance, and never more than `DEADLINE_S`.

A cache is

- `served`: every key looked at is there, holds a value of the contract and has its TTL;
- `missing`: some or all of those keys are gone (the counts say how many);
- `unreadable`: a value is not the contract's JSON object with an `items` list;
- `no ttl`: a key without a TTL, which the contract never writes;
- `unreachable`: Redis did not answer (the reason is given once per cache);
- `unknown`: no key to look at: the asset was never materialized, or wrote no key.
"""

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import dagster as dg

from nova_assets.core.bounded import call_within
from nova_assets.core.cache_asset import HEALING_SAMPLE
from nova_assets.core.jobs import JobSpec
from nova_assets.core.resources import RedisCacheResource
from nova_assets.core.urls import redact_url
from nova_assets.defs.cache_healing import watched_keys

SERVED, MISSING, UNREADABLE, NO_TTL, UNREACHABLE, UNKNOWN = (
    "served",
    "missing",
    "unreadable",
    "no ttl",
    "unreachable",
    "unknown",
)
NOT_SERVED = (MISSING, UNREADABLE, NO_TTL, UNREACHABLE)
"""The states in which a job is not `ok`, whatever its runs say."""
SOCKET_TIMEOUT_S = 1.0
DEADLINE_S = 3.0
"""The longest health waits for Redis in all (connecting, the cluster check and the pipeline)."""


@dataclass(frozen=True)
class Served:
    """What Redis serves for one job's cache, judged from a sample of its keys."""

    state: str
    keys_checked: int = 0
    keys_present: int = 0
    items: int | None = None
    """Items in the values present (summed over the sample)."""
    generated_at_age_sec: float | None = None
    """Age of the oldest value present, from its `generated_at`."""
    ttl_left_sec: int | None = None
    """The shortest TTL among the keys present."""
    error: str | None = None


def _generated_age(value: Mapping[str, Any], now: float) -> float | None:
    stamp = value.get("generated_at")
    if not isinstance(stamp, str):
        return None
    try:
        return now - datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def judge(
    keys: Sequence[str], raw: Sequence[bytes | None], ttls: Sequence[int], now: float
) -> Served:
    """One cache's state from its keys' values and TTLs (as Redis answered them)."""
    if not keys:
        return Served(UNKNOWN)
    present = [(value, ttl) for value, ttl in zip(raw, ttls, strict=True) if value is not None]
    items, ages, unreadable = 0, [], 0
    for value, _ in present:
        try:
            decoded = json.loads(value)
        except ValueError:
            decoded = None
        if not isinstance(decoded, dict) or not isinstance(decoded.get("items"), list):
            unreadable += 1
            continue
        items += len(decoded["items"])
        age = _generated_age(decoded, now)
        if age is not None:
            ages.append(age)
    left = [ttl for _, ttl in present if ttl >= 0]
    if len(present) < len(keys):
        state = MISSING
    elif unreadable:
        state = UNREADABLE
    elif any(ttl == -1 for _, ttl in present):  # -2: expired between the GET and the TTL
        state = NO_TTL
    else:
        state = SERVED
    return Served(
        state=state,
        keys_checked=len(keys),
        keys_present=len(present),
        items=items if present else None,
        generated_at_age_sec=round(max(ages), 1) if ages else None,
        ttl_left_sec=min(left) if left else None,
    )


def _read(client: Any, keys: Sequence[str]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.get(key)
        pipe.ttl(key)
    return pipe.execute()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def served_caches(
    instance: dg.DagsterInstance, redis_url: str, specs: Sequence[JobSpec]
) -> dict[str, Served]:
    """Each job's cache (by job name) as Redis serves it now; never raises for Redis."""
    samples = {}
    for spec in specs:
        watched = watched_keys(instance, spec.asset)
        samples[spec.name] = list(watched.keys[:HEALING_SAMPLE]) if watched else []
    keys = [key for sample in samples.values() for key in sample]
    cache = RedisCacheResource(url=redis_url, retries=0, socket_timeout_s=SOCKET_TIMEOUT_S)
    try:
        # The client's first use asks the server whether it is a cluster: Redis answers or not,
        # even when there is no key to read.
        replies = call_within(
            DEADLINE_S,
            lambda: _read(cache.client(), keys) if keys else cache.client().ping(),
            "Redis",
        )
    except Exception as exc:  # whatever Redis does, health answers for each cache
        reason = f"{redact_url(redis_url)} did not answer: {_reason(exc)}"
        return {
            name: Served(UNREACHABLE, len(sample), error=reason) for name, sample in samples.items()
        }
    finally:
        cache.close()
    now = time.time()
    answers = iter(replies if keys else [])
    result = {}
    for name, sample in samples.items():
        pairs = [(next(answers), next(answers)) for _ in sample]
        result[name] = judge(sample, [v for v, _ in pairs], [int(t) for _, t in pairs], now)
    return result
