"""Suggested users: whom each active user might follow, and how (docs/design.md §3-4).

Every user with an event in the 7 days up to `as_of` gets up to 20 suggestions: the followees of
their followees, ranked by mutuals (how many of their followees follow the candidate), then by
the candidate's followers, then by user id; topped up, when fewer than 20, with the most followed
users. Nobody is suggested themselves, someone they follow, or anyone blocked either way.

How the work is split:

1. Once per run, `suggestion_graph` loads the live graph into temporary tables of the ClickHouse
   session: each user's followees (with their follower counts) and blocked users in `Join` tables
   that `joinGet` reads like a dictionary, and the most followed users for the fill. Resolving the
   latest row of five million edges takes a second; doing it once instead of in every query is
   what makes the chunks cheap.
2. `rank_users` ranks a chunk of users (2000 by default) in one query, from those tables alone.
   A session can be lost: a balancer that sends a new connection to another server, a server
   restart, a session expired. Its tables are then gone, and the ranking query says so
   (`UNKNOWN_TABLE` naming them, `SESSION_NOT_FOUND`, `SESSION_IS_LOCKED`): `SessionGraph`
   rebuilds the graph in a new session and ranks the chunk again, which gives the same lists.
   Only when the session is lost `MAX_SESSION_LOSSES` times in a row (requests of one session
   spread over servers) does the step fail, as a transient fault that the retry policy retries.
3. Each chunk is written before the next is ranked: batches of 100 users, one Redis pipeline
   each, at most 10 in flight. Every key is written whole with its TTL in one command, so a run
   that stops between chunks (a failure, a retry, a termination) leaves each key either its old or
   its new value; a retried step rewrites every key from scratch.

Edges are the latest row of each pair, as of now (like posts in trending, see the README): the
graph has no history to rewind to `as_of`. Ties of `updated_at` follow `core.sources`: when in
doubt, claim no follow and suggest no one across a block. (A background merge of tied rows keeps
the last inserted one instead; the rule decides only while both rows are still there.)
"""

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any, TypeVar

import dagster as dg

from nova_assets.core.cache_asset import asset_pool, cache_asset, cache_result
from nova_assets.core.contract import AsOfConfig, clickhouse_error_code, epoch_ms, iso_z
from nova_assets.core.resources import CLICKHOUSE_POOL, ClickHouseResource, RedisCacheResource
from nova_assets.core.settings import load_settings
from nova_assets.core.sources import BLOCKS, ENGAGEMENT_EVENTS, FOLLOWS, in_window

ASSET_NAME = "suggested_users"
JOB_NAME = "suggested_users"
OP_NAME = "compute_suggested_users"
"""The asset's op, under which run config goes: {"ops": {OP_NAME: {"config": {"as_of": …}}}}."""

TOP_SUGGESTIONS = 20
ACTIVE_WINDOW = timedelta(days=7)
DEFAULT_TTL_SEC = 86_400
CHUNK_USERS = 2000
"""Users ranked per ClickHouse query; a chunk is written completely before the next is ranked."""
BATCH_USERS = 100
"""Users per Redis pipeline."""
WRITERS_IN_FLIGHT = 10
CHECK_SAMPLE_USERS = 100
SAMPLE_LISTS = 3

# Temporary tables of the ClickHouse session, alive for one run (names are constants, never input).
_LIVE_FOLLOWS = "suggested_users_live_follows"
_LIVE_BLOCKS = "suggested_users_live_blocks"
_FOLLOWS = "suggested_users_follows"
_BLOCKED = "suggested_users_blocked"
_MOST_FOLLOWED = "suggested_users_most_followed"
_TEMPORARY_TABLES = (_LIVE_FOLLOWS, _LIVE_BLOCKS, _FOLLOWS, _BLOCKED, _MOST_FOLLOWED)

UNKNOWN_TABLE = 60
SESSION_LOST_CODES = {372: "SESSION_NOT_FOUND", 373: "SESSION_IS_LOCKED"}
"""ClickHouse errors that mean the session is gone or taken, whatever the query."""
MAX_SESSION_LOSSES = 3
"""Sessions lost in a row (no chunk ranked in between) before the step gives up and retries."""

