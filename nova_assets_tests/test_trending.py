"""Trending posts: the three windows rank exactly as docs/design.md §3 says and serve §4's value.

Hand-built datasets whose rankings are worked out here from the formula, every kind of dirty
input excluded as the contract says, a randomized dataset compared item by item with an
independent pure-Python ranking, the empty-ranking guard, each asset check failing on broken
data, a reader that never sees the key missing, and materializations through Dagster's API and
its command line.
"""

import json
import os
import random
import subprocess
import sys
import threading
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest

from nova_assets.core.contract import iso_z
from nova_assets.core.jobs import windows
from nova_assets.defs.trending.assets import (
    build_trending_asset,
    evaluate_checks,
    live_posts,
    rank,
)
from nova_assets_tests.conftest import REDIS_URL
from nova_assets_tests.factories import ago, insert_events, insert_posts, post, reset

AS_OF = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
WINDOWS = {w.name: w for w in windows()}
WEIGHTS = {"view": 0.1, "like": 1.0, "comment": 2.0, "share": 3.0}


@pytest.fixture
def ch(clickhouse):
    reset(clickhouse)
    return clickhouse


def materialize(window_name, clickhouse, redis_cache, as_of=AS_OF, *, raise_on_error=True):
    asset = build_trending_asset(WINDOWS[window_name])
    return dg.materialize(
        [asset],
        resources={"clickhouse": clickhouse, "redis_cache": redis_cache},
        run_config={"ops": {asset.op.name: {"config": {"as_of": iso_z(as_of)}}}},
        raise_on_error=raise_on_error,
    )


def served(redis_cache, window_name):
    return redis_cache.get_json(redis_cache.key("trending", window_name))


def ids(items):
    return [item["post_id"] for item in items]


# -- hand-built rankings, one per window ------------------------------------------------------


@pytest.mark.parametrize("window_name", ["1h", "24h", "7d"])
def test_hand_built_ranking_matches_the_formula(ch, redis_cache, window_name):
    window = WINDOWS[window_name]
    hours = window.length.total_seconds() / 3600
    d = window.decay_per_hour
    # Ages chosen as fractions of the window so every window sees the same shape.
    a1, a2, a3 = 0.1 * hours, 0.5 * hours, 0.9 * hours
    insert_posts(
        ch,
        post(1, 100, ago(AS_OF, days=8))
        + post(2, 200, ago(AS_OF, days=8))
        + post(3, 300, ago(AS_OF, days=8)),
    )
    insert_events(
        ch,
        [
            (ago(AS_OF, hours=a1), 11, 1, "like"),
            (ago(AS_OF, hours=a3), 12, 1, "share"),
            (ago(AS_OF, hours=a2), 11, 2, "comment"),
            (ago(AS_OF, hours=a2), 12, 2, "comment"),
            (ago(AS_OF, hours=a1), 13, 2, "view"),
            (ago(AS_OF, hours=a3), 11, 3, "view"),
            # Outside the window by one millisecond: ignored.
            (AS_OF - window.length, 14, 3, "share"),
        ],
    )
    expected = {
        1: 1.0 * d**a1 + 3.0 * d**a3,
        2: 2 * 2.0 * d**a2 + 0.1 * d**a1,
        3: 0.1 * d**a3,
    }
    order = sorted(expected, key=lambda p: (-expected[p], p))
    authors = {1: 100, 2: 200, 3: 300}

    result = materialize(window_name, ch, redis_cache)

    value = served(redis_cache, window_name)
    assert value["window"] == window_name
    assert value["as_of"] == "2026-11-28T12:00:00.000Z"
    assert value["generated_at"].endswith("Z")
    assert [(i["rank"], i["post_id"], i["author_id"]) for i in value["items"]] == [
        (r, p, authors[p]) for r, p in enumerate(order, start=1)
    ]
    for item in value["items"]:
        assert item["score"] == pytest.approx(expected[item["post_id"]], rel=1e-9)
    ttl = redis_cache.ttl(redis_cache.key("trending", window_name))
    assert 0 < ttl <= window.ttl_sec
    metadata = result.asset_materializations_for_node(window.asset_name)[0].metadata
    assert metadata["dagster/row_count"].value == 3
    assert metadata["kept_previous"].value is False
    assert metadata["events_scanned"].value == 6
    assert all(e.passed for e in result.get_asset_check_evaluations())


# -- dirty input, one test per case -----------------------------------------------------------


def rank_1h(ch):
    return rank(ch, WINDOWS["1h"], AS_OF).items


