"""Suggested users: whom each active user might follow, and how (docs/design.md §3-4).

Every user with an event in the 7 days up to `as_of` gets up to 20 suggestions: the followees of
their followees, ranked by mutuals (how many of their followees follow the candidate), then by
the candidate's followers, then by user id; topped up, when fewer than 20, with the most followed
users. Nobody is suggested themselves, someone they follow, or anyone blocked either way.

How the work is split, in three kinds of step of one run (a graph-backed asset; run config
goes to the graph, `{"ops": {OP_NAME: {"config": {"as_of": …}}}}`, and on to its first step):

1. `plan_suggestions` finds the active users and builds the run's graph once, into tables of its
   own in WORK_DATABASE named after the run: each user's followees with each followee's follower
   count alongside (two arrays per user, 16 bytes per edge), the blocked users either way, and
   the most followed users for the fill. Resolving the latest row of five million edges is the
   expensive part; it is done once per run, not once per shard. It then splits the users, in
   ascending order, into shards of SHARD_USERS.
2. One `rank_suggestions` step per shard (Dagster's dynamic fan-out) copies the graph into Join
   tables of its ClickHouse session, which `joinGet` reads like a dictionary, and ranks its users
   in chunks of CHUNK_USERS, one query each, from those tables alone. A session can be lost (a
   balancer that sends a new connection to another server, a server restart, a session expired):
   its tables are then gone, and the ranking query says so (`UNKNOWN_TABLE` naming them,
   `SESSION_NOT_FOUND`, `SESSION_IS_LOCKED`); `SessionGraph` copies the graph into a new session
   and ranks the chunk again, which gives the same lists. Only when the session is lost
   `MAX_SESSION_LOSSES` times in a row does the step fail, as a transient fault that the retry
   policy retries; a failed shard is retried alone.
3. `finish_suggestions` adds the shards up, checks a sample of the values Redis serves, and drops
   the run's graph (a run that never gets there leaves it to the next run's plan, which drops the
   graphs of finished runs).

Every step takes a slot of the ClickHouse pool and lets it go when done, closing its connection:
on the embedded engine, which admits one process at a time, the every-minute jobs run between
shards. On a server the shards take no slot and run side by side, SHARDS_IN_PARALLEL at once.

Each chunk is written before the next is ranked: batches of 100 users, one Redis pipeline each,
at most 10 in flight. Every key is written whole with its TTL in one command, so a shard that
stops between chunks (a failure, a retry, a termination) leaves each key either its old or its
new value; a retried shard rewrites its keys from scratch.

Edges are the latest row of each pair, as of now (like posts in trending, see the README): the
graph has no history to rewind to `as_of`. Ties of `updated_at` follow `core.sources`: when in
doubt, claim no follow and suggest no one across a block. (A background merge of tied rows keeps
the last inserted one instead; the rule decides only while both rows are still there.)
"""

import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any, TypeVar

import dagster as dg

from nova_assets.core.cache_asset import (
    asset_out,
    asset_pool,
    cache_asset_spec,
    cache_result,
    check_specs,
    with_reason,
)
from nova_assets.core.contract import (
    STEP_RETRY_POLICY,
    AsOfConfig,
    clickhouse_error_code,
    epoch_ms,
    fail_fast_on_permanent_faults,
    iso_z,
)
from nova_assets.core.jobs import (
    SUGGESTIONS_ASSET,
    SUGGESTIONS_JOB,
    SUGGESTIONS_OP,
)
from nova_assets.core.resources import (
    CLICKHOUSE_POOL,
    UNKNOWN_TABLE,
    ClickHouseResource,
    RedisCacheResource,
    names_in_error,
    releases_engine,
    session_tables_lost,
)
from nova_assets.core.settings import load_settings
from nova_assets.core.sources import BLOCKS, ENGAGEMENT_EVENTS, FOLLOWS, in_window

ASSET_NAME = SUGGESTIONS_ASSET
JOB_NAME = SUGGESTIONS_JOB
OP_NAME = SUGGESTIONS_OP
"""The asset's graph of steps, under which run config goes:
{"ops": {OP_NAME: {"config": {"as_of": …}}}}, handed on to its first step."""
PLAN_OP = "plan_suggestions"
SHARD_OP = "rank_suggestions"
FINISH_OP = "finish_suggestions"

TOP_SUGGESTIONS = 20
ACTIVE_WINDOW = timedelta(days=7)
DEFAULT_TTL_SEC = 86_400
CHUNK_USERS = 2000
"""Users ranked per ClickHouse query; a chunk is written completely before the next is ranked."""
SHARD_USERS = 20_000
"""Users per shard (SUGGESTION_SHARD_USERS): one step that takes the ClickHouse slot, ranks and
writes them, and lets it go, so on the embedded engine the every-minute jobs run between shards
(about 10 s each on two cores)."""
SHARD_PRIORITY = -2
"""The shards' place in the pool's line: behind the caches' steps (priority 0) asking for the slot,
and behind the local demo traffic's (-1)."""
PRIORITY_TAG = "dagster/priority"
BATCH_USERS = 100
"""Users per Redis pipeline."""
WRITERS_IN_FLIGHT = 10
CHECK_SAMPLE_USERS = 100
SAMPLE_LISTS = 3

