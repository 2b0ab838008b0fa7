"""Warmed feeds: the most active users' feeds rank as docs/design.md §3 says and serve §4's value.

Against the real embedded ClickHouse and the real local Redis: a hand-built dataset whose feeds are
worked out here from the formula; one test per kind of dirty input (deleted posts, posts outside
the 72 h window, unfollows and re-follows, own posts and self-follows, users who follow nobody,
ties in activity at rank 1000); a randomized dataset compared user by user with an independent
pure-Python implementation of §3; every key written with a TTL in (0, 120]; at most 20 pipelines
in flight; and each asset check failing on broken data.
"""

import json
import random
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import pytest
from pydantic import PrivateAttr

from nova_assets.core.contract import epoch_ms, iso_z, permanent_reason
from nova_assets.core.jobs import FEEDS_ASSET as ASSET_NAME
from nova_assets.core.jobs import FEEDS_JOB as JOB_NAME
from nova_assets.core.resources import RedisCacheResource
from nova_assets.defs.feeds.assets import build_warmed_feeds_asset, write_feeds
from nova_assets.defs.feeds.checks import contract_facts, evaluate_checks, read_served
from nova_assets.defs.feeds.ranking import FeedsSessionLostError, rank_feeds
from nova_assets.defs.feeds.sql import FEED_LENGTH, FEEDS_SQL, WARMED_USERS
from nova_assets_tests.conftest import REDIS_URL
from nova_assets_tests.factories import (
    SessionLosingClickHouse,
    ago,
    insert_edges,
    insert_events,
    insert_posts,
    post,
    reset,
)

AS_OF = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
WEIGHTS = {"view": 0.1, "like": 1.0, "comment": 2.0, "share": 3.0}
TTL = 120
LONG_AGO = AS_OF - timedelta(days=30)


# Tables whose state is a key's latest row (ReplacingMergeTree).


@pytest.fixture
def ch(clickhouse):
    """The engine, emptied; `reset` keeps superseded rows until the query reads them."""
    reset(clickhouse)
    return clickhouse


def add_posts(clickhouse, rows):
    """Post rows as (post_id, author_id, created_at, is_deleted, updated_at), history kept."""
    insert_posts(clickhouse, rows)


def add_follows(clickhouse, rows):
    """Follow rows as (follower_id, followee_id, is_deleted, updated_at), history kept."""
    insert_edges(clickhouse, "follows", rows)


def materialize(clickhouse, redis_cache, as_of=AS_OF, *, feed_ttl_sec=TTL):
    asset = build_warmed_feeds_asset(feed_ttl_sec)
    return dg.materialize(
        [asset],
        resources={"clickhouse": clickhouse, "redis_cache": redis_cache},
        run_config={"ops": {asset.op.name: {"config": {"as_of": iso_z(as_of)}}}},
    )


def served(redis_cache, user_id):
    return redis_cache.get_json(redis_cache.key("feed", user_id))


def feed_ids(redis_cache, user_id):
    return [item["post_id"] for item in served(redis_cache, user_id)["items"]]


def warmed_users(redis_cache) -> set[int]:
    """The users whose feed key exists under the test's prefix."""
    prefix = redis_cache.key("feed", "")
    keys = redis_cache.client().scan_iter(match=prefix + "*", count=1000)
    return {int(key.decode()[len(prefix) :]) for key in keys}


def assert_ttls(redis_cache, user_ids, ttl=TTL):
    _, ttls = read_served(redis_cache, sorted(user_ids))
    assert ttls, "no key to check"
    assert all(0 < t <= ttl for t in ttls.values()), ttls


def follows(follower, *followees):
    return [(follower, f, 0, LONG_AGO) for f in followees]


def decay(created: datetime, as_of: datetime = AS_OF) -> float:
    return 0.95 ** ((as_of - created).total_seconds() / 3600)


def metadata_of(result):
    return result.asset_materializations_for_node(ASSET_NAME)[0].metadata


def checks_of(result):
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


# -- the asset and a hand-built dataset -------------------------------------------------------


