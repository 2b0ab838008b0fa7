"""Warmed feeds of the most active users: ranked, written and checked (docs/design.md §3-4).

ClickHouse picks the warmed users and ranks every one of their feeds at once; the values
go to `{prefix}feed:{user_id}` in pipelines, at most 20 in flight, each key with its TTL in the
same command. The checks then judge what Redis serves, against ClickHouse for a sample of users.
"""

import json
import math
import random
import statistics
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import dagster as dg

from nova_assets.core.cache_asset import (
    HEALING_SAMPLE,
    Stopwatch,
    asset_pool,
    cache_asset,
    cache_result,
)
from nova_assets.core.contract import AsOfConfig, epoch_ms, iso_z
from nova_assets.core.jobs import FEEDS_ASSET, FEEDS_JOB, FEEDS_REFRESH_SEC
from nova_assets.core.resources import (
    CLICKHOUSE_POOL,
    ClickHouseResource,
    RedisCacheResource,
    session_tables_lost,
)
from nova_assets.core.settings import load_settings
from nova_assets.core.sources import (
    ENGAGEMENT_EVENTS,
    EVENT_WEIGHTS,
    FOLLOWS,
    POSTS,
    age_hours,
    in_window,
    weight_parameters,
)

ASSET_NAME = FEEDS_ASSET
JOB_NAME = FEEDS_JOB
REFRESH_SEC = FEEDS_REFRESH_SEC
"""The cache_warmer schedule's interval (docs/design.md §5)."""
FEED_TTL_SEC = 120
"""Default TTL of a feed key: two refreshes, so a healthy schedule rewrites it before it expires."""

WARMED_USERS = 1000
"""How many of the last 24 h's most active users are warmed."""
FEED_LENGTH = 50
ACTIVITY_WINDOW = timedelta(hours=24)
FEED_WINDOW = timedelta(hours=72)
DECAY_PER_HOUR = 0.95

WRITERS = 20
"""Pipelines in flight at once (docs/design.md §3: at most 20 writers)."""
WRITE_BATCH = 50
"""Feeds per pipeline: 1000 users make 20 pipelines, one per writer."""
CHECK_SAMPLE = 50
"""Users whose served feeds are verified against ClickHouse on every run."""

_LAST_DAY = "day_start_ms", "as_of_ms"
_FEED_WINDOW = "feed_start_ms", "as_of_ms"
# Σ weight(type) over a post's events deduplicated per (user, type): per known type, the weight
# times the number of distinct users. A fixed sum of integer counts, so a post's engagement is the
# same on every run, whatever order the events are read in. Unknown types are filtered out before.
_ENGAGEMENT = " + ".join(
    f"{{weight_{i}:Float64}} * uniqExactIf(user_id, event_type = {{type_{i}:String}})"
    for i in range(len(EVENT_WEIGHTS))
)