# The graph is built once per run into tables of its own (WORK_DATABASE, named after the run), so
# every shard, in whatever process or session it runs, ranks from the same graph without building
# it again; each shard copies it into Join tables of its session, which `joinGet` reads like a
# dictionary. Names are constants and a run id's hex digits, never input.
WORK_DATABASE = "nova_work"
"""Where runs keep their graph between shards; dropped by the run's last step, or by a later run
once the run that built it has finished."""
_GRAPH_PREFIX = f"{ASSET_NAME}_graph_"
_GRAPH_PARTS = ("follows", "blocked", "most_followed")
_GRAPH_ID = re.compile(r"^[0-9a-f]{32}$")

# The session's tables: the follower counts while building, the graph's Join tables while ranking.
_COUNTS = "suggested_users_follower_counts"
_FOLLOWS = "suggested_users_follows"
_BLOCKED = "suggested_users_blocked"
_MOST_FOLLOWED = "suggested_users_most_followed"
_TEMPORARY_TABLES = (_COUNTS, _FOLLOWS, _BLOCKED, _MOST_FOLLOWED)

MAX_SESSION_LOSSES = 3
"""Sessions lost in a row (no chunk ranked in between) before the step gives up and retries."""

_LIVE_FOLLOWS_SQL = FOLLOWS.live_edges()
_LIVE_BLOCKS_SQL = BLOCKS.live_edges()


def graph_table(graph_id: str, part: str) -> str:
    """The table holding one part of a run's graph (`part` is one of _GRAPH_PARTS)."""
    if not _GRAPH_ID.match(graph_id) or part not in _GRAPH_PARTS:
        raise ValueError(f"not a suggestion graph table: {graph_id!r}, {part!r}")
    return f"{WORK_DATABASE}.{_GRAPH_PREFIX}{graph_id}_{part}"


_BUILD_SETTINGS = (
    "optimize_aggregation_in_order = 1, max_block_size = 8192, "
    "min_insert_block_size_bytes = 16777216"
)
"""Settings of the graph's build. Measured at 300k users (14.9M edges) on fresh data, the build's
peak went from 1,590 to 1,018 MiB and its time from 15.3 to 11.2 s: blocks of 8,192 rows, not
65,505, through the in-order aggregation (the counts query's peak grew 300 MiB, not 1,100), and
rows of up to 56 followees written in blocks of at most 16 MiB, not a million rows."""


def _build_statements(graph_id: str) -> list[str]:
    """The statements that build a run's graph tables, in order (after any old ones are dropped).

    Each user's followees come with each followee's live follower count alongside, looked up in a
    small Join table of counts: one array pair per user, 12 bytes per edge. Resolving each edge's
    latest row goes in the order of the follows table's key (`optimize_aggregation_in_order`), so
    it streams instead of holding every edge in a hash table; `_BUILD_SETTINGS` keeps the blocks
    of that stream, and of the rows written, small.
    """
    follows, blocked = graph_table(graph_id, "follows"), graph_table(graph_id, "blocked")
    return [
        f"DROP TEMPORARY TABLE IF EXISTS {_COUNTS}",
        f"""
        CREATE TEMPORARY TABLE {_COUNTS} (user_id UInt64, followers UInt32)
        ENGINE = Join(ANY, LEFT, user_id) AS
        SELECT followee_id, count() FROM ({_LIVE_FOLLOWS_SQL}) GROUP BY followee_id
        SETTINGS {_BUILD_SETTINGS}""",
        f"""
        CREATE TABLE {follows}
        (user_id UInt64, followees Array(UInt64), followee_followers Array(UInt32))
        ENGINE = MergeTree ORDER BY user_id AS
        SELECT
            follower_id,
            groupArray(followee_id) AS followees,
            arrayMap(f -> joinGet('{_COUNTS}', 'followers', f), followees)
        FROM ({_LIVE_FOLLOWS_SQL})
        GROUP BY follower_id
        SETTINGS {_BUILD_SETTINGS}""",
        # Everyone a user blocked or was blocked by.
        f"""
        CREATE TABLE {blocked} (user_id UInt64, blocked Array(UInt64))
        ENGINE = MergeTree ORDER BY user_id AS
        SELECT user_id, groupUniqArray(other)
        FROM (
            SELECT blocker_id AS user_id, blocked_id AS other FROM ({_LIVE_BLOCKS_SQL})
            UNION ALL
            SELECT blocked_id, blocker_id FROM ({_LIVE_BLOCKS_SQL})
        )
        GROUP BY user_id""",
    ]