def test_asset_definition():
    asset = build_warmed_feeds_asset()
    assert asset.key == dg.AssetKey(ASSET_NAME) == dg.AssetKey("warmed_feeds")
    assert JOB_NAME == "cache_warmer"
    assert asset.group_names_by_key[asset.key] == "feeds"
    spec = asset.specs_by_key[asset.key]
    assert set(spec.kinds) == {"clickhouse", "redis"}
    assert "never expires" in asset.descriptions_by_key[asset.key]
    assert {c.name for c in asset.check_specs} == {
        "keys_have_ttl",
        "posts_from_live_followees",
        "ordered_and_capped",
    }
    with pytest.raises(ValueError, match="feed_ttl_sec"):
        build_warmed_feeds_asset(0)


def test_hand_built_feeds_match_the_formula(ch, redis_cache):
    add_follows(ch, follows(1, 10, 11) + follows(2, 10))
    created = {
        100: ago(AS_OF, hours=2),
        101: ago(AS_OF, hours=30),
        102: ago(AS_OF, hours=5.5),
        103: ago(AS_OF, hours=70),
        104: ago(AS_OF, hours=1),
    }
    authors = {100: 10, 101: 10, 102: 11, 103: 11, 104: 12}
    add_posts(ch, [row for p in created for row in post(p, authors[p], created[p])])
    insert_events(
        ch,
        [
            # Post 100: one like (repeated: counts once), one view, an unknown type, a future share.
            (ago(AS_OF, hours=1), 1, 100, "like"),
            (ago(AS_OF, hours=0.5), 1, 100, "like"),
            (ago(AS_OF, hours=1), 2, 100, "view"),
            (ago(AS_OF, hours=1), 2, 100, "bookmark"),
            (AS_OF + timedelta(minutes=1), 3, 100, "share"),
            # Post 101: a share in the last day and a comment 25 h ago (inside 72 h).
            (ago(AS_OF, hours=20), 1, 101, "share"),
            (ago(AS_OF, hours=25), 2, 101, "comment"),
            # Post 102: one comment, sent twice.
            (ago(AS_OF, hours=3), 2, 102, "comment"),
            (ago(AS_OF, hours=3), 2, 102, "comment"),
            # Post 103: a share before the 72 h window.
            (ago(AS_OF, hours=80), 1, 103, "share"),
            # Post 104: by someone neither user follows.
            (ago(AS_OF, hours=1), 1, 104, "like"),
        ],
    )
    engagement = {100: 1.0 + 0.1, 101: 3.0 + 2.0, 102: 2.0, 103: 0.0}
    score = {p: (1 + e) * decay(created[p]) for p, e in engagement.items()}

    def expected(*post_ids):
        return sorted(post_ids, key=lambda p: (-score[p], -p))

    result = materialize(ch, redis_cache)

    assert result.success
    assert warmed_users(redis_cache) == {1, 2}
    for user_id, posts in ((1, expected(100, 101, 102, 103)), (2, expected(100, 101))):
        value = served(redis_cache, user_id)
        assert value["user_id"] == user_id
        assert value["as_of"] == "2026-11-28T12:00:00.000Z"
        assert value["generated_at"].endswith("Z")
        assert [(i["post_id"], i["author_id"]) for i in value["items"]] == [
            (p, authors[p]) for p in posts
        ]
        for item in value["items"]:
            assert isinstance(item["post_id"], int)
            assert item["score"] == pytest.approx(score[item["post_id"]], rel=1e-9)
    assert_ttls(redis_cache, [1, 2])
    metadata = metadata_of(result)
    assert metadata["dagster/row_count"].value == 2
    assert metadata["users_warmed"].value == 2
    assert metadata["empty_feeds"].value == 0
    assert metadata["items_written"].value == 6
    assert metadata["feed_length_p50"].value == 3.0
    assert metadata["as_of"].value == "2026-11-28T12:00:00.000Z"
    assert "| 1 |" in metadata["preview"].value
    assert all(checks_of(result).values())


# -- dirty input, one test per case -----------------------------------------------------------


def active(*user_ids):
    """One view each in the last hour, so the users are warmed."""
    return [(ago(AS_OF, minutes=10), u, 999_999, "view") for u in user_ids]