# Every user is warmed by one query, after three small tables of the run's ClickHouse session hold
# what the query would otherwise compute more than once (ClickHouse inlines a CTE at each use; a
# MATERIALIZED CTE would do the same in one statement, but needs a newer server than deploy/README
# requires). On 10M events a run's first ranking took 1.2-1.3 CPU-s this way, 1.9 as one query;
# bench/feeds.py times both: faster for the 1000 users warmed, slower for 10,000.
#
# * `feeds_warmed`: raw event counts of the last 24 h (any type, duplicates included), the top
#   N by count, ties to the lower user_id. The events table leads its key with the hour: a day
#   is read.
# * `feeds_edges`: their live follow edges (latest row by updated_at not deleted; on a tie the
#   deleting row wins, as in suggestions), self-edges dropped, so no user sees their own posts.
#   Follows are keyed by follower: only their rows are read.
# * `feeds_followed_posts`: ids of posts with some row by a followee, not deleted and created in
#   (as_of - 72 h, as_of]. A candidate's latest row is such a row, so every candidate is here.
#
# Then the query:
#
# * `candidates`: every row of those posts resolved (argMax by updated_at, a deleting row winning
#   a tie), kept when the latest row is not deleted and its created_at is in the window: an older
#   row never decides.
# * `engagement`: for those posts only, the events of (as_of - 72 h, as_of], deduplicated.
# * `scored`: (1 + engagement) * 0.95 ^ age_h(created_at), as exp(ln 0.95 * age_h), once per post.
# * `feeds`: per warmed user, the best 50 of its followees' posts by (score desc, post_id desc),
#   kept by a bounded sort on (-score, -post_id); joined on the latest row's author.
# The LEFT JOIN from the warmed users gives a user without candidates empty arrays
# (join_use_nulls = 0).
WARMED_TABLE = "feeds_warmed"
EDGES_TABLE = "feeds_edges"
FOLLOWED_POSTS_TABLE = "feeds_followed_posts"
STAGES = (
    (
        WARMED_TABLE,
        f"""
        SELECT user_id, count() AS events
        FROM {ENGAGEMENT_EVENTS}
        WHERE {in_window("event_time", *_LAST_DAY)}
        GROUP BY user_id
        ORDER BY events DESC, user_id ASC
        LIMIT {{users:UInt32}}
        """,
    ),
    (EDGES_TABLE, FOLLOWS.live_edges(f"follower_id IN (SELECT user_id FROM {WARMED_TABLE})")),
    (
        FOLLOWED_POSTS_TABLE,
        f"""
        SELECT post_id
        FROM {POSTS}
        WHERE is_deleted = 0 AND {in_window("created_at", *_FEED_WINDOW)}
          AND author_id IN (SELECT followee_id FROM {EDGES_TABLE})
        """,
    ),
)
"""The session's temporary tables of a feeds run, each with the SELECT that fills it, in order."""

FEEDS_SQL = f"""
WITH
candidates AS (
    SELECT
        post_id,
        {POSTS.latest("author_id")} AS author_id,
        {POSTS.latest("created_at")} AS created
    FROM {POSTS}
    WHERE post_id IN {FOLLOWED_POSTS_TABLE}
    GROUP BY post_id
    HAVING {POSTS.live} AND {in_window("created", *_FEED_WINDOW)}
),
engagement AS (
    SELECT post_id, {_ENGAGEMENT} AS engagement
    FROM {ENGAGEMENT_EVENTS}
    WHERE {in_window("event_time", *_FEED_WINDOW)}
      AND event_type IN {{types:Array(String)}}
      AND post_id IN {FOLLOWED_POSTS_TABLE}
    GROUP BY post_id
),
scored AS (
    SELECT
        c.post_id AS post_id,
        c.author_id AS author_id,
        (1 + g.engagement) * exp({{ln_decay:Float64}} * {age_hours("c.created")}) AS score
    FROM candidates AS c
    LEFT JOIN engagement AS g ON g.post_id = c.post_id
),
feeds AS (
    SELECT
        e.follower_id AS user_id,
        groupArraySorted({{top:UInt32}})((-s.score, -toInt64(s.post_id), s.author_id)) AS ranked
    FROM {EDGES_TABLE} AS e
    INNER JOIN scored AS s ON s.author_id = e.followee_id
    GROUP BY e.follower_id
)
SELECT
    w.user_id,
    w.events,
    arrayMap(t -> toUInt64(-t.2), f.ranked) AS post_ids,
    arrayMap(t -> t.3, f.ranked) AS author_ids,
    arrayMap(t -> -t.1, f.ranked) AS scores
FROM {WARMED_TABLE} AS w
LEFT JOIN feeds AS f ON f.user_id = w.user_id
ORDER BY w.events DESC, w.user_id ASC
SETTINGS join_use_nulls = 0
"""

