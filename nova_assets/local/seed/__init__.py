"""Demo data: the source schema (docs/design.md §2) and a deterministic, realistic, dirty data set.

The Nova app owns these tables in production; this package creates them only for local use and
tests (`schema.py`). Every row is generated inside ClickHouse by `INSERT … SELECT … FROM
numbers(…)` (`sql.py`): each value is a hash of (seed, row number, salt), never `rand()`, so one
`SeedSpec` always yields the same tables, and ten million events take seconds instead of a Python
loop's minutes. This module holds what callers use: the spec, `generate` and its summary, and the
schema helpers.

What the data looks like, and why:

* Users are 1..N with a hidden popularity order (a seeded permutation of the ids). Users belong
  to communities; most follows stay inside the follower's community, and inside or outside it a
  followee is drawn with a heavy tail on popularity, so a few users have thousands of followers.
  5 % of users follow nobody (the "most followed" fill of suggestions is for them) and 10 % have
  no events (so "users with events" is a real subset).
* Post ids grow with `created_at` (as snowflake ids do), posts are spread over the `days` before
  `as_of`, and authors are drawn with a heavy tail.
* Each event picks a post by Zipf-like popularity and happens an exponential delay (mean 16 h)
  after the post's creation, never after `as_of`. Times follow a daily activity cycle (quiet at
  04:00 UTC, busiest around 20:00). The mix is mostly views.
* Dirty rows the rankings must survive, each at a small rate (`sql.py`, the `*_PER_MILLE` rates):
  unknown event types, events on missing posts and on deleted posts (before and after the
  deletion), duplicate events (exact, and repeats at another time), events after `as_of`, posts
  scheduled after `as_of` that already have events (clock skew), self-follows, unfollows,
  re-follows, blocks on both sides of a follow, unblocks, and exact duplicate rows in every table.
  In the ReplacingMergeTree tables the superseded rows stay until a background merge collapses
  them, as in production; queries must resolve the latest row themselves.
"""

import hashlib
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from nova_assets.core.resources import ClickHouseResource
from nova_assets.core.sources import BLOCKS, DATABASE, ENGAGEMENT_EVENTS, FOLLOWS, POSTS
from nova_assets.local.seed.schema import checksums, create_schema, is_empty, truncate
from nova_assets.local.seed.sql import (
    COMMUNITY_SIZE,
    EPOCH,
    HOURLY_ACTIVITY,
    INSERT_BLOCKS,
    INSERT_EVENTS,
    INSERT_FOLLOWS,
    INSERT_POSTS,
    MS_PER_DAY,
    UNKNOWN_EVENT_TYPES,
)

__all__ = [
    "SeedSpec",
    "SeedSummary",
    "checksums",
    "create_schema",
    "generate",
    "is_empty",
    "truncate",
]


def _default_as_of() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@dataclass(frozen=True)
class SeedSpec:
    """What to generate. One spec (seed and as_of included) always gives the same tables.

    Attributes:
        seed: Seeds every hash that draws a value.
        users: Users are ids 1..users.
        posts: Posts are ids 1..posts (their rows include deletions and a few duplicates).
        events: Engagement event rows, dirty ones included.
        days: Posts and events fall in the `days` before `as_of` (dirty rows aside).
        follows_per_user: Follow edges drawn per user before the 5 % who follow nobody are
            dropped; live edges come to about 0.89 * users * follows_per_user (100 000 users
            and 56 give 5 million).
        as_of: The instant the data ends (timezone-aware; stored as UTC, millisecond precision).
    """

    seed: int = 42
    users: int = 20_000
    posts: int = 200_000
    events: int = 2_000_000
    days: int = 7
    follows_per_user: int = 30
    as_of: datetime = field(default_factory=_default_as_of)

    def __post_init__(self) -> None:
        if self.as_of.tzinfo is None or self.as_of.utcoffset() is None:
            raise ValueError(
                f"SeedSpec.as_of must be timezone-aware, got naive {self.as_of.isoformat()}; "
                "pass e.g. datetime(2025, 1, 1, tzinfo=UTC)"
            )
        # The tables hold milliseconds; drop finer precision so as_of equals what is stored.
        as_of = self.as_of.astimezone(UTC)
        as_of = as_of.replace(microsecond=as_of.microsecond // 1000 * 1000)
        object.__setattr__(self, "as_of", as_of)
        # Maxima: the id permutations multiply two ids in UInt64.
        bounds = {
            "seed": (0, 2**64 - 1),
            "users": (2, 2**32 - 1),
            "posts": (1, 2**32 - 1),
            "events": (0, 2**63 - 1),
            "days": (1, 36_500),
            "follows_per_user": (0, 100_000),
        }
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"SeedSpec.{name} must be in {low}..{high}, got {value}")

    @property
    def as_of_ms(self) -> int:
        """`as_of` in Unix milliseconds, exact (no float rounding)."""
        return (self.as_of - EPOCH) // timedelta(milliseconds=1)