_GRAPH_STATEMENTS = (
    # The live edges (core.sources breaks ties), self-edges dropped.
    f"CREATE TEMPORARY TABLE {_LIVE_FOLLOWS} ENGINE = Memory AS {FOLLOWS.live_edges()}",
    f"CREATE TEMPORARY TABLE {_LIVE_BLOCKS} ENGINE = Memory AS {BLOCKS.live_edges()}",
    # Each user's followees, with each followee's live follower count alongside.
    f"""
    CREATE TEMPORARY TABLE {_FOLLOWS}
    (user_id UInt64, followees Array(UInt64), followee_followers Array(UInt64))
    ENGINE = Join(ANY, LEFT, user_id) AS
    SELECT follower_id, arrayMap(e -> e.1, edges), arrayMap(e -> e.2, edges)
    FROM (
        SELECT follower_id, groupArray((followee_id, followers)) AS edges
        FROM {_LIVE_FOLLOWS}
        INNER JOIN (
            SELECT followee_id, count() AS followers FROM {_LIVE_FOLLOWS} GROUP BY followee_id
        ) AS counts USING followee_id
        GROUP BY follower_id
    )""",
    # Everyone a user blocked or was blocked by.
    f"""
    CREATE TEMPORARY TABLE {_BLOCKED} (user_id UInt64, blocked Array(UInt64))
    ENGINE = Join(ANY, LEFT, user_id) AS
    SELECT user_id, groupUniqArray(other)
    FROM (
        SELECT blocker_id AS user_id, blocked_id AS other FROM {_LIVE_BLOCKS}
        UNION ALL
        SELECT blocked_id, blocker_id FROM {_LIVE_BLOCKS}
    )
    GROUP BY user_id""",
)

_GRAPH_SIZE_SQL = f"""
SELECT
    (SELECT count() FROM {_LIVE_FOLLOWS}),
    (SELECT count() FROM {_LIVE_BLOCKS}),
    (SELECT max(n) FROM (
        SELECT user_id, count() AS n
        FROM (
            SELECT follower_id AS user_id FROM {_LIVE_FOLLOWS}
            UNION ALL SELECT blocker_id FROM {_LIVE_BLOCKS}
            UNION ALL SELECT blocked_id FROM {_LIVE_BLOCKS}
        )
        GROUP BY user_id
    ))
"""

# The fill's source, best first: a user's fill comes from the first TOP + |excluded| entries
# (at worst every excluded user is among them), so the list needs no more than the largest
# exclusion list; `fill_pool_size` below says how many that is.
_MOST_FOLLOWED_STATEMENT = f"""
CREATE TEMPORARY TABLE {_MOST_FOLLOWED} ENGINE = Memory AS
SELECT arraySort(x -> (-x.2, x.1), groupArray((user_id, followers))) AS most_followed
FROM (
    SELECT followee_id AS user_id, count() AS followers
    FROM {_LIVE_FOLLOWS}
    GROUP BY followee_id
    ORDER BY followers DESC, user_id ASC
    LIMIT {{pool_size:UInt64}}
)
"""

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
    """What `suggestion_graph` loaded for the run."""

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


def _drop_graph(clickhouse: ClickHouseResource) -> None:
    for table in _TEMPORARY_TABLES:
        clickhouse.command(f"DROP TEMPORARY TABLE IF EXISTS {table}")


def _load_graph(clickhouse: ClickHouseResource) -> Graph:
    """Build the graph's temporary tables in the resource's current session."""
    _drop_graph(clickhouse)
    for statement in _GRAPH_STATEMENTS:
        clickhouse.command(statement)
    [(follows, blocks, largest_exclusion)] = clickhouse.query_rows(_GRAPH_SIZE_SQL)
    # u itself, F(u) and B(u) may all sit in the list ahead of the fill, with TOP after them.
    pool_size = TOP_SUGGESTIONS + 1 + int(largest_exclusion or 0)
    clickhouse.command(_MOST_FOLLOWED_STATEMENT, {"pool_size": pool_size})
    for table in (_LIVE_FOLLOWS, _LIVE_BLOCKS):
        clickhouse.command(f"DROP TEMPORARY TABLE IF EXISTS {table}")
    return Graph(int(follows), int(blocks), pool_size)


def session_lost(exc: BaseException) -> str | None:
    """Why `exc` means the graph's session is gone (its name for the log), or None.

    `UNKNOWN_TABLE` counts only when it names one of the graph's own tables: a missing source
    table (`nova.follows`) stays the permanent schema fault it is.
    """
    code = clickhouse_error_code(exc)
    if code in SESSION_LOST_CODES:
        return SESSION_LOST_CODES[code]
    if code == UNKNOWN_TABLE and any(table in str(exc) for table in _TEMPORARY_TABLES):
        return "UNKNOWN_TABLE: the session's temporary tables are gone"
    return None


class SessionLostError(RuntimeError):
    """The session holding the graph was lost again and again. Transient: the step is retried."""