# The facts the contract check needs for a sample of users: their live followees, and the latest
# row of every post their served feeds hold.
LIVE_FOLLOWEES_SQL = f"""
SELECT follower_id, groupArray(followee_id)
FROM ({FOLLOWS.live_edges("follower_id IN {user_ids:Array(UInt64)}")})
GROUP BY follower_id
"""

POST_STATES_SQL = f"""
SELECT
    post_id,
    {POSTS.latest("author_id")},
    toUnixTimestamp64Milli({POSTS.latest("created_at")}),
    {POSTS.latest("is_deleted")}
FROM {POSTS}
WHERE post_id IN {{post_ids:Array(UInt64)}}
GROUP BY post_id
"""


@dataclass(frozen=True)
class Feed:
    """One warmed user's feed: the `items` of the cache value, best first."""

    user_id: int
    events: int
    """The user's raw event count in the last 24 h (why they were warmed)."""
    items: list[dict[str, Any]]


@dataclass(frozen=True)
class PostState:
    """A post's latest row, as the contract check reads it."""

    author_id: int
    created_ms: int
    is_deleted: bool


def feeds_parameters(as_of: datetime, users: int = WARMED_USERS) -> dict[str, Any]:
    return {
        "as_of_ms": epoch_ms(as_of),
        "day_start_ms": epoch_ms(as_of - ACTIVITY_WINDOW),
        "feed_start_ms": epoch_ms(as_of - FEED_WINDOW),
        **weight_parameters(),
        "ln_decay": math.log(DECAY_PER_HOUR),
        "users": users,
        "top": FEED_LENGTH,
    }


class FeedsSessionLostError(RuntimeError):
    """The session holding a run's staged tables was lost. Transient: the step is retried."""


def rank_feeds(
    clickhouse: ClickHouseResource, as_of: datetime, users: int = WARMED_USERS
) -> list[Feed]:
    """The feeds of the `users` most active users as of `as_of`, most active user first.

    On a server whose session was lost between the statements (a balancer sent one to another
    server), `FeedsSessionLostError`: the step's retry opens a new session and ranks again.
    """
    parameters = feeds_parameters(as_of, users)
    tables = [table for table, _ in STAGES]
    try:
        # Dropped first: a call that failed midway in this session left them behind.
        for table, select in STAGES:
            clickhouse.command(f"DROP TEMPORARY TABLE IF EXISTS {table}")
            create = f"CREATE TEMPORARY TABLE {table} ENGINE = Memory AS {select}"
            clickhouse.command(create, parameters)
        rows = clickhouse.query_rows(FEEDS_SQL, parameters)
    except Exception as exc:
        reason = session_tables_lost(exc, tables)
        if reason is None:
            raise
        raise FeedsSessionLostError(
            f"{ASSET_NAME}: the ClickHouse session holding the run's tables ({', '.join(tables)}) "
            f"was lost ({reason}); the step is retried in a new session. The requests of one "
            "session must reach one server: point CLICKHOUSE_URL at one server or replica, or at "
            "a balancer that keeps a connection, or the session_id parameter, on one server "
            "(deploy/README.md)."
        ) from exc
    try:
        for table in tables:
            clickhouse.command(f"DROP TEMPORARY TABLE IF EXISTS {table}")
    except Exception as exc:
        # The ranking is done; a session lost since has taken its tables with it.
        if session_tables_lost(exc, tables) is None:
            raise
    return [
        Feed(
            user_id=int(user_id),
            events=int(events),
            items=[
                {"post_id": int(p), "author_id": int(a), "score": float(s)}
                for p, a, s in zip(post_ids, author_ids, scores, strict=True)
            ],
        )
        for user_id, events, post_ids, author_ids, scores in rows
    ]