def _graph_size_sql(graph_id: str) -> str:
    follows, blocked = graph_table(graph_id, "follows"), graph_table(graph_id, "blocked")
    return f"""
    SELECT
        (SELECT sum(length(followees)) FROM {follows}),
        (SELECT count() FROM ({_LIVE_BLOCKS_SQL})),
        (SELECT max(n) FROM (
            SELECT user_id, sum(n) AS n
            FROM (
                SELECT user_id, length(followees) AS n FROM {follows}
                UNION ALL SELECT user_id, length(blocked) FROM {blocked}
            )
            GROUP BY user_id
        ))
    """


# The fill's source, best first: a user's fill comes from the first TOP + |excluded| entries
# (at worst every excluded user is among them), so the list needs no more than the largest
# exclusion list; `fill_pool_size` below says how many that is.
def _most_followed_statement(graph_id: str) -> str:
    return f"""
    CREATE TABLE {graph_table(graph_id, "most_followed")} ENGINE = MergeTree ORDER BY tuple() AS
    SELECT arraySort(x -> (-x.2, x.1), groupArray((user_id, followers))) AS most_followed
    FROM (
        SELECT user_id, followers
        FROM {_COUNTS}
        ORDER BY followers DESC, user_id ASC
        LIMIT {{pool_size:UInt64}}
    )
    """


def _load_statements(graph_id: str) -> list[str]:
    """The statements that copy a run's graph into Join tables of the current session."""
    return [
        f"""
        CREATE TEMPORARY TABLE {_FOLLOWS}
        (user_id UInt64, followees Array(UInt64), followee_followers Array(UInt32))
        ENGINE = Join(ANY, LEFT, user_id) AS
        SELECT user_id, followees, followee_followers FROM {graph_table(graph_id, "follows")}""",
        f"""
        CREATE TEMPORARY TABLE {_BLOCKED} (user_id UInt64, blocked Array(UInt64))
        ENGINE = Join(ANY, LEFT, user_id) AS
        SELECT user_id, blocked FROM {graph_table(graph_id, "blocked")}""",
        f"""
        CREATE TEMPORARY TABLE {_MOST_FOLLOWED} ENGINE = Memory AS
        SELECT most_followed FROM {graph_table(graph_id, "most_followed")}""",
    ]


ACTIVE_USERS_SQL = f"""
SELECT DISTINCT user_id
FROM {ENGAGEMENT_EVENTS}
WHERE {in_window("event_time")}
ORDER BY user_id
"""

# One query ranks a chunk of users, one row each, with per-user arrays rather than one big
# GROUP BY (user, candidate): every user's paths u → f → c stay in a small array that is counted
# and sorted in cache, and numbers_mt with small blocks spreads the users over every core.
#
# `path_ends` lists c once per path (c's id; `path_followers` alongside holds c's follower count).
# arrayEnumerateUniq numbers each value's occurrences, so after the excluded users (u, F(u) and
# the blocked) are put in front, a 1 marks a candidate's first path when it is not excluded; the
# same numbering on the reversed array counts, at that first path, every path to c: its mutuals.
# The candidates are partially sorted by (mutuals desc, followers desc, id asc) and cut to TOP.
#
# The fill, only for users with fewer than TOP: the head of the most followed list long enough
# to survive the exclusions, minus the excluded and the already ranked (the same numbering
# trick), in order, cut to what is missing.
RANKING_SQL = f"""
WITH (SELECT most_followed FROM {_MOST_FOLLOWED}) AS most_followed
SELECT
    user_id,
    ranked,
    if(
        length(ranked) < {{top:UInt32}},
        arraySlice(
            arrayFilter(
                (x, first) -> first = 1,
                arraySlice(most_followed, 1, {{top:UInt32}} + length(excluded)) AS pool_head,
                arraySlice(
                    arrayEnumerateUniq(arrayConcat(
                        excluded, arrayMap(x -> x.1, ranked), arrayMap(x -> x.1, pool_head))),
                    length(excluded) + length(ranked) + 1)),
            1,
            {{top:UInt32}} - length(ranked)),
        []) AS fill
FROM (
    SELECT
        user_id,
        joinGet('{_FOLLOWS}', 'followees', user_id) AS followees,
        arrayConcat([user_id], followees, joinGet('{_BLOCKED}', 'blocked', user_id)) AS excluded,
        arrayFlatten(arrayMap(f -> joinGet('{_FOLLOWS}', 'followees', f), followees))
            AS path_ends,
        arrayFlatten(arrayMap(f -> joinGet('{_FOLLOWS}', 'followee_followers', f), followees))
            AS path_followers,
        arraySlice(
            arrayEnumerateUniq(arrayConcat(excluded, path_ends)), length(excluded) + 1)
            AS first_path,
        arrayReverse(arrayEnumerateUniq(arrayReverse(path_ends))) AS paths_from_here,
        arraySlice(
            arrayPartialSort(
                x -> (-x.2, -x.3, x.1),
                {{top:UInt32}},
                arrayFilter(
                    (x, first) -> first = 1,
                    arrayZip(path_ends, paths_from_here, path_followers),
                    first_path)),
            1,
            {{top:UInt32}}) AS ranked
    FROM (
        SELECT {{users:Array(UInt64)}}[number + 1] AS user_id
        FROM numbers_mt(length({{users:Array(UInt64)}}))
    )
)
ORDER BY user_id
SETTINGS max_block_size = 128
"""