def test_posts_deleted_after_creation_are_dropped(ch, redis_cache):
    add_follows(ch, follows(1, 10))
    created = ago(AS_OF, hours=10)
    add_posts(
        ch,
        post(1, 10, created)
        + post(2, 10, created, deleted_at=ago(AS_OF, hours=1))
        + post(3, 10, created, deleted_at=ago(AS_OF, hours=9))
        # Deleted, then restored by a newer live row.
        + [(3, 10, created, 0, ago(AS_OF, hours=2))]
        # Deleted after as_of: the latest row decides, whatever its time.
        + post(4, 10, created, deleted_at=AS_OF + timedelta(hours=1))
        # Rows inserted newest first: the deletion at 5 h is still the latest.
        + [(5, 10, created, 1, ago(AS_OF, hours=5)), (5, 10, created, 0, created)]
        # Deleted at the instant it was created: of two rows at one time, the deleting one wins.
        + post(6, 10, created, deleted_at=created),
    )
    insert_events(ch, [*active(1), (ago(AS_OF, hours=3), 7, 2, "share")])

    result = materialize(ch, redis_cache)

    assert sorted(feed_ids(redis_cache, 1)) == [1, 3]
    assert all(checks_of(result).values())


def test_posts_older_than_72h_or_newer_than_as_of_are_excluded(ch, redis_cache):
    add_follows(ch, follows(1, 10))
    window_start = AS_OF - timedelta(hours=72)
    add_posts(
        ch,
        post(1, 10, window_start)  # exactly 72 h old: out
        + post(2, 10, window_start + timedelta(milliseconds=1))
        + post(3, 10, AS_OF)  # created at as_of: in
        + post(4, 10, AS_OF + timedelta(milliseconds=1))  # scheduled: out
        + post(5, 10, ago(AS_OF, hours=100))
        # Rescheduled into the window by a newer row: the newer created_at decides.
        + [(6, 10, ago(AS_OF, hours=100), 0, LONG_AGO), (6, 10, ago(AS_OF, hours=1), 0, AS_OF)]
        # Moved out of the window by a newer row.
        + [(7, 10, ago(AS_OF, hours=1), 0, ago(AS_OF, hours=1)), (7, 10, LONG_AGO, 0, AS_OF)],
    )
    # Engagement on the excluded posts must not pull them in.
    insert_events(ch, active(1) + [(ago(AS_OF, hours=1), 8, p, "share") for p in (1, 4, 5, 7)])

    result = materialize(ch, redis_cache)

    assert sorted(feed_ids(redis_cache, 1)) == [2, 3, 6]
    assert all(checks_of(result).values())


def test_unfollowed_followees_drop_out_and_refollows_come_back(ch, redis_cache):
    t0, t1, t2 = ago(AS_OF, days=20), ago(AS_OF, days=10), ago(AS_OF, days=5)
    add_follows(
        ch,
        [
            (1, 10, 0, t0),
            (1, 10, 1, t1),  # unfollowed
            (1, 11, 0, t0),
            (1, 11, 1, t1),
            (1, 11, 0, t2),  # re-followed
            (1, 12, 1, t2),  # unfollowed, rows inserted newest first
            (1, 12, 0, t0),
            (1, 13, 0, t0),
            (1, 13, 0, t0),  # exact duplicate row
            (1, 14, 1, AS_OF + timedelta(days=1)),  # unfollowed after as_of: latest row decides
            (1, 14, 0, t0),
            (1, 15, 0, t1),
            (1, 15, 1, t1),  # followed and unfollowed at one instant: unfollowed
            (2, 10, 0, t0),  # another user still follows 10
        ],
    )
    created = ago(AS_OF, hours=1)
    add_posts(ch, [row for a in range(10, 16) for row in post(a * 10, a, created)])
    insert_events(ch, active(1, 2))

    result = materialize(ch, redis_cache)

    assert sorted(feed_ids(redis_cache, 1)) == [110, 130]
    assert feed_ids(redis_cache, 2) == [100]
    assert all(checks_of(result).values())


def test_a_users_own_posts_never_appear_even_when_they_follow_themselves(ch, redis_cache):
    add_follows(ch, follows(1, 1, 10) + follows(2, 2))
    created = ago(AS_OF, hours=1)
    add_posts(ch, post(1, 1, created) + post(2, 10, created) + post(3, 2, created))
    insert_events(ch, [*active(1, 2), (ago(AS_OF, minutes=5), 9, 1, "share")])

    result = materialize(ch, redis_cache)

    assert feed_ids(redis_cache, 1) == [2]
    assert feed_ids(redis_cache, 2) == []
    assert all(checks_of(result).values())


