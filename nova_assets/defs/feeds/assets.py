"""Warmed feeds of the most active users: ranked, written and checked (docs/design.md §3-4).

ClickHouse picks the warmed users and ranks every one of their feeds at once (`ranking.py`); the
values go to `{prefix}feed:{user_id}` in pipelines, at most 20 in flight, each key with its TTL in
the same command. The checks then judge what Redis serves, against ClickHouse for a sample of users
(`checks.py`). This module holds the writing and the asset.
"""

import statistics
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import datetime
from typing import Any

import dagster as dg

from nova_assets.core.cache_asset import (
    HEALING_SAMPLE,
    Stopwatch,
    asset_pool,
    cache_asset,
    cache_result,
)
from nova_assets.core.contract import AsOfConfig, iso_z
from nova_assets.core.jobs import FEEDS_ASSET, FEEDS_JOB, FEEDS_REFRESH_SEC
from nova_assets.core.resources import CLICKHOUSE_POOL, ClickHouseResource, RedisCacheResource
from nova_assets.core.settings import load_settings
from nova_assets.defs.feeds.checks import (
    check_sample,
    checks,
    contract_facts,
    evaluate_checks,
    feed_items,
    read_served,
)
from nova_assets.defs.feeds.ranking import Feed, rank_feeds
from nova_assets.defs.feeds.sql import FEED_LENGTH, WARMED_USERS

FEED_TTL_SEC = 120
"""Default TTL of a feed key: two refreshes, so a healthy schedule rewrites it before it expires."""

WRITERS = 20
"""Pipelines in flight at once (docs/design.md §3: at most 20 writers)."""
WRITE_BATCH = 50
"""Feeds per pipeline: 1000 users make 20 pipelines, one per writer."""


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
        f"Refreshed every {FEEDS_REFRESH_SEC} s by {FEEDS_JOB} with a {feed_ttl_sec} s TTL, so an "
        "active user's key never expires while the job is healthy."
    )

    @cache_asset(
        name=FEEDS_ASSET,
        group="feeds",
        description=f"Feeds ({FEED_LENGTH} posts from followees, 72 h) of the {WARMED_USERS} "
        f"most active users of the last 24 h. {freshness}",
        refresh_sec=FEEDS_REFRESH_SEC,
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
            [
                u
                for u in user_ids
                if feed_items(served[u]) and served[u].get("as_of") == iso_z(as_of)
            ],
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
    pool = asset_pool(FEEDS_ASSET, embedded=settings.embedded_clickhouse)
    return dg.Definitions(assets=[build_warmed_feeds_asset(settings.feed_ttl_sec, pool=pool)])
