"""The demo data's generating SQL: one `INSERT … SELECT` per table, and the rates they draw with.

Rows are drawn inside ClickHouse from hashes of (seed, row, salt); the rates of the dirty rows
are the `*_PER_MILLE` constants. How the values are drawn is told beside each statement.
"""

from datetime import UTC, datetime

from nova_assets.core.sources import (
    BLOCKS,
    ENGAGEMENT_EVENTS,
    FOLLOWS,
    POSTS,
)

# The event mix, per mille of events with a known type (the events statement spells it out).
EVENT_MIX_PER_MILLE = {"view": 800, "like": 120, "comment": 50, "share": 30}
# Types the rankings do not know and must ignore: new app features, wrong case, stray spaces.
UNKNOWN_EVENT_TYPES = ("bookmark", "VIEW", "", "Like", "share ")

# Rates of the dirty rows, per mille of the generated rows (events, posts, follow or block edges).
_UNKNOWN_TYPE_PER_MILLE = 5
_MISSING_POST_PER_MILLE = 3
_FUTURE_EVENT_PER_MILLE = 3
_EXACT_DUP_EVENT_PER_MILLE = 5
_REPEAT_EVENT_PER_MILLE = 5
_SCHEDULED_POST_PER_MILLE = 1
_DELETED_POST_PER_MILLE = 20
_DUPLICATE_ROW_PER_MILLE = 5
_SELF_FOLLOW_PER_MILLE = 2
_UNFOLLOW_PER_MILLE = 20
_REFOLLOW_PER_MILLE = 10
_BLOCKED_FOLLOW_PER_MILLE = 4
_UNBLOCK_PER_MILLE = 150
_DUPLICATE_BLOCK_PER_MILLE = 30  # blocks are few: a higher rate so duplicates show at any size

# Average community size; communities are what makes "followees of followees" meaningful.
COMMUNITY_SIZE = 500

# Relative activity per UTC hour 0..23: a single-timezone audience, quiet at night, a lunch bump
# and an evening peak.
HOURLY_ACTIVITY = (
    2.4, 1.6, 1.0, 0.7, 0.6, 0.7, 1.1, 1.8, 2.6, 3.0, 3.2, 3.4,
    3.8, 3.6, 3.4, 3.4, 3.6, 4.0, 4.6, 5.2, 5.6, 5.4, 4.6, 3.4,
)  # fmt: skip

MS_PER_DAY = 86_400_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# In the statements below, `{{name:Type}}` is a clickhouse-connect placeholder bound at run time
# (it reads `{name:Type}` once the f-string is built); single braces splice in this module's own
# constants (table names, rates), never input.

# How values are drawn. Every draw is a hash of (seed, row, salt). A uniform draw takes a hash's
# high half, `intDiv(h, 2^32) / 2^32`, and a roll `h % 2^32 % 1000` its low half, so a draw and a
# roll from one hash are independent.
#
# Time runs on an "activity clock": one unit per day, advancing through each UTC hour in
# proportion to that hour's activity. Times drawn evenly on that clock, then mapped back to
# milliseconds, follow the daily cycle; and because the clock is monotonic, an event drawn after
# its post on the clock is after it in time too, with no rejection step.
# `act_start` and `act_end` read the clock at as_of - days and at as_of; `act_eps` is one second.

# A post's creation is a pure function of its id, shared by the posts and the events statement
# (both name the id `pid`), so events are placed after their post's creation without a join. Ids
# are spread evenly on the clock in id order (ids grow with time, as snowflake ids do); one in a
# thousand is a post scheduled up to two hours after as_of, which no ranking may show yet.
_POST_CREATION_COLUMNS = f"""
        cityHash64({{seed:UInt64}}, pid, 11) AS h_created,
        h_created % 4294967296 % 1000 < {_SCHEDULED_POST_PER_MILLE} AS scheduled,
        {{as_of_ms:Int64}} + 60000 + toInt64(intDiv(h_created, 4294967296) % 7200000)
            AS scheduled_ms,
        {{act_start:Float64}} + (pid - 1 + intDiv(h_created, 4294967296) / 4294967296.0)
            / {{posts:UInt64}}
            * ({{act_end:Float64}} - {{act_start:Float64}} - 2 * {{act_eps:Float64}})
            AS created_act,"""