def test_unknown_event_types_weigh_nothing(ch):
    insert_posts(ch, post(1, 1, ago(AS_OF, days=1)) + post(2, 2, ago(AS_OF, days=1)))
    t = ago(AS_OF, minutes=30)
    insert_events(ch, [(t, 5, 1, "bookmark"), (t, 5, 1, "VIEW"), (t, 5, 1, ""), (t, 6, 2, "like")])
    ranking = rank(ch, WINDOWS["1h"], AS_OF)
    assert ids(ranking.items) == [2]
    # The metadata still counts them: scanned, though only one of the four weighs anything.
    assert (ranking.events_scanned, ranking.weighted_events) == (4, 1)


def test_events_on_missing_posts_are_excluded(ch):
    insert_posts(ch, post(1, 1, ago(AS_OF, days=1)))
    t = ago(AS_OF, minutes=10)
    insert_events(ch, [(t, 5, 999, "share"), (t, 6, 999, "share"), (t, 7, 1, "view")])
    assert ids(rank_1h(ch)) == [1]


def test_events_on_deleted_posts_are_excluded_even_when_deleted_after_them(ch):
    insert_posts(
        ch,
        post(1, 1, ago(AS_OF, days=1), deleted_at=ago(AS_OF, days=1) + timedelta(minutes=1))
        + post(2, 2, ago(AS_OF, days=1), deleted_at=ago(AS_OF, minutes=1))
        + post(3, 3, ago(AS_OF, days=1))
        # Deleted at the instant it was created: of two rows at one time, the deleting one wins.
        + post(4, 4, ago(AS_OF, days=1), deleted_at=ago(AS_OF, days=1)),
    )
    t = ago(AS_OF, minutes=20)
    insert_events(
        ch, [(t, 5, 1, "share"), (t, 5, 2, "share"), (t, 5, 3, "view"), (t, 5, 4, "share")]
    )
    assert ids(rank_1h(ch)) == [3]


def test_duplicate_events_count_once_at_their_latest_time(ch):
    insert_posts(ch, post(1, 1, ago(AS_OF, days=1)))
    d = WINDOWS["1h"].decay_per_hour
    insert_events(
        ch,
        [
            (ago(AS_OF, minutes=50), 5, 1, "like"),
            (ago(AS_OF, minutes=30), 5, 1, "like"),
            (ago(AS_OF, minutes=30), 5, 1, "like"),
            (ago(AS_OF, minutes=6), 5, 1, "like"),
            (AS_OF + timedelta(minutes=3), 5, 1, "like"),
            (ago(AS_OF, minutes=40), 5, 1, "share"),
            (ago(AS_OF, minutes=40), 6, 1, "like"),
        ],
    )
    [item] = rank_1h(ch)
    expected = 1.0 * d**0.1 + 3.0 * d ** (40 / 60) + 1.0 * d ** (40 / 60)
    assert item["score"] == pytest.approx(expected, rel=1e-9)


def test_events_after_as_of_do_not_exist(ch):
    insert_posts(ch, post(1, 1, ago(AS_OF, days=1)) + post(2, 2, ago(AS_OF, days=1)))
    insert_events(
        ch,
        [
            (AS_OF + timedelta(milliseconds=1), 5, 1, "share"),
            (AS_OF + timedelta(hours=2), 6, 1, "share"),
            (AS_OF, 7, 2, "view"),
        ],
    )
    [item] = rank_1h(ch)
    assert item["post_id"] == 2
    assert item["score"] == pytest.approx(0.1, rel=1e-12)


def test_posts_created_after_as_of_are_not_eligible(ch):
    insert_posts(ch, post(1, 1, AS_OF + timedelta(minutes=1)) + post(2, 2, AS_OF))
    t = ago(AS_OF, minutes=5)
    insert_events(ch, [(t, 5, 1, "share"), (t, 5, 2, "view")])
    assert ids(rank_1h(ch)) == [2]


def test_an_author_keeps_only_their_best_three_posts(ch):
    rows = []
    for p in range(1, 7):
        rows += post(p, 42, ago(AS_OF, days=1))
    rows += post(7, 43, ago(AS_OF, days=1))
    insert_posts(ch, rows)
    t = ago(AS_OF, minutes=1)
    # Post p gets p likes from distinct users, so the author's best three are 6, 5 and 4.
    insert_events(ch, [(t, 1000 + u, p, "like") for p in range(1, 7) for u in range(p)])
    insert_events(ch, [(t, 1, 7, "view")])
    items = rank_1h(ch)
    assert ids(items) == [6, 5, 4, 7]
    assert Counter(i["author_id"] for i in items) == {42: 3, 43: 1}


def test_only_the_top_fifty_are_kept(ch):
    insert_posts(ch, [row for p in range(1, 81) for row in post(p, p, ago(AS_OF, days=1))])
    insert_events(ch, [(ago(AS_OF, minutes=p % 59), 7, p, "like") for p in range(1, 81)])
    items = rank_1h(ch)
    assert len(items) == 50
    assert [i["rank"] for i in items] == list(range(1, 51))


