"""The suggestions' SQL text: the names it uses, the graph's build and load, the ranking query.

Names are constants and a run id's hex digits, never input; values are bound as parameters.

The graph is built once per run into tables of its own (WORK_DATABASE, named after the run), so
every shard, in whatever process or session it runs, ranks from the same graph without building
it again; each shard copies it into Join tables of its session, which `joinGet` reads like a
dictionary.
"""

import re

from nova_assets.core.jobs import SUGGESTIONS_ASSET
from nova_assets.core.sources import BLOCKS, ENGAGEMENT_EVENTS, FOLLOWS, in_window

WORK_DATABASE = "nova_work"
"""Where runs keep their graph between shards; dropped by the run's last step, or by a later run
of the same Dagster instance once the run that built it has finished (another instance's graphs
only once a day old: several instances may share one ClickHouse server)."""
GRAPH_PREFIX = f"{SUGGESTIONS_ASSET}_graph_"
GRAPH_PARTS = ("follows", "blocked", "most_followed")
GRAPH_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
"""A graph's id: 8 hex digits of its Dagster instance's identity, then the last 24 of its run's id
(`graph.py`)."""

# The session's tables: the follower counts while building, the graph's Join tables while ranking.
_COUNTS = "suggested_users_follower_counts"
_FOLLOWS = "suggested_users_follows"
_BLOCKED = "suggested_users_blocked"
_MOST_FOLLOWED = "suggested_users_most_followed"
SESSION_TABLES = (_COUNTS, _FOLLOWS, _BLOCKED, _MOST_FOLLOWED)
DROP_COUNTS_SQL = f"DROP TEMPORARY TABLE IF EXISTS {_COUNTS}"

_LIVE_FOLLOWS_SQL = FOLLOWS.live_edges()
_LIVE_BLOCKS_SQL = BLOCKS.live_edges()


def graph_table(graph_id: str, part: str) -> str:
    """The table holding one part of a run's graph (`part` is one of GRAPH_PARTS)."""
    if not GRAPH_ID_PATTERN.match(graph_id) or part not in GRAPH_PARTS:
        raise ValueError(f"not a suggestion graph table: {graph_id!r}, {part!r}")
    return f"{WORK_DATABASE}.{GRAPH_PREFIX}{graph_id}_{part}"


_BUILD_SETTINGS = (
    "optimize_aggregation_in_order = 1, max_block_size = 8192, "
    "min_insert_block_size_bytes = 16777216"
)
"""Settings of the graph's build, which keep its memory peak down: blocks of 8,192 rows, not
65,505, through the in-order aggregation (the counts query's peak stays small), and rows of up
to 56 followees written in blocks of at most 16 MiB, not a million rows (`bench/scale.py` prints
the peak of a whole run)."""


def build_statements(graph_id: str) -> list[str]:
    """The statements that build a run's graph tables, in order (after any old ones are dropped).

    Each user's followees come with each followee's live follower count alongside, looked up in a
    small Join table of counts: one array pair per user, 12 bytes per edge. Resolving each edge's
    latest row goes in the order of the follows table's key (`optimize_aggregation_in_order`), so
    it streams instead of holding every edge in a hash table; `_BUILD_SETTINGS` keeps the blocks
    of that stream, and of the rows written, small.
    """
    follows, blocked = graph_table(graph_id, "follows"), graph_table(graph_id, "blocked")
    return [
        DROP_COUNTS_SQL,
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


def graph_size_sql(graph_id: str) -> str:
    """The built graph's live follows, live blocks, and the longest exclusion list of any user."""
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


def most_followed_statement(graph_id: str) -> str:
    """The fill's source, best first, cut to `{pool_size}` entries.

    A user's fill comes from the first TOP + |excluded| entries (at worst every excluded user is
    among them), so the list needs no more than the largest exclusion list; `build_graph` says how
    many that is.
    """
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


def load_statements(graph_id: str) -> list[str]:
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
  AND user_id BETWEEN {{first:UInt64}} AND {{last:UInt64}}
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

# The checks read the sampled users' live edges from the source tables, not from the graph.
_EITHER_SIDE = "blocker_id IN {users:Array(UInt64)} OR blocked_id IN {users:Array(UInt64)}"
LIVE_EXCLUSIONS_SQL = f"""
SELECT follower_id, followee_id, 'follows'
FROM ({FOLLOWS.live_edges("follower_id IN {users:Array(UInt64)}")})
UNION ALL
SELECT blocker_id, blocked_id, 'blocks'
FROM ({BLOCKS.live_edges(_EITHER_SIDE)})
"""