# Maps the clock reading `act` back to Unix milliseconds `act_ms` (the inverse of the clock: find
# the hour whose cumulative activity share passes the reading, interpolate inside it). `cycle`
# holds the 25 cumulative shares, 0 to 1.
ACTIVITY_TO_MS_COLUMNS = """
        floor(act) AS act_day,
        act - act_day AS act_frac,
        arrayFirstIndex(c -> c > act_frac, {cycle:Array(Float64)}) AS act_hi,
        toInt64(act_day) * 86400000 + toInt64(floor(3600000 * (act_hi - 2
            + (act_frac - {cycle:Array(Float64)}[act_hi - 1])
                / ({cycle:Array(Float64)}[act_hi] - {cycle:Array(Float64)}[act_hi - 1]))))
            AS act_ms,"""

# ReplacingMergeTree would collapse a key's rows inside each inserted block; the history rows
# (deletions, re-follows, duplicates) are the point, so they are kept until a background merge
# collapses them, as happens in production. Queries never assume either way.
_KEEP_HISTORY = "optimize_on_insert = 0"
# Short-circuit evaluation of if/multiIf re-runs the clock's array lambda on masked row subsets,
# which made the events statement 50 times slower; every branch here is cheap and safe on every
# row, so evaluate them all.
_NO_SHORT_CIRCUIT = "short_circuit_function_evaluation = 'disable'"

INSERT_POSTS = f"""
INSERT INTO {POSTS} (post_id, author_id, created_at, is_deleted, updated_at)
SELECT
    pid,
    author_id,
    fromUnixTimestamp64Milli(created_ms, 'UTC'),
    state.1,
    fromUnixTimestamp64Milli(state.2, 'UTC')
FROM
(
    SELECT
        number + 1 AS pid,
        {_POST_CREATION_COLUMNS}
        created_act AS act,
        {ACTIVITY_TO_MS_COLUMNS}
        if(scheduled, scheduled_ms,
           greatest({{start_ms:Int64}} + 1, least({{as_of_ms:Int64}} - 1, act_ms))) AS created_ms,
        cityHash64({{seed:UInt64}}, pid, 12) AS h_author,
        cityHash64({{seed:UInt64}}, pid, 13) AS h_state,
        -- Authors: a heavy tail on the users' popularity order (popular users post the most).
        (toUInt64(floor({{users:UInt64}} * pow(intDiv(h_author, 4294967296) / 4294967296.0, 2)))
            * {{user_mul:UInt64}} + {{user_off:UInt64}}) % {{users:UInt64}} + 1 AS author_id,
        h_state % 4294967296 % 1000 AS roll,
        -- A deletion is a second row with is_deleted = 1, between creation and as_of, so the post
        -- has events both before and after it.
        created_ms + 1 + toInt64(floor(intDiv(h_state, 4294967296) / 4294967296.0
            * greatest({{as_of_ms:Int64}} - created_ms - 1, 0))) AS deleted_ms
    FROM numbers({{posts:UInt64}})
)
ARRAY JOIN
    multiIf(
        scheduled, [(0, created_ms)],
        roll < {_DELETED_POST_PER_MILLE}, [(0, created_ms), (1, deleted_ms)],
        roll < {_DELETED_POST_PER_MILLE + _DUPLICATE_ROW_PER_MILLE},
            [(0, created_ms), (0, created_ms)],
        [(0, created_ms)]
    ) AS state
SETTINGS {_KEEP_HISTORY}, {_NO_SHORT_CIRCUIT}
"""