# -- randomized dataset against an independent implementation ---------------------------------


def reference_ranking(events, posts, as_of, length, decay):
    """docs/design.md §3 trending, written plainly in Python."""
    latest = {}
    for t, user, post_id, kind in events:
        if kind in WEIGHTS and as_of - length < t <= as_of:
            key = (post_id, user, kind)
            latest[key] = max(latest.get(key, t), t)
    scores = defaultdict(float)
    for (post_id, _, kind), t in latest.items():
        scores[post_id] += WEIGHTS[kind] * decay ** ((as_of - t).total_seconds() / 3600)
    state = {}
    for row in posts:
        if row[0] not in state or row[4] > state[row[0]][4]:
            state[row[0]] = row
    eligible = sorted(
        (
            (-s, p)
            for p, s in scores.items()
            if p in state and state[p][3] == 0 and state[p][2] <= as_of
        ),
    )
    ranking, per_author = [], Counter()
    for negative, post_id in eligible:
        author = state[post_id][1]
        if per_author[author] < 3:
            per_author[author] += 1
            ranking.append((post_id, author, -negative))
        if len(ranking) == 50:
            break
    return ranking


def random_dataset(rng: random.Random, as_of: datetime):
    posts, events = [], []
    for post_id in range(1, 401):
        created = as_of - timedelta(seconds=rng.uniform(-3600, 9 * 86400))
        author = rng.randint(1, 40)
        posts.append((post_id, author, created, 0, created))
        if rng.random() < 0.1:
            posts.append(
                (post_id, author, created, 1, created + timedelta(seconds=rng.randint(1, 10**6)))
            )
    kinds = ["view"] * 8 + ["like", "comment", "share", "bookmark"]
    span_ms = 8 * 86400 * 1000
    for _ in range(4000):
        t = as_of - timedelta(milliseconds=rng.randint(-3_600_000, span_ms))
        post_id = min(int(rng.paretovariate(1.0)), 450)
        events.append((t, rng.randint(1, 60), post_id, rng.choice(kinds)))
    events += [events[i] for i in range(0, 4000, 37)]
    return events, posts


def test_randomized_dataset_matches_an_independent_ranking(ch, redis_cache):
    rng = random.Random(20261128)
    events, posts = random_dataset(rng, AS_OF)
    insert_posts(ch, posts)
    insert_events(ch, events)
    for window in windows():
        materialize(window.name, ch, redis_cache)
        expected = reference_ranking(events, posts, AS_OF, window.length, window.decay_per_hour)
        items = served(redis_cache, window.name)["items"]
        assert len(items) == len(expected) > 0, window.name
        for item, (post_id, author, score) in zip(items, expected, strict=True):
            assert (item["post_id"], item["author_id"]) == (post_id, author), window.name
            assert item["score"] == pytest.approx(score, rel=1e-9)


def test_pruning_to_candidates_never_changes_the_ranking(ch):
    rng = random.Random(7)
    events, posts = random_dataset(rng, AS_OF)
    insert_posts(ch, posts)
    insert_events(ch, events)
    widened = set()
    for window in windows():
        expected = reference_ranking(events, posts, AS_OF, window.length, window.decay_per_hour)
        for candidates in (1, 5, 80, 1000):
            ranking = rank(ch, window, AS_OF, candidates=candidates)
            assert [(i["post_id"], i["author_id"]) for i in ranking.items] == [
                (p, a) for p, a, _ in expected
            ], (window.name, candidates)
            widened.add(ranking.widened)
    # Both paths ran: rankings proven from few candidates, and rankings that needed every post.
    assert widened == {True, False}


# -- the empty-ranking guard and the checks ---------------------------------------------------


def test_an_empty_ranking_keeps_the_previous_value(ch, redis_cache):
    insert_posts(ch, post(1, 1, ago(AS_OF, days=1)))
    insert_events(ch, [(ago(AS_OF, minutes=5), 5, 1, "share")])
    materialize("1h", ch, redis_cache)
    before = served(redis_cache, "1h")
    assert ids(before["items"]) == [1]

    # An hour later the window holds only an event on a post that does not exist.
    insert_events(ch, [(AS_OF + timedelta(minutes=30), 5, 999, "share")])
    result = materialize("1h", ch, redis_cache, as_of=AS_OF + timedelta(hours=1))

    assert result.success
    assert served(redis_cache, "1h") == before
    metadata = result.asset_materializations_for_node("trending_posts_1h")[0].metadata
    assert metadata["kept_previous"].value is True
    assert metadata["dagster/row_count"].value == 0
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not checks["non_empty"].passed
    assert checks["non_empty"].severity == dg.AssetCheckSeverity.WARN
    assert all(e.passed for name, e in checks.items() if name != "non_empty")