def test_users_who_follow_nobody_get_an_empty_list_with_its_ttl(ch, redis_cache, raw_redis):
    add_follows(ch, [(2, 10, 0, LONG_AGO), (2, 10, 1, ago(AS_OF, days=1))])
    add_posts(ch, post(1, 10, ago(AS_OF, hours=1)))
    insert_events(ch, active(1, 2, 3))
    # User 3 had a feed from an earlier run, still live: an empty list never replaces it (§4).
    earlier = {
        "user_id": 3,
        "as_of": "2026-11-28T11:59:00.000Z",
        "generated_at": "2026-11-28T11:59:01.000Z",
        "items": [{"post_id": 1, "author_id": 10, "score": 1.5}],
    }
    raw_redis.set(redis_cache.key("feed", 3), json.dumps(earlier), ex=20)

    result = materialize(ch, redis_cache, feed_ttl_sec=30)

    for user_id in (1, 2):
        value = served(redis_cache, user_id)
        assert value["user_id"] == user_id
        assert value["items"] == []
    assert_ttls(redis_cache, [1, 2], ttl=30)
    assert served(redis_cache, 3) == earlier
    assert_ttls(redis_cache, [3], ttl=20)
    metadata = metadata_of(result)
    assert metadata["empty_feeds"].value == 3
    assert metadata["items_written"].value == 0
    assert (metadata["keys_written"].value, metadata["kept_previous"].value) == (2, 1)
    assert all(checks_of(result).values())


def test_no_active_user_writes_nothing(ch, redis_cache):
    insert_events(ch, [(ago(AS_OF, hours=25), 1, 1, "view")])

    result = materialize(ch, redis_cache)

    assert warmed_users(redis_cache) == set()
    assert metadata_of(result)["users_warmed"].value == 0
    assert all(checks_of(result).values())


def test_ties_in_activity_at_rank_1000_go_to_the_lower_user_id(ch, redis_cache):
    # Users 1..998 have ten views each in the last hour (built inside ClickHouse).
    ch.command(
        "INSERT INTO nova.engagement_events (event_time, user_id, post_id, event_type) "
        "SELECT fromUnixTimestamp64Milli({as_of_ms:Int64} - 1000 * toInt64(number), 'UTC'), "
        "number % 998 + 1, 1, 'view' FROM numbers(9980)",
        {"as_of_ms": epoch_ms(ago(AS_OF, hours=1))},
    )
    seven = [ago(AS_OF, hours=h) for h in range(1, 8)]
    insert_events(
        ch,
        # Seven events each: two of these four tied users fit, the lower ids.
        [(t, 3000, 1, "view") for t in seven]
        + [(t, 5000, 1, "like") for t in seven]
        # Unknown types and duplicates count as raw events.
        + [(seven[0], 2800, 1, "bookmark")] * 4
        + [(seven[1], 2800, 1, "Like")] * 3
        # An event at exactly as_of counts.
        + [(t, 2700, 1, "view") for t in seven[:6]]
        + [(AS_OF, 2700, 1, "view")]
        # An event at exactly as_of - 24 h, or after as_of, does not.
        + [(t, 2500, 1, "view") for t in seven[:6]]
        + [(AS_OF - timedelta(hours=24), 2500, 1, "view")]
        + [(t, 2600, 1, "view") for t in seven[:6]]
        + [(AS_OF + timedelta(milliseconds=1), 2600, 1, "view")],
    )

    result = materialize(ch, redis_cache)

    users = warmed_users(redis_cache)
    assert len(users) == WARMED_USERS == 1000
    assert users == set(range(1, 999)) | {2700, 2800}
    assert_ttls(redis_cache, users)
    assert metadata_of(result)["empty_feeds"].value == 1000
    assert all(checks_of(result).values())


# -- randomized dataset against an independent implementation ---------------------------------