INSERT_FOLLOWS = f"""
INSERT INTO {FOLLOWS} (follower_id, followee_id, is_deleted, updated_at)
SELECT follower_id, followee_id, state.1, fromUnixTimestamp64Milli(state.2, 'UTC')
FROM
(
    SELECT
        cityHash64({{seed:UInt64}}, number, 21) AS h_follower,
        cityHash64({{seed:UInt64}}, number, 22) AS h_followee,
        cityHash64({{seed:UInt64}}, number, 23) AS h_time,
        cityHash64({{seed:UInt64}}, number, 24) AS h_later,
        -- The follower is uniform over users; its popularity position gives its community.
        h_follower % {{users:UInt64}} AS follower_pos,
        (follower_pos * {{user_mul:UInt64}} + {{user_off:UInt64}}) % {{users:UInt64}} + 1
            AS follower_id,
        follower_pos % {{communities:UInt64}} AS community,
        intDiv({{users:UInt64}} - 1 - community, {{communities:UInt64}}) + 1 AS members,
        intDiv(h_followee, 4294967296) / 4294967296.0 AS u_followee,
        -- 80 % of follows stay in the community, 20 % go anywhere; both lean to popular users,
        -- more steeply across communities: that is where the celebrities come from.
        if(h_followee % 4294967296 % 1000 < 800,
           toUInt64(floor(members * pow(u_followee, 1.5))) * {{communities:UInt64}} + community,
           toUInt64(floor({{users:UInt64}} * pow(u_followee, 2.5)))) AS followee_pos,
        h_time % 4294967296 % 1000 AS roll,
        if(roll < {_SELF_FOLLOW_PER_MILLE}, follower_id,
           (followee_pos * {{user_mul:UInt64}} + {{user_off:UInt64}}) % {{users:UInt64}} + 1)
            AS followee_id,
        -- Follows were made over the half year before as_of, at least a day before it; an
        -- unfollow comes later, a re-follow later still, both before as_of.
        {{as_of_ms:Int64}} - {MS_PER_DAY}
            - toInt64(intDiv(h_time, 4294967296) % (180 * {MS_PER_DAY})) AS followed_ms,
        intDiv({{as_of_ms:Int64}} - followed_ms - 2, 2) AS half_room,
        followed_ms + 1 + toInt64(intDiv(h_later, 4294967296) % half_room) AS unfollowed_ms,
        unfollowed_ms + 1 + toInt64(h_later % 4294967296 % half_room) AS refollowed_ms
    FROM numbers({{edges:UInt64}})
    -- Lurkers follow nobody: suggestions for them come from the "most followed" fill.
    WHERE cityHash64({{seed:UInt64}}, follower_id, 25) % 100 >= 5
)
ARRAY JOIN
    multiIf(
        roll < {_SELF_FOLLOW_PER_MILLE}, [(0, followed_ms)],
        roll < {_SELF_FOLLOW_PER_MILLE + _UNFOLLOW_PER_MILLE},
            [(0, followed_ms), (1, unfollowed_ms)],
        roll < {_SELF_FOLLOW_PER_MILLE + _UNFOLLOW_PER_MILLE + _REFOLLOW_PER_MILLE},
            [(0, followed_ms), (1, unfollowed_ms), (0, refollowed_ms)],
        roll < {
    _SELF_FOLLOW_PER_MILLE + _UNFOLLOW_PER_MILLE + _REFOLLOW_PER_MILLE + _DUPLICATE_ROW_PER_MILLE
},
            [(0, followed_ms), (0, followed_ms)],
        [(0, followed_ms)]
    ) AS state
SETTINGS {_KEEP_HISTORY}
"""