def feed_value(feed: Feed, as_of: datetime, generated_at: datetime) -> dict[str, Any]:
    """The cache value of docs/design.md §4."""
    return {
        "user_id": feed.user_id,
        "as_of": iso_z(as_of),
        "generated_at": iso_z(generated_at),
        "items": feed.items,
    }


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def write_feeds(
    redis_cache: RedisCacheResource,
    values: Sequence[dict[str, Any]],
    ttl_sec: int,
    *,
    batch: int = WRITE_BATCH,
    writers: int = WRITERS,
) -> int:
    """Write feed values (each with its TTL in its SET) in pipelines, `writers` in flight at most.

    Every key is written whole by one command, so stopping between pipelines (a terminated run)
    leaves each key either old or new. An empty feed never replaces a non-empty one (docs/design.md
    §4). Returns the number of keys written; the others kept their previous feed.
    """
    redis_cache.client()  # connect once here, not racing in the workers
    entries = [(redis_cache.key("feed", v["user_id"]), v, ttl_sec) for v in values]
    pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="feed-writer")
    futures = [pool.submit(redis_cache.set_many_json, chunk) for chunk in _batches(entries, batch)]
    try:
        wait(futures)
        return sum(f.result() for f in futures)
    finally:
        # On an interruption the pipelines in flight finish; those not started are dropped.
        pool.shutdown(wait=True, cancel_futures=True)


def read_served(
    redis_cache: RedisCacheResource, user_ids: Sequence[int]
) -> tuple[dict[int, dict[str, Any] | None], dict[int, int]]:
    """What Redis serves for these users, and each key's TTL, read in one pipeline."""
    pipe = redis_cache.client().pipeline(transaction=False)
    for user_id in user_ids:
        key = redis_cache.key("feed", user_id)
        pipe.get(key)
        pipe.ttl(key)
    replies = pipe.execute() if user_ids else []
    values: dict[int, dict[str, Any] | None] = {}
    ttls: dict[int, int] = {}
    for i, user_id in enumerate(user_ids):
        raw, ttl = replies[2 * i], replies[2 * i + 1]
        values[user_id] = None if raw is None else _loads(raw)
        ttls[user_id] = int(ttl)
    return values, ttls


