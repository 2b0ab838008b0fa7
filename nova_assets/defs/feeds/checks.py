"""The warmed feeds' checks: what Redis serves, judged against ClickHouse for a sample of users."""

import json
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nova_assets.core.contract import epoch_ms
from nova_assets.core.resources import ClickHouseResource, RedisCacheResource
from nova_assets.defs.feeds.sql import (
    FEED_LENGTH,
    FEED_WINDOW,
    LIVE_FOLLOWEES_SQL,
    POST_STATES_SQL,
)

CHECK_SAMPLE = 50
"""Users whose served feeds are verified against ClickHouse on every run."""


@dataclass(frozen=True)
class PostState:
    """A post's latest row, as the contract check reads it."""

    author_id: int
    created_ms: int
    is_deleted: bool


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
            for item in feed_items(value)
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


def feed_items(value: dict[str, Any] | None) -> list[dict[str, Any]]:
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
        for item in feed_items(served.get(user_id)):
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
        items = feed_items(value)
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