# Blocks on existing follows, either way round (u blocks someone u follows, or one of u's
# followers), plus blocks between users drawn at random; some are lifted later (a second row with
# is_deleted = 1) and a few rows repeat.
INSERT_BLOCKS = f"""
INSERT INTO {BLOCKS} (blocker_id, blocked_id, is_deleted, updated_at)
SELECT blocker_id, blocked_id, state.1, fromUnixTimestamp64Milli(state.2, 'UTC')
FROM
(
    SELECT
        blocker_id,
        blocked_id,
        cityHash64({{seed:UInt64}}, blocker_id, blocked_id, 32) AS h_time,
        h_time % 4294967296 % 1000 AS roll,
        {{as_of_ms:Int64}} - 1 - toInt64(intDiv(h_time, 4294967296) % (30 * {MS_PER_DAY}))
            AS blocked_ms,
        blocked_ms + 1 + toInt64(cityHash64({{seed:UInt64}}, blocker_id, blocked_id, 33)
            % ({{as_of_ms:Int64}} - blocked_ms)) AS unblocked_ms
    FROM
    (
        SELECT
            if(flip, followee_id, follower_id) AS blocker_id,
            if(flip, follower_id, followee_id) AS blocked_id
        FROM
        (
            SELECT DISTINCT
                follower_id,
                followee_id,
                cityHash64({{seed:UInt64}}, follower_id, followee_id, 31) % 2 = 1 AS flip
            FROM {FOLLOWS}
            WHERE follower_id != followee_id
                AND cityHash64({{seed:UInt64}}, follower_id, followee_id, 30) % 1000
                    < {_BLOCKED_FOLLOW_PER_MILLE}
        )
        UNION ALL
        SELECT
            cityHash64({{seed:UInt64}}, number, 34) % {{users:UInt64}} + 1 AS blocker_id,
            cityHash64({{seed:UInt64}}, number, 35) % {{users:UInt64}} + 1 AS blocked_id
        FROM numbers({{random_blocks:UInt64}})
        WHERE blocker_id != blocked_id
    )
)
ARRAY JOIN
    multiIf(
        roll < {_UNBLOCK_PER_MILLE}, [(0, blocked_ms), (1, unblocked_ms)],
        roll < {_UNBLOCK_PER_MILLE + _DUPLICATE_BLOCK_PER_MILLE},
            [(0, blocked_ms), (0, blocked_ms)],
        [(0, blocked_ms)]
    ) AS state
SETTINGS {_KEEP_HISTORY}
"""