@dataclass(frozen=True)
class Graph:
    """The sizes of a run's graph, as `build_graph` built it."""

    live_follows: int
    live_blocks: int
    fill_pool_size: int


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


def build_graph(clickhouse: ClickHouseResource, graph_id: str) -> Graph:
    """Build a run's graph tables from the live edges: the expensive part, once per run."""
    ensure_work_database(clickhouse)
    drop_graph(clickhouse, graph_id)
    for statement in _build_statements(graph_id):
        clickhouse.command(statement)
    [(follows, blocks, largest_exclusion)] = clickhouse.query_rows(_graph_size_sql(graph_id))
    # u itself, F(u) and B(u) may all sit in the list ahead of the fill, with TOP after them.
    pool_size = TOP_SUGGESTIONS + 1 + int(largest_exclusion or 0)
    clickhouse.command(_most_followed_statement(graph_id), {"pool_size": pool_size})
    clickhouse.command(f"DROP TEMPORARY TABLE IF EXISTS {_COUNTS}")
    return Graph(int(follows or 0), int(blocks), pool_size)


def ensure_work_database(clickhouse: ClickHouseResource) -> None:
    """Create WORK_DATABASE unless it exists.

    On a server an operator may have created it and granted no `CREATE DATABASE`.
    """
    [(exists,)] = clickhouse.query_rows(
        "SELECT count() FROM system.databases WHERE name = {db:String}", {"db": WORK_DATABASE}
    )
    if not exists:
        clickhouse.command(f"CREATE DATABASE IF NOT EXISTS {WORK_DATABASE}")


def drop_graph(clickhouse: ClickHouseResource, graph_id: str) -> None:
    for part in _GRAPH_PARTS:
        clickhouse.command(f"DROP TABLE IF EXISTS {graph_table(graph_id, part)}")


def graphs_in_storage(clickhouse: ClickHouseResource) -> set[str]:
    """The ids of every run graph in WORK_DATABASE (none if the database does not exist yet)."""
    rows = clickhouse.query_rows(
        "SELECT name FROM system.tables "
        "WHERE database = {db:String} AND startsWith(name, {p:String})",
        {"db": WORK_DATABASE, "p": _GRAPH_PREFIX},
    )
    ids = {str(name)[len(_GRAPH_PREFIX) :].rsplit("_", 1)[0] for (name,) in rows}
    return {graph_id for graph_id in ids if _GRAPH_ID.match(graph_id)}


def _drop_session_tables(clickhouse: ClickHouseResource) -> None:
    for table in _TEMPORARY_TABLES:
        clickhouse.command(f"DROP TEMPORARY TABLE IF EXISTS {table}")


def _load_graph(clickhouse: ClickHouseResource, graph_id: str) -> None:
    """Copy a run's graph into Join tables of the resource's current session."""
    _drop_session_tables(clickhouse)
    for statement in _load_statements(graph_id):
        clickhouse.command(statement)


def session_lost(exc: BaseException) -> str | None:
    """Why `exc` means the graph's session is gone (its name for the log), or None.

    Beyond the session's own tables, the run's graph missing means the same: it was built on one
    server and asked for on another.
    """
    reason = session_tables_lost(exc, _TEMPORARY_TABLES)
    if reason is None and clickhouse_error_code(exc) == UNKNOWN_TABLE:
        # Built on one server, asked for on another: the session's requests reach two servers.
        if any(name.startswith(_GRAPH_PREFIX) for name in names_in_error(exc)):
            return "UNKNOWN_TABLE: the run's graph is not on this server"
    return reason


class SessionLostError(RuntimeError):
    """The session holding the graph was lost again and again. Transient: the step is retried."""


T = TypeVar("T")