def reference_feeds(events, posts, follow_rows, as_of, users=1000):
    """docs/design.md §3 warmed feeds, plainly in Python: {user_id: [(post, author, score)]}."""
    activity = Counter(u for t, u, _, _ in events if as_of - timedelta(hours=24) < t <= as_of)
    warmed = sorted(activity, key=lambda u: (-activity[u], u))[:users]

    latest_edge = {}
    for follower, followee, deleted, t in follow_rows:
        key = (follower, followee)
        if key not in latest_edge or t > latest_edge[key][1]:
            latest_edge[key] = (deleted, t)
    followees = defaultdict(set)
    for (follower, followee), (deleted, _) in latest_edge.items():
        if not deleted and follower != followee:
            followees[follower].add(followee)

    state = {}
    for row in posts:
        if row[0] not in state or row[4] > state[row[0]][4]:
            state[row[0]] = row

    start = as_of - timedelta(hours=72)
    deduped = {(p, u, k) for t, u, p, k in events if k in WEIGHTS and start < t <= as_of}
    engagement = defaultdict(float)
    for p, _, k in deduped:
        engagement[p] += WEIGHTS[k]

    feeds = {}
    for user in warmed:
        candidates = [
            (p, author, (1 + engagement[p]) * decay(created, as_of))
            for p, author, created, deleted, _ in state.values()
            if not deleted and author in followees[user] and start < created <= as_of
        ]
        candidates.sort(key=lambda c: (-c[2], -c[0]))
        feeds[user] = candidates[:50]
    return feeds


def random_dataset(rng: random.Random, as_of: datetime):
    def moment(low_h: float, high_h: float) -> datetime:
        return as_of - timedelta(milliseconds=rng.randint(int(low_h * 3.6e6), int(high_h * 3.6e6)))

    posts = []
    for post_id in range(1, 701):
        author = rng.randint(1, 40)
        created = moment(-1, 90)
        posts.append((post_id, author, created, 0, created))
        roll = rng.random()
        if roll < 0.1:  # deleted, maybe after as_of
            posts.append(
                (post_id, author, created, 1, created + timedelta(hours=rng.uniform(0, 9)))
            )
        elif roll < 0.15:  # deleted, then restored
            posts.append((post_id, author, created, 1, created + timedelta(hours=1)))
            posts.append((post_id, author, created, 0, created + timedelta(hours=2)))
        elif roll < 0.2:  # rescheduled
            posts.append((post_id, author, moment(-1, 90), 0, created + timedelta(minutes=5)))
        elif roll < 0.23:  # exact duplicate row
            posts.append(posts[-1])

    follow_rows = []
    for follower in range(1, 81):
        for followee in rng.sample(range(1, 41), rng.randint(0, 12)):
            t = moment(100, 2000)
            follow_rows.append((follower, followee, 0, t))
            roll = rng.random()
            if roll < 0.15:  # unfollowed
                follow_rows.append((follower, followee, 1, t + timedelta(hours=1)))
            elif roll < 0.25:  # unfollowed, then re-followed
                follow_rows.append((follower, followee, 1, t + timedelta(hours=1)))
                follow_rows.append((follower, followee, 0, t + timedelta(hours=2)))
        if rng.random() < 0.1:
            follow_rows.append((follower, follower, 0, moment(100, 2000)))

    kinds = ["view"] * 6 + ["like", "comment", "share", "bookmark", "VIEW"]
    events = []
    for _ in range(6000):
        if events and rng.random() < 0.05:  # a repeat, at its own time or the same
            _, user, post_id, kind = events[-1]
            events.append(
                (events[-1][0] if rng.random() < 0.5 else moment(-2, 80), user, post_id, kind)
            )
            continue
        user = min(int(rng.paretovariate(0.8)), 90)
        events.append((moment(-2, 80), user, rng.randint(1, 720), rng.choice(kinds)))
    return posts, follow_rows, events


def test_randomized_dataset_matches_an_independent_implementation(ch, redis_cache):
    rng = random.Random(20261128)
    posts, follow_rows, events = random_dataset(rng, AS_OF)
    add_posts(ch, posts)
    add_follows(ch, follow_rows)
    insert_events(ch, events)
    expected = reference_feeds(events, posts, follow_rows, AS_OF)
    # The data exercises what it should: capped feeds, empty feeds, a real ranking of users.
    assert any(len(f) == FEED_LENGTH for f in expected.values())
    assert any(not f for f in expected.values())

    result = materialize(ch, redis_cache)

    assert warmed_users(redis_cache) == set(expected)
    for user_id, feed in expected.items():
        items = served(redis_cache, user_id)["items"]
        assert [(i["post_id"], i["author_id"]) for i in items] == [(p, a) for p, a, _ in feed], (
            f"user {user_id}"
        )
        for item, (_, _, score) in zip(items, feed, strict=True):
            assert item["score"] == pytest.approx(score, rel=1e-9)
    assert_ttls(redis_cache, expected)
    assert all(checks_of(result).values())

    # The user count is a parameter: the top 15 by activity, most active first.
    top = reference_feeds(events, posts, follow_rows, AS_OF, users=15)
    ranked = rank_feeds(ch, AS_OF, users=15)
    assert [f.user_id for f in ranked] == list(top)
    assert [[i["post_id"] for i in f.items] for f in ranked] == [
        [p for p, _, _ in top[f.user_id]] for f in ranked
    ]


