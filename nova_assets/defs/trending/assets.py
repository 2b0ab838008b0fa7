"""Trending posts over 1h, 24h and 7d: ranked, written and checked (docs/design.md §3-4).

One factory builds the three assets. Each computes its ranking in one ClickHouse query and
replaces `{prefix}trending:{window}` atomically; the checks then judge the value Redis serves.
"""

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import dagster as dg

from nova_assets.core.cache_asset import Stopwatch, asset_pool, cache_asset, cache_result
from nova_assets.core.contract import STEP_RETRY_POLICY, AsOfConfig, epoch_ms, iso_z
from nova_assets.core.jobs import Window, windows
from nova_assets.core.resources import CLICKHOUSE_POOL, ClickHouseResource, RedisCacheResource
from nova_assets.core.settings import load_settings
from nova_assets.core.sources import (
    ENGAGEMENT_EVENTS,
    EVENT_WEIGHT,
    POSTS,
    age_hours,
    in_window,
    instant,
    weight_parameters,
)

TOP_POSTS = 50
POSTS_PER_AUTHOR = 3
# Per-event terms of the score, shared by both passes below (constants, never input).
_IN_WINDOW = in_window("event_time")
_WEIGHT = EVENT_WEIGHT
# decay ^ age_h, written as exp(ln(decay) * age_h): the same value, a cheaper function.
_DECAY = f"exp({{ln_decay:Float64}} * {age_hours('event_time')})"

# One query ranks a window. Deduplicating every event of a 7-day window (one hash-table entry per
# user, post and type) is the expensive part, so it runs only on candidate posts:
#
# 1. `candidates`: every post's raw, undeduplicated score, which bounds its real score from
#    above, computed in one cheap pass grouped by post; the best {candidates} posts by that bound
#    are kept, with the lowest bound among them (no other post can score higher). The same pass
#    counts the window's events for the metadata: grouping sets add one row of totals (the empty
#    set, `grouping(post_id) = 1`), sorted first, rather than reading the window twice.
# 2. For those posts only: events deduplicated per (post, user, type) at their latest time, decayed
#    and summed; joined to the posts whose latest row (a deleting row winning a tie of
#    updated_at) is live and created by as_of; ordered,
#    capped per author and cut to the top.
#
# The result is exact when fewer posts than {candidates} had events, or when its last score beats
# the bound; `rank` checks that and otherwise ranks again with every post as a candidate.
RANKING_SQL = f"""
WITH (
    SELECT (
        arrayFilter((post, totals) -> NOT totals, groupArray(post_id), groupArray(totals)),
        minIf(bound, NOT totals),
        countIf(NOT totals),
        sumIf(events, totals),
        sumIf(weighted, totals))
    FROM (
        SELECT
            post_id,
            grouping(post_id) = 1 AS totals,
            sum({_WEIGHT} * {_DECAY}) AS bound,
            count() AS events,
            countIf({_WEIGHT} > 0) AS weighted
        FROM {ENGAGEMENT_EVENTS}
        WHERE {_IN_WINDOW}
        GROUP BY GROUPING SETS ((post_id), ())
        HAVING bound > 0 OR totals
        ORDER BY totals DESC, bound DESC, post_id ASC
        LIMIT {{candidates:UInt32}} + 1
    )
) AS candidates
SELECT
    s.post_id AS post_id,
    e.author_id AS author_id,
    s.score AS score,
    candidates.2 AS bound,
    candidates.3 AS candidate_count,
    candidates.4 AS scanned,
    candidates.5 AS weighted
FROM (
    SELECT post_id, sum(weight * latest_decay) AS score
    FROM (
        SELECT post_id, any({_WEIGHT}) AS weight, max({_DECAY}) AS latest_decay
        FROM {ENGAGEMENT_EVENTS}
        WHERE {_IN_WINDOW}
          AND post_id IN (SELECT arrayJoin(candidates.1))
          AND {_WEIGHT} > 0
        GROUP BY post_id, user_id, event_type
    )
    GROUP BY post_id
) AS s
INNER JOIN (
    SELECT post_id, {POSTS.latest("author_id")} AS author_id
    FROM {POSTS}
    WHERE post_id IN (SELECT arrayJoin(candidates.1))
    GROUP BY post_id
    HAVING {POSTS.live} AND {POSTS.latest("created_at")} <= {instant("as_of_ms")}
) AS e ON s.post_id = e.post_id
ORDER BY score DESC, post_id ASC
LIMIT {{per_author:UInt32}} BY author_id
LIMIT {{top:UInt32}}
"""