def test_an_empty_window_passes_the_non_empty_check(ch, redis_cache):
    result = materialize("1h", ch, redis_cache)
    assert served(redis_cache, "1h")["items"] == []
    assert all(e.passed for e in result.get_asset_check_evaluations())


def _good_items():
    return [
        {"rank": 1, "post_id": 1, "author_id": 10, "score": 3.0},
        {"rank": 2, "post_id": 2, "author_id": 10, "score": 2.0},
        {"rank": 3, "post_id": 3, "author_id": 11, "score": 1.0},
    ]


def _failed(items, **overrides):
    arguments = {
        "live_post_ids": {i["post_id"] for i in items},
        "ttl": 600,
        "computed_empty": False,
        "weighted_events": 10,
    } | overrides
    return {name for name, (passed, _) in evaluate_checks(items, **arguments).items() if not passed}


def test_checks_pass_on_a_good_ranking():
    assert _failed(_good_items()) == set()


def test_each_check_fails_on_broken_data(ch, redis_cache, raw_redis):
    items = _good_items()
    assert _failed(list(reversed(items))) == {"scores_non_increasing"}
    assert _failed([*items, items[0] | {"rank": 4, "score": 0.5}]) == {"no_duplicate_posts"}
    crowded = [{"rank": r, "post_id": r, "author_id": 10, "score": 10.0 - r} for r in range(1, 5)]
    assert _failed(crowded) == {"at_most_3_per_author"}
    assert _failed(items, computed_empty=True) == {"non_empty"}

    # posts_live asks ClickHouse: post 2 is deleted, post 3 never existed.
    insert_posts(ch, post(1, 10, AS_OF) + post(2, 10, AS_OF, deleted_at=AS_OF + timedelta(1)))
    assert live_posts(ch, [1, 2, 3]) == {1}
    assert _failed(items, live_post_ids=live_posts(ch, [1, 2, 3])) == {"posts_live"}

    # key_has_ttl reads Redis: a key written without TTL, and a missing key, both fail.
    key = redis_cache.key("trending", "1h")
    raw_redis.set(key, json.dumps({"items": items}))
    assert _failed(items, ttl=redis_cache.ttl(key)) == {"key_has_ttl"}
    raw_redis.delete(key)
    assert _failed(items, ttl=redis_cache.ttl(key)) == {"key_has_ttl"}


# -- readers and entry points -----------------------------------------------------------------


def test_a_reader_never_sees_the_key_missing_during_rematerializations(ch, redis_cache, raw_redis):
    insert_posts(ch, [row for p in range(1, 31) for row in post(p, p, ago(AS_OF, days=1))])
    insert_events(ch, [(ago(AS_OF, minutes=p), p, p, "like") for p in range(1, 31)])
    key = redis_cache.key("trending", "1h")
    materialize("1h", ch, redis_cache)
    misses, reads = [], [0]
    stop = threading.Event()

    def read():
        while not stop.is_set():
            reads[0] += 1
            raw = raw_redis.get(key)
            if raw is None or len(json.loads(raw)["items"]) != 30:
                misses.append(raw)

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(20):
        materialize("1h", ch, redis_cache, as_of=AS_OF + timedelta(seconds=i))
    stop.set()
    reader.join()
    assert misses == []
    assert reads[0] > 20


def test_materialize_from_the_command_line_with_as_of(ch, redis_cache, tmp_path):
    insert_posts(ch, post(1, 7, ago(AS_OF, days=2)))
    insert_events(ch, [(ago(AS_OF, hours=3), 5, 1, "comment")])
    # The embedded engine admits one process: release it for the command's run.
    ch.close()
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = os.environ | {
        "DAGSTER_HOME": str(tmp_path),
        "CLICKHOUSE_URL": ch.url,
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": redis_cache.key_prefix,
    }
    config = {"ops": {"trending_posts_24h": {"config": {"as_of": "2026-11-28T12:00:00Z"}}}}
    completed = subprocess.run(
        [
            str(Path(sys.executable).parent / "dagster"),
            "asset",
            "materialize",
            "-m",
            "nova_assets.definitions",
            "--select",
            "trending_posts_24h",
            "--config-json",
            json.dumps(config),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    value = served(redis_cache, "24h")
    assert value["as_of"] == "2026-11-28T12:00:00.000Z"
    [item] = value["items"]
    assert (item["post_id"], item["author_id"]) == (1, 7)
    assert item["score"] == pytest.approx(2.0 * 0.9**3, rel=1e-9)