@dataclass(frozen=True)
class SeedSummary:
    """Rows written per table by `generate`, and how long it took."""

    posts: int
    engagement_events: int
    follows: int
    blocks: int
    elapsed_s: float

    def row_counts(self) -> dict[str, int]:
        return {
            POSTS: self.posts,
            ENGAGEMENT_EVENTS: self.engagement_events,
            FOLLOWS: self.follows,
            BLOCKS: self.blocks,
        }

    def describe(self) -> str:
        """One line for people: the rows written per table and the time it took."""
        rows = "; ".join(f"{table}: {count:,} rows" for table, count in self.row_counts().items())
        return f"{rows} (generated in {self.elapsed_s:.1f} s)"


def generate(clickhouse: ClickHouseResource, spec: SeedSpec | None = None) -> SeedSummary:
    """Create the schema and fill the empty tables with the data set `spec` describes.

    Four `INSERT … SELECT` statements: posts, follows, blocks (drawn from the follows), events.

    Raises:
        ValueError: if the tables already hold rows: seeding on top of them would duplicate the
            data set, so call `truncate` first.
    """
    spec = spec or SeedSpec()
    started = time.monotonic()
    create_schema(clickhouse)
    if not is_empty(clickhouse):
        raise ValueError(
            f"the {DATABASE} tables on {clickhouse.describe()} already hold rows; seeding again "
            "would duplicate them. Empty them first (seed.truncate) or seed another database."
        )
    parameters = _parameters(spec)
    clickhouse.command(INSERT_POSTS, parameters)
    clickhouse.command(INSERT_FOLLOWS, parameters)
    clickhouse.command(INSERT_BLOCKS, parameters)  # reads follows: must come after them
    clickhouse.command(INSERT_EVENTS, parameters)
    counts = {table: count for table, (count, _) in checksums(clickhouse).items()}
    return SeedSummary(
        posts=counts[POSTS],
        engagement_events=counts[ENGAGEMENT_EVENTS],
        follows=counts[FOLLOWS],
        blocks=counts[BLOCKS],
        elapsed_s=time.monotonic() - started,
    )


def _parameters(spec: SeedSpec) -> dict[str, object]:
    """The values bound into the statements: spec fields, the seeded permutations, the clock."""
    user_mul, user_off = _permutation(spec.users, spec.seed, "users")
    act_mul, act_off = _permutation(spec.users, spec.seed, "activity")
    post_mul, post_off = _permutation(spec.posts, spec.seed, "posts")
    start_ms = spec.as_of_ms - spec.days * MS_PER_DAY
    return {
        "seed": spec.seed,
        "users": spec.users,
        "active_users": max(spec.users * 9 // 10, 1),
        "posts": spec.posts,
        "events": spec.events,
        "edges": spec.users * spec.follows_per_user,
        "random_blocks": max(spec.users // 100, 1),
        "communities": max(spec.users // COMMUNITY_SIZE, 1),
        "as_of_ms": spec.as_of_ms,
        "start_ms": start_ms,
        "act_start": _activity_clock(start_ms),
        "act_end": _activity_clock(spec.as_of_ms),
        "act_eps": 1 / 86_400,
        "cycle": list(_CYCLE),
        "user_mul": user_mul,
        "user_off": user_off,
        "act_mul": act_mul,
        "act_off": act_off,
        "post_mul": post_mul,
        "post_off": post_off,
        "unknown_types": list(UNKNOWN_EVENT_TYPES),
    }


# Cumulative share of a day's activity before each UTC hour 0..24 (0.0 … 1.0).
_CYCLE = tuple([sum(HOURLY_ACTIVITY[:hour]) / sum(HOURLY_ACTIVITY) for hour in range(24)] + [1.0])


def _activity_clock(ms: int) -> float:
    """The activity clock at Unix time `ms`: whole days plus the share of the day's activity so far.

    The statements invert this clock in SQL (`ACTIVITY_TO_MS_COLUMNS`).
    """
    day, in_day = divmod(ms, MS_PER_DAY)
    hours = in_day / 3_600_000
    hour = min(int(hours), 23)
    return day + _CYCLE[hour] + (hours - hour) * (_CYCLE[hour + 1] - _CYCLE[hour])


def _permutation(n: int, seed: int, salt: str) -> tuple[int, int]:
    """A seeded bijection of 0..n-1, `i ↦ (i·mul + off) mod n`, given as (mul, off).

    `mul` is coprime with n (so the map is a bijection) and lies in the middle half of 0..n, so
    neighbouring ranks land far apart: the most popular users are not ids 1, 2, 3.
    """
    digest = int.from_bytes(hashlib.sha256(f"{seed}:{salt}".encode()).digest()[:8], "big")
    if n <= 2:
        return 1, digest % n
    mul = n // 4 + digest % (n // 2 + 1)
    while math.gcd(mul, n) != 1:
        mul += 1
    return mul, (digest >> 20) % n