class SessionGraph:
    """A run's graph in Join tables of the resource's ClickHouse session.

    `rank` ranks a chunk from those tables; when the session turns out to be lost, the graph is
    copied again into a new session and the chunk ranked again.
    """

    def __init__(self, clickhouse: ClickHouseResource, graph_id: str, log: Any = None) -> None:
        self._clickhouse = clickhouse
        self._graph_id = graph_id
        self._log = log
        self._loaded = False
        self.sessions_lost = 0
        """How many times this shard found its session lost and copied the graph again."""

    def load(self) -> None:
        """Copy the graph into the current session (again into a new one if that one is lost)."""
        self._in_session(lambda: None)

    def rank(self, user_ids: Sequence[int]) -> list[UserSuggestions]:
        """`rank_users` from the session's tables, copying them again when the session was lost."""
        return self._in_session(lambda: rank_users(self._clickhouse, user_ids))

    def drop(self) -> None:
        """Drop the session's tables; a lost session has taken them already."""
        self._loaded = False
        try:
            _drop_session_tables(self._clickhouse)
        except Exception as exc:
            if session_lost(exc) is None:
                raise

    def _in_session(self, action: Callable[[], T]) -> T:
        losses = 0
        while True:
            try:
                if not self._loaded:
                    _load_graph(self._clickhouse, self._graph_id)
                    self._loaded = True
                return action()
            except Exception as exc:
                reason = session_lost(exc)
                if reason is None:
                    raise
                losses += 1
                if losses >= MAX_SESSION_LOSSES:
                    raise SessionLostError(
                        f"{ASSET_NAME}: the ClickHouse session holding the follow graph was lost "
                        f"{losses} times in a row ({reason}). The requests of one session must "
                        "reach one server: point CLICKHOUSE_URL at one server or replica, or at "
                        "a balancer that keeps a connection, or the session_id parameter, on one "
                        "server (deploy/README.md)."
                    ) from exc
                self.sessions_lost += 1
                self._loaded = False
                if self._log is not None:
                    self._log.warning(
                        f"{ASSET_NAME}: the ClickHouse session holding the graph was lost "
                        f"({reason}); copying it into a new session and ranking the chunk again."
                    )
                self._clickhouse.renew_session()


@contextmanager
def session_graph(
    clickhouse: ClickHouseResource, graph_id: str, log: Any = None
) -> Iterator[SessionGraph]:
    """A run's graph (`build_graph`) copied into the session for `rank_users`; dropped on exit."""
    graph = SessionGraph(clickhouse, graph_id, log)
    try:
        graph.load()
        yield graph
    finally:
        graph.drop()


@contextmanager
def suggestion_graph(clickhouse: ClickHouseResource, log: Any = None) -> Iterator[SessionGraph]:
    """Build a graph of its own and load it into the session, as a shard would.

    Both are dropped on exit. For rankings outside a run: the tests, the benchmarks.
    """
    graph_id = uuid.uuid4().hex
    try:
        build_graph(clickhouse, graph_id)
        with session_graph(clickhouse, graph_id, log) as graph:
            yield graph
    finally:
        drop_graph(clickhouse, graph_id)