# -- writes -----------------------------------------------------------------------------------


class _CountingRedisCache(RedisCacheResource):
    """The real resource, counting how many pipelines are in flight at once."""

    _lock: Any = PrivateAttr(default_factory=threading.Lock)
    _in_flight: int = PrivateAttr(default=0)
    _peak: int = PrivateAttr(default=0)

    def set_many_json(self, entries):
        with self._lock:
            self._in_flight += 1
            self._peak = max(self._peak, self._in_flight)
        try:
            time.sleep(0.02)  # long enough for every writer to start
            return super().set_many_json(entries)
        finally:
            with self._lock:
                self._in_flight -= 1

    @property
    def peak(self) -> int:
        return self._peak


def test_a_session_lost_mid_run_is_retried_in_a_new_session_with_the_same_feeds(ch, redis_cache):
    """On a server, a balancer may send the ranking query where the run's tables are not.

    The step then fails as a transient fault, and its retry ranks again in a new session.
    """
    posts, follow_rows, events = random_dataset(random.Random(20261130), AS_OF)
    add_posts(ch, posts)
    add_follows(ch, follow_rows)
    insert_events(ch, events)
    materialize(ch, redis_cache)
    expected = {u: feed_ids(redis_cache, u) for u in warmed_users(redis_cache)}
    assert any(expected.values())
    forgetful = SessionLosingClickHouse(url=ch.url, query=FEEDS_SQL, lose_before=[1])
    cache = RedisCacheResource(url=REDIS_URL, key_prefix=f"{redis_cache.key_prefix}lost:")
    try:
        result = materialize(forgetful, cache)

        assert result.success
        retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
        assert len(retries) == 1
        message = retries[0].event_specific_data.error.to_string()
        assert "session holding the run's tables" in message and "UNKNOWN_TABLE" in message
        assert {u: feed_ids(cache, u) for u in warmed_users(cache)} == expected
        assert all(checks_of(result).values())
    finally:
        cache.close()
        forgetful.close()


def test_a_lost_session_is_transient_and_a_missing_source_table_permanent(ch):
    forgetful = SessionLosingClickHouse(url=ch.url, query=FEEDS_SQL, lose_before=[1])
    try:
        with pytest.raises(FeedsSessionLostError) as raised:
            rank_feeds(forgetful, AS_OF)
    finally:
        forgetful.close()
    assert permanent_reason(raised.value) is None
    assert permanent_reason(raised.value.__cause__) is not None  # UNKNOWN_TABLE, on its own
    assert "deploy/README.md" in str(raised.value)
    ch.command("RENAME TABLE nova.follows TO nova.follows_gone")
    try:
        with pytest.raises(Exception, match="UNKNOWN_TABLE") as missing:
            rank_feeds(ch, AS_OF)
    finally:
        ch.command("RENAME TABLE nova.follows_gone TO nova.follows")
    assert not isinstance(missing.value, FeedsSessionLostError)
    assert permanent_reason(missing.value) is not None


def test_writes_keep_at_most_20_pipelines_in_flight(redis_cache):
    counting = _CountingRedisCache(url=REDIS_URL, key_prefix=redis_cache.key_prefix)
    values = [{"user_id": u, "as_of": "x", "generated_at": "x", "items": []} for u in range(500)]
    try:
        assert write_feeds(counting, values, TTL, batch=5) == 500
        assert counting.peak == 20
    finally:
        counting.close()
    assert warmed_users(redis_cache) == set(range(500))
    assert_ttls(redis_cache, range(500))


# -- checks -----------------------------------------------------------------------------------