T = TypeVar("T")


class SessionGraph:
    """The live graph in temporary tables of the resource's ClickHouse session.

    `rank` ranks a chunk from those tables; when the session turns out to be lost, the graph is
    rebuilt in a new session and the chunk ranked again.
    """

    def __init__(self, clickhouse: ClickHouseResource, log: Any = None) -> None:
        self._clickhouse = clickhouse
        self._log = log
        self._graph: Graph | None = None
        self.sessions_lost = 0
        """How many times this run found its session lost and rebuilt the graph."""

    @property
    def graph(self) -> Graph:
        """The sizes of the graph last loaded."""
        if self._graph is None:
            raise RuntimeError("the suggestion graph is not loaded")
        return self._graph

    @property
    def live_follows(self) -> int:
        return self.graph.live_follows

    @property
    def live_blocks(self) -> int:
        return self.graph.live_blocks

    @property
    def fill_pool_size(self) -> int:
        return self.graph.fill_pool_size

    def load(self) -> Graph:
        """Build the graph in the current session (again in a new one if that one is lost)."""
        return self._in_session(lambda: self.graph)

    def rank(self, user_ids: Sequence[int]) -> list[UserSuggestions]:
        """`rank_users` from the graph's tables, rebuilding them when the session was lost."""
        return self._in_session(lambda: rank_users(self._clickhouse, user_ids))

    def drop(self) -> None:
        """Drop the graph's tables; a lost session has taken them already."""
        self._graph = None
        try:
            _drop_graph(self._clickhouse)
        except Exception as exc:
            if session_lost(exc) is None:
                raise

    def _in_session(self, action: Callable[[], T]) -> T:
        losses = 0
        while True:
            try:
                if self._graph is None:
                    self._graph = _load_graph(self._clickhouse)
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
                self._graph = None
                if self._log is not None:
                    self._log.warning(
                        f"{ASSET_NAME}: the ClickHouse session holding the graph was lost "
                        f"({reason}); rebuilding it in a new session and ranking the chunk again."
                    )
                self._clickhouse.renew_session()


@contextmanager
def suggestion_graph(clickhouse: ClickHouseResource, log: Any = None) -> Iterator[SessionGraph]:
    """Load the live follow and block graph into temporary tables for `rank_users`.

    The tables belong to the resource's ClickHouse session (the embedded engine's connection, or
    the HTTP session clickhouse-connect opens) and are dropped on exit. Rank through the yielded
    graph's `rank` to survive a lost session.
    """
    graph = SessionGraph(clickhouse, log)
    try:
        graph.load()
        yield graph
    finally:
        graph.drop()


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


@dataclass
class _Progress:
    """Running totals of a materialization, logged after every chunk."""

    total: int
    started: float
    graph_s: float = 0.0
    ranking_s: float = 0.0
    users: int = 0
    suggestions: int = 0
    needing_fill: int = 0
    kept_previous: int = 0
    batches: int = 0
    sessions_lost: int = 0

    def add(self, chunk: Sequence[UserSuggestions], results: Sequence[BatchResult]) -> None:
        self.users += len(chunk)
        self.suggestions += sum(len(s.items) for s in chunk)
        self.needing_fill += sum(s.needed_fill for s in chunk)
        self.kept_previous += sum(r.kept_previous for r in results)
        self.batches += len(results)

    def describe(self) -> str:
        elapsed = time.perf_counter() - self.started
        rate = self.users / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.users) / rate if rate > 0 else 0.0
        return (
            f"{ASSET_NAME}: {self.users:,}/{self.total:,} users written "
            f"({self.users / max(self.total, 1):.0%}), {rate:,.0f} users/s, "
            f"about {left:,.0f} s left"
        )


def suggest_all(
    log: Any,
    clickhouse: ClickHouseResource,
    redis_cache: RedisCacheResource,
    users: Sequence[int],
    as_of: datetime,
    *,
    ttl_sec: int,
    chunk_users: int,
) -> tuple[Graph, _Progress]:
    """Rank and write every user's suggestions, chunk by chunk; log progress after each."""
    started = time.perf_counter()
    # Connect once here, so the writer threads share one client and its connection pool.
    redis_cache.client()
    with (
        suggestion_graph(clickhouse, log) as graph,
        ThreadPoolExecutor(WRITERS_IN_FLIGHT) as writers,
    ):
        graph_s = time.perf_counter() - started
        log.info(
            f"{ASSET_NAME}: {len(users):,} active users as of {iso_z(as_of)}; live graph of "
            f"{graph.live_follows:,} follows and {graph.live_blocks:,} blocks loaded in "
            f"{graph_s:.1f} s"
        )
        progress = _Progress(total=len(users), started=time.perf_counter(), graph_s=graph_s)
        # A chunk is ranked, then written completely, before the next one is ranked: the
        # boundary where a run can stop (or fail) with every key whole, old or new.
        for start in range(0, len(users), chunk_users):
            ranked_at = time.perf_counter()
            chunk = graph.rank(users[start : start + chunk_users])
            progress.ranking_s += time.perf_counter() - ranked_at
            progress.add(chunk, write_chunk(redis_cache, writers, chunk, as_of, ttl_sec))
            log.info(progress.describe())
        # The sizes of the graph the last chunk was ranked from (rebuilt if a session was lost).
        loaded, progress.sessions_lost = graph.graph, graph.sessions_lost
    return loaded, progress


