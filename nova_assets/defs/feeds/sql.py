"""The warmed feeds' SQL: the session's staging tables, the ranking query, the checks' reads.

Names and windows are constants; every value reaches ClickHouse as a bound parameter.
"""

import math
from datetime import datetime, timedelta
from typing import Any

from nova_assets.core.contract import epoch_ms
from nova_assets.core.sources import (
    ENGAGEMENT_EVENTS,
    EVENT_WEIGHTS,
    FOLLOWS,
    POSTS,
    age_hours,
    in_window,
    weight_parameters,
)

WARMED_USERS = 1000
"""How many of the last 24 h's most active users are warmed."""
FEED_LENGTH = 50
ACTIVITY_WINDOW = timedelta(hours=24)
FEED_WINDOW = timedelta(hours=72)
DECAY_PER_HOUR = 0.95

_LAST_DAY = "day_start_ms", "as_of_ms"
_FEED_WINDOW = "feed_start_ms", "as_of_ms"
# Σ weight(type) over a post's events deduplicated per (user, type): per known type, the weight
# times the number of distinct users. A fixed sum of integer counts, so a post's engagement is the
# same on every run, whatever order the events are read in. Unknown types are filtered out before.
_ENGAGEMENT = " + ".join(
    f"{{weight_{i}:Float64}} * uniqExactIf(user_id, event_type = {{type_{i}:String}})"
    for i in range(len(EVENT_WEIGHTS))
)

# Every user is warmed by one query, after three small tables of the run's ClickHouse session hold
# what the query would otherwise compute more than once (ClickHouse inlines a CTE at each use; a
# MATERIALIZED CTE would do the same in one statement, but needs a newer server than deploy/README
# requires). bench/feeds.py times this beside the one-query form.
#
# * `feeds_warmed`: raw event counts of the last 24 h (any type, duplicates included), the top
#   N by count, ties to the lower user_id. The events table leads its key with the hour: a day
#   is read.
# * `feeds_edges`: their live follow edges (latest row by updated_at not deleted; on a tie the
#   deleting row wins, as in suggestions), self-edges dropped, so no user sees their own posts.
#   Follows are keyed by follower: only their rows are read.
# * `feeds_followed_posts`: ids of posts with some row by a followee, not deleted and created in
#   (as_of - 72 h, as_of]. A candidate's latest row is such a row, so every candidate is here.
#
# Then the query:
#
# * `candidates`: every row of those posts resolved (argMax by updated_at, a deleting row winning
#   a tie), kept when the latest row is not deleted and its created_at is in the window: an older
#   row never decides.
# * `engagement`: for those posts only, the events of (as_of - 72 h, as_of], deduplicated.
# * `scored`: (1 + engagement) * 0.95 ^ age_h(created_at), as exp(ln 0.95 * age_h), once per post.
# * `feeds`: per warmed user, the best 50 of its followees' posts by (score desc, post_id desc),
#   kept by a bounded sort on (-score, -post_id); joined on the latest row's author.
# The LEFT JOIN from the warmed users gives a user without candidates empty arrays
# (join_use_nulls = 0).
WARMED_TABLE = "feeds_warmed"
EDGES_TABLE = "feeds_edges"
FOLLOWED_POSTS_TABLE = "feeds_followed_posts"
STAGES = (
    (
        WARMED_TABLE,
        f"""
        SELECT user_id, count() AS events
        FROM {ENGAGEMENT_EVENTS}
        WHERE {in_window("event_time", *_LAST_DAY)}
        GROUP BY user_id
        ORDER BY events DESC, user_id ASC
        LIMIT {{users:UInt32}}
        """,
    ),
    (EDGES_TABLE, FOLLOWS.live_edges(f"follower_id IN (SELECT user_id FROM {WARMED_TABLE})")),
    (
        FOLLOWED_POSTS_TABLE,
        f"""
        SELECT post_id
        FROM {POSTS}
        WHERE is_deleted = 0 AND {in_window("created_at", *_FEED_WINDOW)}
          AND author_id IN (SELECT followee_id FROM {EDGES_TABLE})
        """,
    ),
)
"""The session's temporary tables of a feeds run, each with the SELECT that fills it, in order."""

FEEDS_SQL = f"""
WITH
candidates AS (
    SELECT
        post_id,
        {POSTS.latest("author_id")} AS author_id,
        {POSTS.latest("created_at")} AS created
    FROM {POSTS}
    WHERE post_id IN {FOLLOWED_POSTS_TABLE}
    GROUP BY post_id
    HAVING {POSTS.live} AND {in_window("created", *_FEED_WINDOW)}
),
engagement AS (
    SELECT post_id, {_ENGAGEMENT} AS engagement
    FROM {ENGAGEMENT_EVENTS}
    WHERE {in_window("event_time", *_FEED_WINDOW)}
      AND event_type IN {{types:Array(String)}}
      AND post_id IN {FOLLOWED_POSTS_TABLE}
    GROUP BY post_id
),
scored AS (
    SELECT
        c.post_id AS post_id,
        c.author_id AS author_id,
        (1 + g.engagement) * exp({{ln_decay:Float64}} * {age_hours("c.created")}) AS score
    FROM candidates AS c
    LEFT JOIN engagement AS g ON g.post_id = c.post_id
),
feeds AS (
    SELECT
        e.follower_id AS user_id,
        groupArraySorted({{top:UInt32}})((-s.score, -toInt64(s.post_id), s.author_id)) AS ranked
    FROM {EDGES_TABLE} AS e
    INNER JOIN scored AS s ON s.author_id = e.followee_id
    GROUP BY e.follower_id
)
SELECT
    w.user_id,
    w.events,
    arrayMap(t -> toUInt64(-t.2), f.ranked) AS post_ids,
    arrayMap(t -> t.3, f.ranked) AS author_ids,
    arrayMap(t -> -t.1, f.ranked) AS scores
FROM {WARMED_TABLE} AS w
LEFT JOIN feeds AS f ON f.user_id = w.user_id
ORDER BY w.events DESC, w.user_id ASC
SETTINGS join_use_nulls = 0
"""

# The facts the contract check needs for a sample of users: their live followees, and the latest
# row of every post their served feeds hold.
LIVE_FOLLOWEES_SQL = f"""
SELECT follower_id, groupArray(followee_id)
FROM ({FOLLOWS.live_edges("follower_id IN {user_ids:Array(UInt64)}")})
GROUP BY follower_id
"""

POST_STATES_SQL = f"""
SELECT
    post_id,
    {POSTS.latest("author_id")},
    toUnixTimestamp64Milli({POSTS.latest("created_at")}),
    {POSTS.latest("is_deleted")}
FROM {POSTS}
WHERE post_id IN {{post_ids:Array(UInt64)}}
GROUP BY post_id
"""


def feeds_parameters(as_of: datetime, users: int = WARMED_USERS) -> dict[str, Any]:
    return {
        "as_of_ms": epoch_ms(as_of),
        "day_start_ms": epoch_ms(as_of - ACTIVITY_WINDOW),
        "feed_start_ms": epoch_ms(as_of - FEED_WINDOW),
        **weight_parameters(),
        "ln_decay": math.log(DECAY_PER_HOUR),
        "users": users,
        "top": FEED_LENGTH,
    }