def _loads(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def contract_facts(
    clickhouse: ClickHouseResource, served: Mapping[int, dict[str, Any] | None]
) -> tuple[dict[int, set[int]], dict[int, PostState]]:
    """Live followees of the served users, and the latest row of every post their feeds hold."""
    user_ids = sorted(served)
    followees: dict[int, set[int]] = {u: set() for u in user_ids}
    if user_ids:
        for user_id, ids in clickhouse.query_rows(LIVE_FOLLOWEES_SQL, {"user_ids": user_ids}):
            followees[int(user_id)] = {int(i) for i in ids}
    post_ids = sorted(
        {
            item["post_id"]
            for value in served.values()
            for item in _items(value)
            if isinstance(item, dict) and isinstance(item.get("post_id"), int)
        }
    )
    posts: dict[int, PostState] = {}
    if post_ids:
        for post_id, author_id, created_ms, deleted in clickhouse.query_rows(
            POST_STATES_SQL, {"post_ids": post_ids}
        ):
            posts[int(post_id)] = PostState(int(author_id), int(created_ms), bool(deleted))
    return followees, posts


def checks(feed_ttl_sec: int) -> dict[str, str]:
    return {
        "keys_have_ttl": f"Every warmed user's key exists, holds that user's feed and expires "
        f"within (0, {feed_ttl_sec}] s.",
        "posts_from_live_followees": f"On a sample of {CHECK_SAMPLE} users, checked against "
        "ClickHouse: every post is by a live followee (not the user), not deleted, and created in "
        "(as_of - 72 h, as_of].",
        "ordered_and_capped": "Every feed is ordered by score desc, post_id desc, holds no post "
        f"twice and at most {FEED_LENGTH} items.",
    }


def _items(value: dict[str, Any] | None) -> list[dict[str, Any]]:
    items = (value or {}).get("items")
    return items if isinstance(items, list) else []


def evaluate_checks(
    served: Mapping[int, dict[str, Any] | None],
    ttls: Mapping[int, int],
    *,
    feed_ttl_sec: int,
    as_of: datetime,
    followees: Mapping[int, set[int]],
    posts: Mapping[int, PostState],
) -> dict[str, tuple[bool, dict[str, Any]]]:
    """Judge the served feeds; each entry maps a check name to (passed, metadata).

    Args:
        served: Every warmed user's served value (None when the key is missing or not JSON).
        ttls: Each warmed key's TTL as Redis reports it (-2 missing, -1 no TTL).
        feed_ttl_sec: The TTL the asset writes.
        as_of: The run's instant.
        followees: Live followees of the sampled users; only these users' feeds are verified
            against ClickHouse.
        posts: Latest row of every post the sampled feeds hold; a post absent here is missing.
    """
    bad_keys = sorted(
        u
        for u, value in served.items()
        if value is None
        or value.get("user_id") != u
        or not isinstance(value.get("items"), list)
        or not 0 < ttls.get(u, -2) <= feed_ttl_sec
    )

    as_of_ms, start_ms = epoch_ms(as_of), epoch_ms(as_of - FEED_WINDOW)
    violations: list[str] = []
    for user_id, live in followees.items():
        for item in _items(served.get(user_id)):
            post_id = item.get("post_id")
            state = posts.get(post_id) if isinstance(post_id, int) else None
            if state is None:
                reason = "missing"
            elif state.is_deleted:
                reason = "deleted"
            elif state.author_id == user_id:
                reason = "own post"
            elif state.author_id not in live:
                reason = "not a live followee's"
            elif state.author_id != item.get("author_id"):
                reason = "wrong author"
            elif not start_ms < state.created_ms <= as_of_ms:
                reason = "outside 72 h"
            else:
                continue
            violations.append(f"user {user_id} post {post_id}: {reason}")

    disordered = []
    for user_id, value in served.items():
        items = _items(value)
        keys = [(i.get("score"), i.get("post_id")) for i in items if isinstance(i, dict)]
        sortable = all(
            isinstance(s, int | float) and isinstance(p, int) and not isinstance(p, bool)
            for s, p in keys
        )
        duplicates = any(n > 1 for n in Counter(p for _, p in keys).values())
        if (
            len(items) > FEED_LENGTH
            or len(keys) != len(items)
            or not sortable
            or duplicates
            or any(keys[i] < keys[i + 1] for i in range(len(keys) - 1))
        ):
            disordered.append(user_id)
    disordered.sort()

    return {
        "keys_have_ttl": (
            not bad_keys,
            {"keys_checked": len(served), "bad_users": str(bad_keys[:20])},
        ),
        "posts_from_live_followees": (
            not violations,
            {"users_sampled": len(followees), "violations": str(violations[:20])},
        ),
        "ordered_and_capped": (
            not disordered,
            {"feeds_checked": len(served), "bad_users": str(disordered[:20])},
        ),
    }


def check_sample(user_ids: Sequence[int], as_of: datetime, size: int = CHECK_SAMPLE) -> list[int]:
    """The users verified against ClickHouse: a different sample each run, repeatable per as_of."""
    if len(user_ids) <= size:
        return list(user_ids)
    return sorted(random.Random(epoch_ms(as_of)).sample(list(user_ids), size))


def _percentile(values: Sequence[int], q: int) -> float:
    if len(values) < 2:
        return float(values[0]) if values else 0.0
    return float(statistics.quantiles(values, n=100, method="inclusive")[q - 1])


def _preview(feed: Feed) -> str:
    lines = [
        f"Feed of user {feed.user_id} ({feed.events} events in 24 h), top 10 of {len(feed.items)}:",
        "",
        "| # | post | author | score |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {n} | {i['post_id']} | {i['author_id']} | {i['score']:.6g} |"
        for n, i in enumerate(feed.items[:10], start=1)
    ]
    return "\n".join(lines)


def build_warmed_feeds_asset(
    feed_ttl_sec: int = FEED_TTL_SEC, *, pool: str = CLICKHOUSE_POOL
) -> dg.AssetsDefinition:
    """The asset that keeps `{prefix}feed:{user_id}` warm for the most active users."""
    if feed_ttl_sec <= 0:
        raise ValueError(f"feed_ttl_sec must be positive, got {feed_ttl_sec}")
    freshness = (
        f"Refreshed every {REFRESH_SEC} s by {JOB_NAME} with a {feed_ttl_sec} s TTL, so an "
        "active user's key never expires while the job is healthy."
    )

    @cache_asset(
        name=ASSET_NAME,
        group="feeds",
        description=f"Feeds ({FEED_LENGTH} posts from followees, 72 h) of the {WARMED_USERS} "
        f"most active users of the last 24 h. {freshness}",
        refresh_sec=REFRESH_SEC,
        checks=checks(feed_ttl_sec),
        metadata={"cache_key_suffix": "feed:{user_id}", "ttl_seconds": feed_ttl_sec},
        pool=pool,
    )
    def _warmed_feeds(
        context: dg.AssetExecutionContext,
        config: AsOfConfig,
        clickhouse: ClickHouseResource,
        redis_cache: RedisCacheResource,
    ) -> dg.MaterializeResult:
        as_of = config.resolve(context)
        watch = Stopwatch()
        with watch.phase("query"):
            feeds = rank_feeds(clickhouse, as_of)
        generated_at = datetime.now(as_of.tzinfo)
        values = [feed_value(feed, as_of, generated_at) for feed in feeds]
        with watch.phase("write"):
            written = write_feeds(redis_cache, values, feed_ttl_sec)
        if not feeds:
            context.log.warning(
                f"No user had events in the 24 h before {iso_z(as_of)}: no feed was written, "
                "and keys of earlier runs expire on their TTL."
            )

        user_ids = [feed.user_id for feed in feeds]
        served, ttls = read_served(redis_cache, user_ids)
        # Verify what this run wrote and holds posts: empty feeds have nothing to verify, and a
        # feed kept from an earlier run was judged as of its own instant.
        sampled = check_sample(
            [u for u in user_ids if _items(served[u]) and served[u].get("as_of") == iso_z(as_of)],
            as_of,
        )
        followees, posts = contract_facts(clickhouse, {u: served[u] for u in sampled})
        verdicts = evaluate_checks(
            served,
            ttls,
            feed_ttl_sec=feed_ttl_sec,
            as_of=as_of,
            followees=followees,
            posts=posts,
        )

        lengths = [len(feed.items) for feed in feeds]
        shown = next((feed for feed in feeds if feed.items), feeds[0] if feeds else None)
        return cache_result(
            {
                "dagster/row_count": len(feeds),
                "users_warmed": len(feeds),
                "empty_feeds": lengths.count(0),
                "items_written": sum(lengths),
                "keys_written": written,
                "kept_previous": len(feeds) - written,
                "feed_length_p50": _percentile(lengths, 50),
                "feed_length_p95": _percentile(lengths, 95),
                **watch.ms,
                "as_of": iso_z(as_of),
                "ttl_seconds": feed_ttl_sec,
                "freshness": freshness,
                "preview": dg.MetadataValue.md(_preview(shown) if shown else "No user warmed."),
            },
            verdicts,
            keys=[redis_cache.key("feed", u) for u in user_ids[:HEALING_SAMPLE]],
        )

    return _warmed_feeds


@dg.definitions
def defs() -> dg.Definitions:
    settings = load_settings()
    pool = asset_pool(ASSET_NAME, embedded=settings.embedded_clickhouse)
    return dg.Definitions(assets=[build_warmed_feeds_asset(settings.feed_ttl_sec, pool=pool)])
