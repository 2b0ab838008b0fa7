"""Builders of small hand-made datasets in the real embedded ClickHouse, shared by the tests."""

from collections.abc import Iterable
from datetime import datetime, timedelta

from pydantic import Field, PrivateAttr

from nova_assets.core.contract import epoch_ms
from nova_assets.core.resources import ClickHouseResource
from nova_assets.local import seed

EVENT_COLUMNS = ["event_time", "user_id", "post_id", "event_type"]
POST_COLUMNS = ["post_id", "author_id", "created_at", "is_deleted", "updated_at"]
EDGE_COLUMNS = {
    "follows": ["follower_id", "followee_id", "is_deleted", "updated_at"],
    "blocks": ["blocker_id", "blocked_id", "is_deleted", "updated_at"],
}


HISTORY_TABLES = ("nova.posts", "nova.follows", "nova.blocks")


class SessionLosingClickHouse(ClickHouseResource):
    """The real engine, whose session is lost before chosen runs of one query.

    Before the n-th run of `query` named in `lose_before` (1-based, every attempt counted) the
    resource moves to a new session, as a request does that a balancer sends to another server:
    the query runs where the session's temporary tables do not exist.
    """

    query: str = Field(description="The query (its exact text) before which sessions are lost.")
    lose_before: list[int] = Field(description="Runs of `query` preceded by a lost session.")
    _runs: int = PrivateAttr(default=0)

    def query_rows(self, sql, parameters=None):
        if sql == self.query:
            self._runs += 1
            if self._runs in self.lose_before:
                self.renew_session()
        return super().query_rows(sql, parameters)


def reset(clickhouse: ClickHouseResource) -> None:
    """Create the schema if needed, empty every table, and keep every row a test inserts.

    ReplacingMergeTree collapses a key's rows when it merges parts, and within one insert block
    unless told not to. Tests stop both, so a query that did not resolve the latest row itself
    (argMax or FINAL) fails instead of passing by luck.
    """
    seed.create_schema(clickhouse)
    seed.truncate(clickhouse)
    for table in HISTORY_TABLES:
        clickhouse.command(f"SYSTEM STOP MERGES {table}")


def insert_events(
    clickhouse: ClickHouseResource, events: Iterable[tuple[datetime, int, int, str]]
) -> None:
    """Events as (event_time, user_id, post_id, event_type)."""
    rows = list(events)
    _insert_rows(clickhouse, "engagement_events", EVENT_COLUMNS, rows)


def insert_posts(
    clickhouse: ClickHouseResource, posts: Iterable[tuple[int, int, datetime, int, datetime]]
) -> None:
    """Post rows as (post_id, author_id, created_at, is_deleted, updated_at)."""
    _insert_rows(clickhouse, "posts", POST_COLUMNS, list(posts))


def insert_edges(
    clickhouse: ClickHouseResource, table: str, edges: Iterable[tuple[int, int, int, datetime]]
) -> None:
    """Follow or block rows as (from_id, to_id, is_deleted, updated_at)."""
    _insert_rows(clickhouse, table, EDGE_COLUMNS[table], list(edges))


def _insert_rows(clickhouse: ClickHouseResource, table: str, columns: list[str], rows: list[tuple]):
    if not rows:
        return
    exprs, parameters, arrays = [], {}, []
    for i, column in enumerate(columns):
        values = [row[i] for row in rows]
        if isinstance(values[0], datetime):
            parameters[f"c{i}"] = [epoch_ms(v) for v in values]
            arrays.append(f"{{c{i}:Array(Int64)}}")
            exprs.append(f"fromUnixTimestamp64Milli(t.{i + 1}, 'UTC') AS {column}")
        elif isinstance(values[0], str):
            parameters[f"c{i}"] = values
            arrays.append(f"{{c{i}:Array(String)}}")
            exprs.append(f"t.{i + 1} AS {column}")
        else:
            parameters[f"c{i}"] = values
            arrays.append(f"{{c{i}:Array(UInt64)}}")
            exprs.append(f"t.{i + 1} AS {column}")
    clickhouse.command(
        f"INSERT INTO nova.{table} ({', '.join(columns)}) "
        f"SELECT {', '.join(exprs)} FROM (SELECT arrayJoin(arrayZip({', '.join(arrays)})) AS t) "
        "SETTINGS optimize_on_insert = 0",
        parameters,
    )


def post(post_id: int, author_id: int, created_at: datetime, *, deleted_at: datetime | None = None):
    """The rows of one post: created live, optionally deleted later by a newer row."""
    rows = [(post_id, author_id, created_at, 0, created_at)]
    if deleted_at is not None:
        rows.append((post_id, author_id, created_at, 1, deleted_at))
    return rows


def ago(as_of: datetime, **delta: float) -> datetime:
    return as_of - timedelta(**delta)