# Events. A row may copy the previous row's (user, post, type): some copies keep its time too (an
# exact duplicate, e.g. a client retry), some get a time of their own (a repeat, e.g. a re-view).
# `src` is the row the identity comes from, `tsrc` the row the time comes from.
#
# An event is a (post, delay) pair: the post drawn by popularity, the delay after its creation
# exponential on the clock (mean 16 h: 95 % within 48 h). A pair that would land after as_of has
# not happened yet, so the event goes to a post old enough for that delay instead (ids at most
# `fit_pid`, uniformly). That keeps recent posts from being credited with events they could not
# have had yet, in one pass and without a join.
INSERT_EVENTS = f"""
INSERT INTO {ENGAGEMENT_EVENTS} (event_time, user_id, post_id, event_type)
SELECT fromUnixTimestamp64Milli(event_ms, 'UTC'), user_id, pid, event_type
FROM
(
    SELECT
        cityHash64({{seed:UInt64}}, number, 40) % 4294967296 % 1000 AS dup_roll,
        -- Every hashed value is UInt64: cityHash64 hashes the type as well as the value (and
        -- `number - 1` alone would be an Int64).
        if(number > 0 AND dup_roll < {_EXACT_DUP_EVENT_PER_MILLE + _REPEAT_EVENT_PER_MILLE},
           toUInt64(number - 1), number) AS src,
        if(dup_roll < {_EXACT_DUP_EVENT_PER_MILLE}, src, number) AS tsrc,
        cityHash64({{seed:UInt64}}, src, 41) AS h_user,
        cityHash64({{seed:UInt64}}, src, 42) AS h_post,
        cityHash64({{seed:UInt64}}, src, 43) AS h_type,
        cityHash64({{seed:UInt64}}, src, 44) AS h_pick,
        cityHash64({{seed:UInt64}}, tsrc, 44) AS h_delay,
        cityHash64({{seed:UInt64}}, tsrc, 45) AS h_time,
        -- Users: a heavy tail on an activity order of their own; the last tenth of that order is
        -- dormant (no events), so "users with events" is a real subset.
        (toUInt64(floor({{active_users:UInt64}}
                * pow(intDiv(h_user, 4294967296) / 4294967296.0, 2)))
            * {{act_mul:UInt64}} + {{act_off:UInt64}}) % {{users:UInt64}} + 1 AS user_id,
        h_type % 4294967296 % 1000 AS type_roll,
        intDiv(h_type, 4294967296) % 1000 AS unknown_roll,
        multiIf(
            unknown_roll < {_UNKNOWN_TYPE_PER_MILLE},
                {{unknown_types:Array(String)}}[unknown_roll % {len(UNKNOWN_EVENT_TYPES)} + 1],
            type_roll < 800, 'view',
            type_roll < 920, 'like',
            type_roll < 970, 'comment',
            'share') AS event_type,
        -- The post: Zipf-like on a popularity order of posts, or a few ids beyond the range.
        h_post % 4294967296 % 1000 < {_MISSING_POST_PER_MILLE} AS missing_post,
        (toUInt64(floor({{posts:UInt64}} * pow(intDiv(h_post, 4294967296) / 4294967296.0, 3)))
            * {{post_mul:UInt64}} + {{post_off:UInt64}}) % {{posts:UInt64}} + 1 AS drawn_pid,
        -log(1 - intDiv(h_pick, 2048) / 9007199254740992.0) * 16 / 24 AS pick_delay_act,
        -- Posts up to this id were created early enough for the drawn delay (ids are in time
        -- order, evenly spread on the clock).
        toInt64(floor({{posts:UInt64}}
            * ({{act_end:Float64}} - {{act_start:Float64}} - {{act_eps:Float64}} - pick_delay_act)
            / ({{act_end:Float64}} - {{act_start:Float64}} - 2 * {{act_eps:Float64}}))) AS fit_pid,
        multiIf(
            missing_post,
                {{posts:UInt64}} + 1
                    + intDiv(h_post, 4294967296) % (intDiv({{posts:UInt64}}, 10) + 1),
            drawn_pid <= fit_pid OR fit_pid < 1, drawn_pid,
            cityHash64({{seed:UInt64}}, src, 46) % greatest(fit_pid, 1) + 1) AS pid,
        {_POST_CREATION_COLUMNS}
        -- The time: after the post by the delay (a repeat's own delay wraps around inside the
        -- room left before as_of). Events on missing posts are spread evenly over the window,
        -- and so are those on scheduled posts (logged before the post's creation time: clock
        -- skew the rankings must not trust).
        intDiv(h_delay, 2048) / 9007199254740992.0 AS u_delay,
        missing_post OR scheduled AS unanchored,
        if(unanchored, {{act_start:Float64}}, created_act) AS from_act,
        if(unanchored, u_delay * ({{act_end:Float64}} - {{act_start:Float64}}),
           -log(1 - u_delay) * 16 / 24) AS delay_act,
        {{act_end:Float64}} - from_act - {{act_eps:Float64}} AS room_act,
        from_act + {{act_eps:Float64}} + (delay_act - floor(delay_act / room_act) * room_act)
            AS act,
        {ACTIVITY_TO_MS_COLUMNS}
        if(h_time % 4294967296 % 1000 < {_FUTURE_EVENT_PER_MILLE},
           {{as_of_ms:Int64}} + 1 + toInt64(intDiv(h_time, 4294967296) % (2 * {MS_PER_DAY})),
           least(act_ms, {{as_of_ms:Int64}})) AS event_ms
    FROM numbers({{events:UInt64}})
)
SETTINGS {_NO_SHORT_CIRCUIT}
"""
