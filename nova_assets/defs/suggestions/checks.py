"""The suggestions' asset checks: what they promise, and how a sample of served values is judged.

The run's last step reads a sample of the values Redis serves (`check_sample` spreads it over the
users) and the sampled users' live follows and blocks straight from the source tables, not from
the run's graph, so the checks do not trust the graph they judge.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from nova_assets.core.resources import ClickHouseResource
from nova_assets.defs.suggestions.ranking import TOP_SUGGESTIONS
from nova_assets.defs.suggestions.sql import LIVE_EXCLUSIONS_SQL

CHECK_SAMPLE_USERS = 100

CHECKS = {
    "no_excluded_suggestions": f"On a sample of {CHECK_SAMPLE_USERS} served users: nobody is "
    "suggested themselves, someone they follow, or anyone they blocked or who blocked them (live "
    "edges read from ClickHouse).",
    "at_most_20_per_user": f"No sampled user has more than {TOP_SUGGESTIONS} items.",
    "ordered_by_contract": "Items are ordered by mutuals desc, followers desc, user_id asc, each "
    "user once, so the fill (mutuals 0) comes after the ranked items.",
    "keys_have_ttl": "Every sampled user's key exists and carries a positive TTL.",
}
"""Check name → what it promises (the check's description in the UI)."""


@dataclass(frozen=True)
class Exclusions:
    """Who may not be suggested to each sampled user, read from the source tables."""

    followed: dict[int, set[int]]
    blocked: dict[int, set[int]]
    """Blocked by the user or blocking them."""


def live_exclusions(clickhouse: ClickHouseResource, user_ids: Sequence[int]) -> Exclusions:
    """The live follows and blocks (either way) of `user_ids`, straight from nova.follows/blocks."""
    followed: dict[int, set[int]] = {u: set() for u in user_ids}
    blocked: dict[int, set[int]] = {u: set() for u in user_ids}
    if not user_ids:
        return Exclusions(followed, blocked)
    rows = clickhouse.query_rows(LIVE_EXCLUSIONS_SQL, {"users": list(user_ids)})
    for row in rows:
        a, b, kind = int(row[0]), int(row[1]), row[2]
        if kind == "follows":
            followed[a].add(b)
            continue
        if a in blocked:
            blocked[a].add(b)
        if b in blocked:
            blocked[b].add(a)
    return Exclusions(followed, blocked)


def _sort_key(item: Mapping[str, Any]) -> tuple[int, int, int]:
    return (-item["mutuals"], -item["followers"], item["user_id"])


def evaluate_checks(
    served: Mapping[int, Mapping[str, Any] | None],
    *,
    exclusions: Exclusions,
    ttls: Mapping[int, int],
) -> dict[str, tuple[bool, dict[str, Any]]]:
    """Judge the values Redis serves for sampled users; maps each check to (passed, metadata).

    Args:
        served: Sampled user id → the value read from Redis (None when the key is missing).
        exclusions: The sampled users' live follows and blocks, from ClickHouse.
        ttls: Sampled user id → the key's TTL in seconds (Redis semantics: -2 missing, -1 none).
    """
    excluded, crowded, disordered = [], [], []
    for user_id, value in served.items():
        items = value["items"] if value else []
        followed = exclusions.followed.get(user_id, set())
        blocked = exclusions.blocked.get(user_id, set())
        for item in items:
            c = item["user_id"]
            reason = (
                "self"
                if c == user_id
                else "followed"
                if c in followed
                else "blocked"
                if c in blocked
                else None
            )
            if reason:
                excluded.append(f"{user_id}→{c} ({reason})")
        if len(items) > TOP_SUGGESTIONS:
            crowded.append(user_id)
        keys = [_sort_key(item) for item in items]
        if any(a >= b for a, b in pairwise(keys)):
            disordered.append(user_id)
    no_ttl = sorted(u for u in served if ttls.get(u, -2) <= 0)
    sampled = {"sampled_users": len(served)}
    return {
        "no_excluded_suggestions": (
            not excluded,
            sampled | {"violations": str(excluded[:20])},
        ),
        "at_most_20_per_user": (not crowded, sampled | {"users_over_20": str(crowded[:20])}),
        "ordered_by_contract": (
            not disordered,
            sampled | {"users_out_of_order": str(disordered[:20])},
        ),
        "keys_have_ttl": (not no_ttl, sampled | {"users_without_ttl": str(no_ttl[:20])}),
    }


def check_sample(user_ids: Sequence[int], size: int = CHECK_SAMPLE_USERS) -> list[int]:
    """Up to `size` users spread evenly over the served (ascending) ids: deterministic per run."""
    if len(user_ids) <= size:
        return list(user_ids)
    step = len(user_ids) / size
    return [user_ids[int(i * step)] for i in range(size)]