# The window's scanned and weighted events, for a ranking that came out empty.
EVENTS_IN_WINDOW_SQL = f"""
SELECT count(), countIf({_WEIGHT} > 0) FROM {ENGAGEMENT_EVENTS} WHERE {_IN_WINDOW}
"""

LIVE_POSTS_SQL = f"""
SELECT post_id
FROM {POSTS}
WHERE post_id IN {{post_ids:Array(UInt64)}}
GROUP BY post_id
HAVING {POSTS.live}
"""


CANDIDATES = 250
"""Posts ranked exactly in the first attempt; enough that the bound proves almost every ranking."""
ALL_POSTS = 2**32 - 1


@dataclass(frozen=True)
class Ranking:
    """A window's ranking and what it took to compute it."""

    items: list[dict[str, Any]]
    events_scanned: int
    weighted_events: int
    widened: bool
    """True when the candidates' bound could not prove the ranking and every post was ranked."""


def ranking_parameters(window: Window, as_of: datetime) -> dict[str, Any]:
    return {
        "start_ms": epoch_ms(as_of - window.length),
        "as_of_ms": epoch_ms(as_of),
        **weight_parameters(),
        "ln_decay": math.log(window.decay_per_hour),
        "per_author": POSTS_PER_AUTHOR,
        "top": TOP_POSTS,
    }


def _proven(rows: Sequence[tuple], candidates: int) -> bool:
    """Whether posts outside the candidates cannot change the ranking (see RANKING_SQL)."""
    if not rows:
        return False
    bound, candidate_count = rows[0][3], rows[0][4]
    return candidate_count < candidates or (len(rows) == TOP_POSTS and rows[-1][2] > bound)


def rank(
    clickhouse: ClickHouseResource,
    window: Window,
    as_of: datetime,
    *,
    candidates: int = CANDIDATES,
) -> Ranking:
    """The window's ranking as of `as_of`: the `items` of the cache value, best first."""
    parameters = ranking_parameters(window, as_of)
    rows = clickhouse.query_rows(RANKING_SQL, parameters | {"candidates": candidates})
    widened = not _proven(rows, candidates)
    if widened:
        rows = clickhouse.query_rows(RANKING_SQL, parameters | {"candidates": ALL_POSTS})
    if rows:
        scanned, weighted = rows[0][5], rows[0][6]
    else:
        scanned, weighted = clickhouse.query_rows(EVENTS_IN_WINDOW_SQL, parameters)[0]
    items = [
        {"rank": i, "post_id": int(row[0]), "author_id": int(row[1]), "score": float(row[2])}
        for i, row in enumerate(rows, start=1)
    ]
    return Ranking(items, int(scanned), int(weighted), widened)


CHECKS = {
    "scores_non_increasing": "Items are ordered by score, highest first.",
    "no_duplicate_posts": "No post appears twice.",
    "at_most_3_per_author": "No author has more than three posts in the list.",
    "posts_live": "Every post exists in ClickHouse and its latest row is not deleted.",
    "non_empty": "The ranking is not empty when the window had weighted events (WARN).",
    "key_has_ttl": "The cache key exists and carries a positive TTL.",
}


def evaluate_checks(
    items: Sequence[dict[str, Any]],
    *,
    live_post_ids: set[int],
    ttl: int,
    computed_empty: bool,
    weighted_events: int,
) -> dict[str, tuple[bool, dict[str, Any]]]:
    """Judge the served ranking; each entry maps a check name to (passed, metadata)."""
    scores = [item["score"] for item in items]
    drops = [i + 1 for i in range(len(scores) - 1) if scores[i + 1] > scores[i]]
    post_counts = Counter(item["post_id"] for item in items)
    duplicates = sorted(p for p, n in post_counts.items() if n > 1)
    author_counts = Counter(item["author_id"] for item in items)
    crowded = sorted(a for a, n in author_counts.items() if n > POSTS_PER_AUTHOR)
    dead = sorted({item["post_id"] for item in items} - live_post_ids)
    return {
        "scores_non_increasing": (not drops, {"out_of_order_ranks": str(drops[:20])}),
        "no_duplicate_posts": (not duplicates, {"duplicate_posts": str(duplicates[:20])}),
        "at_most_3_per_author": (not crowded, {"authors_over_cap": str(crowded[:20])}),
        "posts_live": (not dead, {"missing_or_deleted_posts": str(dead[:20])}),
        "non_empty": (
            not (computed_empty and weighted_events > 0),
            {"weighted_events_in_window": weighted_events},
        ),
        "key_has_ttl": (ttl > 0, {"ttl_seconds": ttl}),
    }


