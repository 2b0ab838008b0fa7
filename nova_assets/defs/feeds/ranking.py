"""Whose feeds are warmed and what they hold: every warmed user's feed, ranked in one session.

Three statements stage the run's tables in the ClickHouse session (`sql.STAGES`), then one query
(`sql.FEEDS_SQL`) picks the warmed users and ranks all their feeds at once.
"""

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nova_assets.core.jobs import FEEDS_ASSET
from nova_assets.core.resources import ClickHouseResource, session_tables_lost
from nova_assets.defs.feeds.sql import FEEDS_SQL, STAGES, WARMED_USERS, feeds_parameters


@dataclass(frozen=True)
class Feed:
    """One warmed user's feed: the `items` of the cache value, best first."""

    user_id: int
    events: int
    """The user's raw event count in the last 24 h (why they were warmed)."""
    items: list[dict[str, Any]]


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
            f"{FEEDS_ASSET}: the ClickHouse session holding the run's tables ({', '.join(tables)}) "
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