def build_suggested_users_asset(
    ttl_sec: int = DEFAULT_TTL_SEC,
    *,
    refresh_sec: int = 600,
    chunk_users: int = CHUNK_USERS,
    pool: str = CLICKHOUSE_POOL,
) -> dg.AssetsDefinition:
    """The asset that keeps `{prefix}suggested_users:{user_id}` fresh for every active user."""
    if ttl_sec <= 0 or chunk_users <= 0:
        raise ValueError(
            f"suggested_users needs a positive TTL and chunk size, got ttl_sec={ttl_sec}, "
            f"chunk_users={chunk_users} (SUGGESTION_TTL_SEC sets the TTL)"
        )

    # The op is named apart from the asset: the job is called suggested_users too (docs/design.md
    # §5), and Dagster wants op and job names distinct within a code location.
    @cache_asset(
        name=ASSET_NAME,
        op_name=OP_NAME,
        group="suggestions",
        description=f"Up to {TOP_SUGGESTIONS} users to follow for everyone active in the last 7 "
        "days: followees of their followees by mutuals, then the most followed.",
        refresh_sec=refresh_sec,
        checks=CHECKS,
        metadata={"cache_key_pattern": f"{ASSET_NAME}:{{user_id}}", "ttl_seconds": ttl_sec},
        pool=pool,
    )
    def _suggested_users(
        context: dg.AssetExecutionContext,
        config: AsOfConfig,
        clickhouse: ClickHouseResource,
        redis_cache: RedisCacheResource,
    ) -> dg.MaterializeResult:
        as_of = config.resolve(context)
        started = time.perf_counter()
        users = active_users(clickhouse, as_of)
        graph, progress = suggest_all(
            context.log,
            clickhouse,
            redis_cache,
            users,
            as_of,
            ttl_sec=ttl_sec,
            chunk_users=chunk_users,
        )
        seconds = time.perf_counter() - started
        if progress.kept_previous:
            context.log.warning(
                f"{progress.kept_previous:,} users' suggestions came out empty; their previous "
                "non-empty values were kept."
            )

        sample = check_sample(users)
        served = {u: redis_cache.get_json(redis_cache.key(ASSET_NAME, u)) for u in sample}
        verdicts = evaluate_checks(
            served,
            exclusions=live_exclusions(clickhouse, sample),
            ttls={u: redis_cache.ttl(redis_cache.key(ASSET_NAME, u)) for u in sample},
        )
        return cache_result(
            {
                "dagster/row_count": progress.users,
                "users_served": progress.users,
                "suggestions_written": progress.suggestions,
                "users_needing_fill": progress.needing_fill,
                "users_kept_previous": progress.kept_previous,
                "batches": progress.batches,
                "seconds": round(seconds, 2),
                "graph_load_seconds": round(progress.graph_s, 2),
                "ranking_seconds": round(progress.ranking_s, 2),
                "users_per_second": round(progress.users / seconds, 1) if seconds else 0.0,
                "as_of": iso_z(as_of),
                "live_follow_edges": graph.live_follows,
                "live_block_edges": graph.live_blocks,
                "clickhouse_sessions_lost": progress.sessions_lost,
                "sample": dg.MetadataValue.md(_sample_table(served)),
            },
            verdicts,
            keys=[redis_cache.key(ASSET_NAME, u) for u in sample],
        )

    return _suggested_users


@dg.definitions
def defs() -> dg.Definitions:
    settings = load_settings()
    return dg.Definitions(
        assets=[
            build_suggested_users_asset(
                settings.suggestion_ttl_sec,
                refresh_sec=settings.suggestion_interval_sec,
                pool=asset_pool(ASSET_NAME, embedded=settings.embedded_clickhouse),
            )
        ]
    )