def active_users(clickhouse: ClickHouseResource, as_of: datetime) -> list[int]:
    """Users with any event (of any type) in (as_of - 7 d, as_of], ascending."""
    rows = clickhouse.query_rows(
        ACTIVE_USERS_SQL,
        {"start_ms": epoch_ms(as_of - ACTIVE_WINDOW), "as_of_ms": epoch_ms(as_of)},
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


def cache_value(suggestions: UserSuggestions, as_of: datetime, generated_at: datetime) -> dict:
    return {
        "user_id": suggestions.user_id,
        "as_of": iso_z(as_of),
        "generated_at": iso_z(generated_at),
        "items": suggestions.items,
    }


@dataclass(frozen=True)
class BatchResult:
    written: int
    kept_previous: int


def write_batch(
    redis_cache: RedisCacheResource,
    batch: Sequence[UserSuggestions],
    as_of: datetime,
    generated_at: datetime,
    ttl_sec: int,
) -> BatchResult:
    """Write one batch in one pipeline, each key whole with its TTL.

    An empty list never replaces a non-empty one (docs/design.md §4): the resource sends those
    through its atomic replace, in the same pipeline.
    """
    key = redis_cache.key
    written = redis_cache.set_many_json(
        (key(ASSET_NAME, s.user_id), cache_value(s, as_of, generated_at), ttl_sec) for s in batch
    )
    return BatchResult(written=written, kept_previous=len(batch) - written)


def write_chunk(
    redis_cache: RedisCacheResource,
    writers: ThreadPoolExecutor,
    chunk: Sequence[UserSuggestions],
    as_of: datetime,
    ttl_sec: int,
) -> list[BatchResult]:
    """Write a chunk in batches of 100 users on the writer pool, and wait for all of them."""
    generated_at = datetime.now(UTC)
    futures: list[Future[BatchResult]] = [
        writers.submit(
            write_batch,
            redis_cache,
            chunk[i : i + BATCH_USERS],
            as_of,
            generated_at,
            ttl_sec,
        )
        for i in range(0, len(chunk), BATCH_USERS)
    ]
    try:
        return [future.result() for future in futures]
    except BaseException:
        # Batches not started yet are dropped; running ones finish (each key stays whole).
        for future in futures:
            future.cancel()
        raise


# -- checks -------------------------------------------------------------------------------------

_EITHER_SIDE = "blocker_id IN {users:Array(UInt64)} OR blocked_id IN {users:Array(UInt64)}"
LIVE_EXCLUSIONS_SQL = f"""
SELECT follower_id, followee_id, 'follows'
FROM ({FOLLOWS.live_edges("follower_id IN {users:Array(UInt64)}")})
UNION ALL
SELECT blocker_id, blocked_id, 'blocks'
FROM ({BLOCKS.live_edges(_EITHER_SIDE)})
"""


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


CHECKS = {
    "no_excluded_suggestions": f"On a sample of {CHECK_SAMPLE_USERS} served users: nobody is "
    "suggested themselves, someone they follow, or anyone they blocked or who blocked them (live "
    "edges read from ClickHouse).",
    "at_most_20_per_user": f"No sampled user has more than {TOP_SUGGESTIONS} items.",
    "ordered_by_contract": "Items are ordered by mutuals desc, followers desc, user_id asc, each "
    "user once, so the fill (mutuals 0) comes after the ranked items.",
    "keys_have_ttl": "Every sampled user's key exists and carries a positive TTL.",
}


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


def _sample_table(served: Mapping[int, Mapping[str, Any] | None]) -> str:
    lines = ["| user | # | suggested | mutuals | followers |", "|---:|---:|---:|---:|---:|"]
    shown = [(u, v) for u, v in served.items() if v and v["items"]][:SAMPLE_LISTS]
    for user_id, value in shown:
        lines += [
            f"| {user_id} | {n} | {i['user_id']} | {i['mutuals']} | {i['followers']} |"
            for n, i in enumerate(value["items"], start=1)
        ]
    return "\n".join(lines)


# -- the asset ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One step's share of a run: users to rank from the run's graph, as of one instant."""

    index: int
    count: int
    graph_id: str
    graph: Graph
    as_of: datetime
    user_ids: tuple[int, ...]
    started: float
    """When the run's plan began (epoch seconds): the materialization's time counts from it."""
    graph_s: float

    @property
    def name(self) -> str:
        return f"shard {self.index + 1}/{self.count}"


@dataclass
class ShardResult:
    """What one shard ranked and wrote; the last step adds them up."""

    shard: Shard
    ranking_s: float = 0.0
    users: int = 0
    suggestions: int = 0
    needing_fill: int = 0
    kept_previous: int = 0
    batches: int = 0
    sessions_lost: int = 0
    sample: tuple[int, ...] = ()

    def add(self, chunk: Sequence[UserSuggestions], results: Sequence[BatchResult]) -> None:
        self.users += len(chunk)
        self.suggestions += sum(len(s.items) for s in chunk)
        self.needing_fill += sum(s.needed_fill for s in chunk)
        self.kept_previous += sum(r.kept_previous for r in results)
        self.batches += len(results)

    def describe(self, started: float) -> str:
        elapsed = time.perf_counter() - started
        rate = self.users / elapsed if elapsed > 0 else 0.0
        total = len(self.shard.user_ids)
        left = (total - self.users) / rate if rate > 0 else 0.0
        return (
            f"{ASSET_NAME} {self.shard.name}: {self.users:,}/{total:,} users written "
            f"({self.users / max(total, 1):.0%}), {rate:,.0f} users/s, about {left:,.0f} s left"
        )


def plan_shards(
    users: Sequence[int],
    graph_id: str,
    graph: Graph,
    as_of: datetime,
    *,
    shard_users: int,
    started: float,
    graph_s: float,
) -> list[Shard]:
    """Split the active users (ascending) into shards of at most `shard_users`, at least one."""
    starts = range(0, max(len(users), 1), shard_users)
    return [
        Shard(
            i,
            len(starts),
            graph_id,
            graph,
            as_of,
            tuple(users[a : a + shard_users]),
            started,
            graph_s,
        )
        for i, a in enumerate(starts)
    ]


def suggest_shard(
    log: Any,
    clickhouse: ClickHouseResource,
    redis_cache: RedisCacheResource,
    shard: Shard,
    *,
    ttl_sec: int,
    chunk_users: int,
) -> ShardResult:
    """Rank and write a shard's users, chunk by chunk, from the run's graph; log after each."""
    result = ShardResult(shard)
    # Connect once here, so the writer threads share one client and its connection pool.
    redis_cache.client()
    users = shard.user_ids
    with (
        session_graph(clickhouse, shard.graph_id, log) as graph,
        ThreadPoolExecutor(WRITERS_IN_FLIGHT) as writers,
    ):
        started = time.perf_counter()
        # A chunk is ranked, then written completely, before the next one is ranked: the
        # boundary where a run can stop (or fail) with every key whole, old or new.
        for start in range(0, len(users), chunk_users):
            ranked_at = time.perf_counter()
            chunk = graph.rank(users[start : start + chunk_users])
            result.ranking_s += time.perf_counter() - ranked_at
            result.add(chunk, write_chunk(redis_cache, writers, chunk, shard.as_of, ttl_sec))
            log.info(result.describe(started))
        result.sessions_lost = graph.sessions_lost
    result.sample = tuple(check_sample(users, -(-CHECK_SAMPLE_USERS // shard.count)))
    return result


def drop_finished_graphs(
    clickhouse: ClickHouseResource, instance: dg.DagsterInstance, keep: str, log: Any
) -> None:
    """Drop the graphs of runs that have finished, or that this instance does not know.

    A run that failed or was killed before its last step leaves its graph behind.
    """
    for graph_id in graphs_in_storage(clickhouse) - {keep}:
        run = instance.get_run_by_id(str(uuid.UUID(graph_id)))
        if run is None or run.is_finished:
            drop_graph(clickhouse, graph_id)
            log.info(f"{ASSET_NAME}: dropped the graph left by run {uuid.UUID(graph_id)}.")


def _check_outputs() -> dict[str, str]:
    """Check name → the graph output that carries its result."""
    return {check: f"{ASSET_NAME}_{check}" for check in CHECKS}


def build_suggested_users_asset(
    ttl_sec: int = DEFAULT_TTL_SEC,
    *,
    refresh_sec: int = 600,
    chunk_users: int = CHUNK_USERS,
    shard_users: int = SHARD_USERS,
    pool: str = CLICKHOUSE_POOL,
    shard_pool: str | None = CLICKHOUSE_POOL,
    retry_policy: dg.RetryPolicy = STEP_RETRY_POLICY,
) -> dg.AssetsDefinition:
    """The asset that keeps `{prefix}suggested_users:{user_id}` fresh for every active user.

    Three kinds of step, each taking a slot of `pool` (the shards of `shard_pool`) and letting it
    go when done: `plan_suggestions` finds the active users and builds the run's graph; one
    `rank_suggestions` per shard of users ranks and writes them; `finish_suggestions` adds up,
    checks a sample and drops the graph. Between steps other runs take the slot, so the
    every-minute jobs go on during a long run, and a failed shard is retried alone.
    """
    if ttl_sec <= 0 or chunk_users <= 0 or shard_users <= 0:
        raise ValueError(
            f"suggested_users needs a positive TTL, chunk and shard size, got ttl_sec={ttl_sec}, "
            f"chunk_users={chunk_users}, shard_users={shard_users} (SUGGESTION_TTL_SEC sets the "
            "TTL)"
        )
    spec = cache_asset_spec(
        name=ASSET_NAME,
        group="suggestions",
        description=f"Up to {TOP_SUGGESTIONS} users to follow for everyone active in the last 7 "
        "days: followees of their followees by mutuals, then the most followed.",
        refresh_sec=refresh_sec,
        metadata={"cache_key_pattern": f"{ASSET_NAME}:{{user_id}}", "ttl_seconds": ttl_sec},
    )
    check_outputs = _check_outputs()

    @dg.op(
        name=PLAN_OP,
        out=dg.DynamicOut(Shard),
        pool=pool,
        retry_policy=retry_policy,
        description="Finds the active users and builds the run's follow graph, once per run.",
    )
    @releases_engine
    @fail_fast_on_permanent_faults
    def plan(
        context: dg.OpExecutionContext, config: AsOfConfig, clickhouse: ClickHouseResource
    ) -> list[dg.DynamicOutput]:
        started = time.time()
        as_of = config.resolve(context)
        users = active_users(clickhouse, as_of)
        graph_id = context.run_id.replace("-", "")
        drop_finished_graphs(clickhouse, context.instance, graph_id, context.log)
        built_at = time.perf_counter()
        graph = build_graph(clickhouse, graph_id)
        graph_s = time.perf_counter() - built_at
        shards = plan_shards(
            users,
            graph_id,
            graph,
            as_of,
            shard_users=shard_users,
            started=started,
            graph_s=graph_s,
        )
        context.log.info(
            f"{ASSET_NAME}: {len(users):,} active users as of {iso_z(as_of)} in {len(shards)} "
            f"shards; live graph of {graph.live_follows:,} follows and {graph.live_blocks:,} "
            f"blocks built in {graph_s:.1f} s"
        )
        return [dg.DynamicOutput(s, mapping_key=f"shard_{s.index}") for s in shards]

    # A run's waiting shards all hold places in the pool's line; at a lower priority, a step of
    # another run that asks meanwhile (an every-minute job) goes before the next shard.
    @dg.op(
        name=SHARD_OP,
        pool=shard_pool,
        tags={PRIORITY_TAG: str(SHARD_PRIORITY)},
        retry_policy=retry_policy,
        description="Ranks and writes one shard of the active users from the run's graph.",
    )
    @releases_engine
    @fail_fast_on_permanent_faults
    def rank_shard(
        context: dg.OpExecutionContext,
        shard: Shard,
        clickhouse: ClickHouseResource,
        redis_cache: RedisCacheResource,
    ) -> ShardResult:
        return suggest_shard(
            context.log, clickhouse, redis_cache, shard, ttl_sec=ttl_sec, chunk_users=chunk_users
        )

    @dg.op(
        name=FINISH_OP,
        out={"result": dg.Out(dg.Nothing)}
        | {output: dg.Out(dg.Nothing) for output in check_outputs.values()},
        pool=pool,
        retry_policy=retry_policy,
        description="Adds up the shards, checks a sample of the values and drops the graph.",
    )
    @releases_engine
    @fail_fast_on_permanent_faults
    def finish(
        context: dg.OpExecutionContext,
        results: list[ShardResult],
        clickhouse: ClickHouseResource,
        redis_cache: RedisCacheResource,
    ) -> Iterator[dg.Output | dg.AssetCheckResult]:
        materialization = _finish(context, results, clickhouse, redis_cache)
        yield dg.Output(None, "result", metadata=materialization.metadata)
        yield from materialization.check_results or []

    @dg.config_mapping
    def as_of_for_plan(config: AsOfConfig) -> dict[str, Any]:
        return {PLAN_OP: {"config": {"as_of": config.as_of}}}

    # The graph is named apart from the asset: the job is called suggested_users too
    # (docs/design.md §5), and Dagster wants node and job names distinct within a location.
    @dg.graph_multi_asset(
        name=OP_NAME,
        outs={"result": asset_out(spec)},
        group_name=spec.group_name,
        check_specs=check_specs(spec.key, CHECKS),
        config=as_of_for_plan,
    )
    def _suggested_users() -> dict[str, Any]:
        outputs = finish(plan().map(rank_shard).collect())
        return {"result": outputs[0]} | {
            name: outputs[i] for i, name in enumerate(check_outputs.values(), start=1)
        }

    # A graph's outputs do not carry the new-style freshness policy over: set it on the spec.
    return _suggested_users.map_asset_specs(
        lambda s: s.replace_attributes(freshness_policy=spec.freshness_policy)
    )


def _finish(
    context: dg.OpExecutionContext,
    results: Sequence[ShardResult],
    clickhouse: ClickHouseResource,
    redis_cache: RedisCacheResource,
) -> dg.MaterializeResult:
    shards = sorted(results, key=lambda r: r.shard.index)
    first = shards[0].shard
    drop_graph(clickhouse, first.graph_id)
    users = sum(r.users for r in shards)
    kept_previous = sum(r.kept_previous for r in shards)
    seconds = time.time() - first.started
    if kept_previous:
        context.log.warning(
            f"{kept_previous:,} users' suggestions came out empty; their previous non-empty "
            "values were kept."
        )
    sample = [u for r in shards for u in r.sample]
    served = {u: redis_cache.get_json(redis_cache.key(ASSET_NAME, u)) for u in sample}
    verdicts = evaluate_checks(
        served,
        exclusions=live_exclusions(clickhouse, sample),
        ttls={u: redis_cache.ttl(redis_cache.key(ASSET_NAME, u)) for u in sample},
    )
    result = cache_result(
        {
            "dagster/row_count": users,
            "users_served": users,
            "suggestions_written": sum(r.suggestions for r in shards),
            "users_needing_fill": sum(r.needing_fill for r in shards),
            "users_kept_previous": kept_previous,
            "batches": sum(r.batches for r in shards),
            "shards": len(shards),
            "seconds": round(seconds, 2),
            "graph_load_seconds": round(first.graph_s, 2),
            "ranking_seconds": round(sum(r.ranking_s for r in shards), 2),
            "users_per_second": round(users / seconds, 1) if seconds else 0.0,
            "as_of": iso_z(first.as_of),
            "live_follow_edges": first.graph.live_follows,
            "live_block_edges": first.graph.live_blocks,
            "clickhouse_sessions_lost": sum(r.sessions_lost for r in shards),
            "sample": dg.MetadataValue.md(_sample_table(served)),
        },
        verdicts,
        keys=[redis_cache.key(ASSET_NAME, u) for u in sample],
    )
    return with_reason(context, result)


@dg.definitions
def defs() -> dg.Definitions:
    settings = load_settings()
    return dg.Definitions(
        assets=[
            build_suggested_users_asset(
                settings.suggestion_ttl_sec,
                refresh_sec=settings.suggestion_interval_sec,
                shard_users=settings.suggestion_shard_users,
                pool=asset_pool(ASSET_NAME, embedded=settings.embedded_clickhouse),
                # On a server the shards run side by side (the job's executor bounds how many);
                # the embedded engine takes them one at a time, between other runs' steps.
                shard_pool=CLICKHOUSE_POOL if settings.embedded_clickhouse else None,
            )
        ]
    )