def live_posts(clickhouse: ClickHouseResource, post_ids: Sequence[int]) -> set[int]:
    if not post_ids:
        return set()
    rows = clickhouse.query_rows(LIVE_POSTS_SQL, {"post_ids": list(post_ids)})
    return {int(row[0]) for row in rows}


def _top_table(items: Sequence[dict[str, Any]]) -> str:
    lines = ["| rank | post | author | score |", "|---:|---:|---:|---:|"]
    lines += [
        f"| {i['rank']} | {i['post_id']} | {i['author_id']} | {i['score']:.6g} |" for i in items
    ]
    return "\n".join(lines)


def build_trending_asset(
    window: Window,
    retry_policy: dg.RetryPolicy = STEP_RETRY_POLICY,
    *,
    pool: str = CLICKHOUSE_POOL,
) -> dg.AssetsDefinition:
    """The asset that keeps `{prefix}trending:{window}` fresh."""

    @cache_asset(
        name=window.asset_name,
        group="trending",
        description=f"Top {TOP_POSTS} trending posts of the last {window.name}, decayed "
        f"{window.decay_per_hour} per hour, at most {POSTS_PER_AUTHOR} per author.",
        refresh_sec=window.refresh_sec,
        checks=CHECKS,
        metadata={"cache_key_suffix": f"trending:{window.name}", "ttl_seconds": window.ttl_sec},
        retry_policy=retry_policy,
        pool=pool,
    )
    def _trending(
        context: dg.AssetExecutionContext,
        config: AsOfConfig,
        clickhouse: ClickHouseResource,
        redis_cache: RedisCacheResource,
    ) -> dg.MaterializeResult:
        as_of = config.resolve(context)
        watch = Stopwatch()
        with watch.phase("query"):
            ranking = rank(clickhouse, window, as_of)
        key = redis_cache.key("trending", window.name)
        value = {
            "window": window.name,
            "as_of": iso_z(as_of),
            "generated_at": iso_z(datetime.now(as_of.tzinfo)),
            "items": ranking.items,
        }
        with watch.phase("write"):
            written = redis_cache.replace_ranking(key, value, window.ttl_sec)
        if not written:
            context.log.warning(
                f"The {window.name} ranking came out empty as of {iso_z(as_of)}; "
                f"kept the previous non-empty value of {key}."
            )

        served_items = (redis_cache.get_json(key) or {"items": []})["items"]
        verdicts = evaluate_checks(
            served_items,
            live_post_ids=live_posts(clickhouse, [i["post_id"] for i in served_items]),
            ttl=redis_cache.ttl(key),
            computed_empty=not ranking.items,
            weighted_events=ranking.weighted_events,
        )
        metadata = {
            "dagster/row_count": len(ranking.items),
            "as_of": iso_z(as_of),
            "cache_key": key,
            "top_10": dg.MetadataValue.md(_top_table(ranking.items[:10])),
            "events_scanned": ranking.events_scanned,
            "weighted_events": ranking.weighted_events,
            "widened_to_all_posts": ranking.widened,
            **watch.ms,
            "kept_previous": not written,
        }
        return cache_result(metadata, verdicts, keys=[key], warn={"non_empty"})

    return _trending


def build_trending_assets(
    trending_interval_sec: int = 60, *, embedded: bool = True
) -> list[dg.AssetsDefinition]:
    return [
        build_trending_asset(w, pool=asset_pool(w.asset_name, embedded=embedded))
        for w in windows(trending_interval_sec)
    ]


@dg.definitions
def defs() -> dg.Definitions:
    settings = load_settings()
    return dg.Definitions(
        assets=build_trending_assets(
            settings.trending_interval_sec, embedded=settings.embedded_clickhouse
        )
    )