def _item(post_id, score, author_id=10):
    return {"post_id": post_id, "author_id": author_id, "score": score}


def _failed(served_values, ttls=None, *, followees=None, posts=None):
    results = evaluate_checks(
        served_values,
        ttls if ttls is not None else dict.fromkeys(served_values, TTL),
        feed_ttl_sec=TTL,
        as_of=AS_OF,
        followees=followees or {},
        posts=posts or {},
    )
    return {name for name, (passed, _) in results.items() if not passed}


def _value(user_id, items):
    return {"user_id": user_id, "as_of": iso_z(AS_OF), "generated_at": iso_z(AS_OF), "items": items}


def test_checks_pass_on_good_feeds():
    good = {1: _value(1, [_item(3, 2.0), _item(9, 1.0), _item(8, 1.0)]), 2: _value(2, [])}
    assert _failed(good) == set()


def test_keys_have_ttl_fails_on_missing_lasting_or_foreign_keys(redis_cache, raw_redis):
    for user_id in (1, 2, 3, 4, 5):
        raw_redis.set(redis_cache.key("feed", user_id), json.dumps(_value(user_id, [])), ex=TTL)
    raw_redis.persist(redis_cache.key("feed", 2))  # no TTL
    raw_redis.expire(redis_cache.key("feed", 3), 10 * TTL)  # longer than the contract's
    raw_redis.set(redis_cache.key("feed", 4), json.dumps(_value(40, [])), ex=TTL)  # wrong user
    raw_redis.set(redis_cache.key("feed", 5), "not json", ex=TTL)
    good, ttls = read_served(redis_cache, [1])
    assert _failed(good, ttls) == set()
    for user_id in (2, 3, 4, 5, 6):  # 6 was never written
        values, ttls = read_served(redis_cache, [1, user_id])
        assert _failed(values, ttls) == {"keys_have_ttl"}, user_id


def test_ordered_and_capped_fails_on_each_kind_of_disorder():
    def failed(items):
        return _failed({1: _value(1, items)})

    assert failed([_item(1, 1.0), _item(2, 2.0)]) == {"ordered_and_capped"}
    assert failed([_item(1, 1.0), _item(2, 1.0)]) == {"ordered_and_capped"}  # tie: post_id desc
    assert failed([_item(2, 2.0), _item(2, 1.0)]) == {"ordered_and_capped"}  # duplicate post
    assert failed([_item(1, "high")]) == {"ordered_and_capped"}
    assert failed([_item(p, 1000.0 - p) for p in range(51)]) == {"ordered_and_capped"}
    assert failed([_item(p, 1000.0 - p) for p in range(50)]) == set()


def test_posts_from_live_followees_fails_on_each_bad_post(ch):
    add_follows(ch, [*follows(1, 1, 10), (1, 11, 0, LONG_AGO), (1, 11, 1, AS_OF)])
    recent = ago(AS_OF, hours=1)
    add_posts(
        ch,
        post(100, 10, recent)
        + post(101, 10, recent, deleted_at=ago(AS_OF, minutes=1))
        + post(102, 11, recent)  # by an unfollowed user
        + post(103, 10, ago(AS_OF, hours=73))
        + post(104, 1, recent)  # the user's own
        + post(106, 10, AS_OF + timedelta(minutes=1)),
    )

    def failed(items):
        value = {1: _value(1, items)}
        followees, posts = contract_facts(ch, value)
        return _failed(value, followees=followees, posts=posts)

    good = _item(100, 1.0)
    assert contract_facts(ch, {1: _value(1, [good])})[0] == {1: {10}}
    assert failed([good]) == set()
    for bad in (
        _item(101, 0.5),  # deleted
        _item(102, 0.5, author_id=11),  # by an unfollowed user
        _item(103, 0.5),  # older than 72 h
        _item(104, 0.5, author_id=1),  # the user's own
        _item(105, 0.5),  # missing
        _item(106, 0.5),  # created after as_of
    ):
        assert failed([good, bad]) == {"posts_from_live_followees"}, bad
    assert failed([_item(100, 1.0, author_id=11)]) == {"posts_from_live_followees"}  # wrong author
    # Users outside the sample are not judged against ClickHouse.
    outside = {1: _value(1, [_item(105, 1.0)])}
    assert _failed(outside, followees={}, posts={}) == set()
