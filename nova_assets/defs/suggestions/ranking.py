"""Who gets suggestions and what they are: the active users, and a chunk's ranked lists.

Both read ClickHouse: the active users from the events, the lists from a run's graph loaded into
the session (`graph.SessionGraph`), one query per chunk of users.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from nova_assets.core.contract import epoch_ms
from nova_assets.core.resources import ClickHouseResource
from nova_assets.defs.suggestions.sql import ACTIVE_USERS_SQL, RANKING_SQL

TOP_SUGGESTIONS = 20
ACTIVE_WINDOW = timedelta(days=7)


@dataclass(frozen=True)
class UserSuggestions:
    """One user's suggestions: `items` as the cache value holds them, ranked ones first."""

    user_id: int
    items: list[dict[str, int]]
    ranked: int
    """How many items are followees of followees; the rest is the most-followed fill."""

    @property
    def needed_fill(self) -> bool:
        return self.ranked < TOP_SUGGESTIONS


def active_users(
    clickhouse: ClickHouseResource, as_of: datetime, first: int = 0, last: int = 2**64 - 1
) -> list[int]:
    """Users with any event (of any type) in (as_of - 7 d, as_of], ascending.

    With `first` and `last`, only those between them (user ids, both included): a shard's users.
    """
    rows = clickhouse.query_rows(
        ACTIVE_USERS_SQL,
        {
            "start_ms": epoch_ms(as_of - ACTIVE_WINDOW),
            "as_of_ms": epoch_ms(as_of),
            "first": first,
            "last": last,
        },
    )
    return [int(row[0]) for row in rows]


def rank_users(clickhouse: ClickHouseResource, user_ids: Sequence[int]) -> list[UserSuggestions]:
    """Suggestions of `user_ids` in one query, by user id; needs `suggestion_graph` loaded."""
    if not user_ids:
        return []
    rows = clickhouse.query_rows(RANKING_SQL, {"users": list(user_ids), "top": TOP_SUGGESTIONS})
    return [
        UserSuggestions(
            user_id=int(user_id),
            items=[
                {"user_id": int(c), "mutuals": int(m), "followers": int(f)} for c, m, f in ranked
            ]
            + [{"user_id": int(c), "mutuals": 0, "followers": int(f)} for c, f in fill],
            ranked=len(ranked),
        )
        for user_id, ranked, fill in rows
    ]
