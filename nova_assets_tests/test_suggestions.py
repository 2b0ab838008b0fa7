"""Suggested users: every active user gets docs/design.md §3's list, served as §4's value.

Hand-built graphs whose lists are worked out here, one test per kind of dirty input (self-follows,
unfollows and re-follows, blocks either way and unblocks, users who follow nobody, neighbourhoods
already followed, users without events, duplicate rows), the top-20 cut and its ties, a
randomized graph compared user by user with an independent pure-Python implementation, the
empty-list guard, a step that fails halfway through its batches and is retried (every key stays
whole, old or new, and ends new), a ClickHouse session lost mid-run (the graph is rebuilt in a new
session and every list comes out the same; lost again and again, the step fails as a transient
fault), each asset check failing on broken data, and the asset loading next to its job of the
same name.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import dagster as dg
import pytest
import redis
from clickhouse_connect.driver.exceptions import DatabaseError
from pydantic import Field

from nova_assets.core.contract import iso_z, permanent_reason
from nova_assets.core.jobs import SUGGESTIONS_ASSET as ASSET_NAME
from nova_assets.core.jobs import SUGGESTIONS_JOB as JOB_NAME
from nova_assets.core.jobs import SUGGESTIONS_OP as OP_NAME
from nova_assets.core.resources import RedisCacheResource
from nova_assets.defs.suggestions.assets import (
    FINISH_OP,
    PLAN_OP,
    SHARD_OP,
    build_suggested_users_asset,
)
from nova_assets.defs.suggestions.checks import Exclusions, evaluate_checks, live_exclusions
from nova_assets.defs.suggestions.graph import (
    MAX_SESSION_LOSSES,
    SessionLostError,
    session_lost,
    suggestion_graph,
)
from nova_assets.defs.suggestions.ranking import rank_users
from nova_assets.defs.suggestions.shards import SHARD_USERS
from nova_assets.defs.suggestions.sql import RANKING_SQL
from nova_assets_tests.conftest import REDIS_URL, GateProxy
from nova_assets_tests.factories import (
    SessionLosingClickHouse,
    ago,
    insert_edges,
    insert_events,
    reset,
)

AS_OF = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
FOLLOWED_AT = ago(AS_OF, days=30)


@pytest.fixture
def ch(clickhouse):
    reset(clickhouse)
    return clickhouse


def materialize(
    clickhouse, redis_cache, as_of=AS_OF, *, chunk_users=2000, instance=None, raise_on_error=True
):
    asset = build_suggested_users_asset(chunk_users=chunk_users)
    return dg.materialize(
        [asset],
        resources={"clickhouse": clickhouse, "redis_cache": redis_cache},
        run_config={"ops": {OP_NAME: {"config": {"as_of": iso_z(as_of)}}}},
        instance=instance,
        raise_on_error=raise_on_error,
    )


def follows(ch, *edges, at=FOLLOWED_AT, deleted=0):
    insert_edges(ch, "follows", [(a, b, deleted, at) for a, b in edges])


def blocks(ch, *edges, at=FOLLOWED_AT, deleted=0):
    insert_edges(ch, "blocks", [(a, b, deleted, at) for a, b in edges])


def active(ch, *users, at=None, kind="view"):
    insert_events(ch, [(at or ago(AS_OF, hours=1), u, 1, kind) for u in users])


def served(redis_cache, user_id):
    return redis_cache.get_json(redis_cache.key(ASSET_NAME, user_id))


def items(redis_cache, user_id):
    """The served list as (user_id, mutuals, followers) triples."""
    value = served(redis_cache, user_id)
    assert value is not None, f"no suggestions served for user {user_id}"
    return [(i["user_id"], i["mutuals"], i["followers"]) for i in value["items"]]


def metadata(result):
    return {
        k: v.value for k, v in result.asset_materializations_for_node(OP_NAME)[0].metadata.items()
    }


def all_checks_pass(result):
    evaluations = result.get_asset_check_evaluations()
    assert len(evaluations) == 4
    return all(e.passed for e in evaluations)


def test_the_asset_and_its_job_load_together(clickhouse, redis_cache):
    asset = build_suggested_users_asset(ttl_sec=600)
    job = dg.define_asset_job(JOB_NAME, selection=[ASSET_NAME])
    resources = {"clickhouse": clickhouse, "redis_cache": redis_cache}
    defs = dg.Definitions(assets=[asset], jobs=[job], resources=resources)
    defs.get_repository_def().load_all_definitions()
    assert asset.key == dg.AssetKey(ASSET_NAME)
    assert asset.node_def.name == OP_NAME != JOB_NAME
    assert asset.group_names_by_key[asset.key] == "suggestions"
    assert asset.specs_by_key[asset.key].kinds == {"clickhouse", "redis"}
    # Every step retries and takes the ClickHouse slot: the plan, each shard, the finish.
    steps = {op.name: op for op in asset.node_def.iterate_op_defs()}
    assert set(steps) == {PLAN_OP, SHARD_OP, FINISH_OP}
    for op in steps.values():
        assert op.retry_policy.max_retries == 5
        assert op.pool == "clickhouse"
    assert asset.specs_by_key[asset.key].metadata["ttl_seconds"] == 600
    assert {k.name for k in asset.check_keys} == {
        "no_excluded_suggestions",
        "at_most_20_per_user",
        "ordered_by_contract",
        "keys_have_ttl",
    }


# -- a hand-built graph -------------------------------------------------------------------------


def test_hand_built_graph_matches_the_worked_lists(ch, redis_cache):
    # User 1 follows 2, 3 and 4. Their followees:
    follows(ch, (1, 2), (1, 3), (1, 4))
    follows(ch, (2, 5), (2, 6), (2, 7), (2, 14), (2, 15))
    follows(ch, (3, 5), (3, 6), (3, 8))
    follows(ch, (4, 5), (4, 9), (4, 1))  # 4 follows 1 back: 1 is never its own candidate
    # Followers from outside 1's neighbourhood, and two users only they follow.
    follows(ch, (10, 7), (11, 7), (10, 8), (10, 12), (11, 12), (10, 13))
    active(ch, 1, 10)
    #   candidate  mutuals (of 2, 3, 4)  followers
    #   5          3                     3 (2, 3, 4)
    #   6          2                     2 (2, 3)
    #   7          1                     3 (2, 10, 11)
    #   8          1                     2 (3, 10)
    #   9, 14, 15  1                     1 each: ties, by user id
    # then the fill, most followed first: 12 (10, 11) and 13 (10); 1-4 are excluded.
    expected_1 = [
        (5, 3, 3),
        (6, 2, 2),
        (7, 1, 3),
        (8, 1, 2),
        (9, 1, 1),
        (14, 1, 1),
        (15, 1, 1),
        (12, 0, 2),
        (13, 0, 1),
    ]
    # User 10 follows 7, 8, 12 and 13, who follow nobody: the fill only, without them. By
    # followers: 5 (3), 6 (2), then 1, 2, 3, 4, 9, 14, 15 with one each.
    expected_10 = [(5, 0, 3), (6, 0, 2)] + [(u, 0, 1) for u in (1, 2, 3, 4, 9, 14, 15)]
    instance = dg.DagsterInstance.ephemeral()

    result = materialize(ch, redis_cache, instance=instance)

    assert items(redis_cache, 1) == expected_1
    assert items(redis_cache, 10) == expected_10
    value = served(redis_cache, 1)
    assert value["user_id"] == 1
    assert value["as_of"] == "2026-11-28T12:00:00.000Z"
    assert value["generated_at"].endswith("Z")
    assert set(value) == {"user_id", "as_of", "generated_at", "items"}
    ttl = redis_cache.ttl(redis_cache.key(ASSET_NAME, 1))
    assert 86_000 < ttl <= 86_400
    meta = metadata(result)
    assert meta["dagster/row_count"] == meta["users_served"] == 2
    assert meta["suggestions_written"] == len(expected_1) + len(expected_10)
    assert meta["users_needing_fill"] == 2
    assert meta["users_kept_previous"] == 0
    assert meta["batches"] == 1
    assert meta["as_of"] == "2026-11-28T12:00:00.000Z"
    assert meta["live_follow_edges"] == 20
    assert meta["users_per_second"] > 0
    assert "| 1 | 1 | 5 | 3 | 3 |" in meta["sample"]
    assert all_checks_pass(result)
    messages = [e.user_message for e in instance.all_logs(result.run_id)]
    assert any("2/2 users written (100%)" in m and "users/s" in m for m in messages)


def test_only_the_top_twenty_are_kept_in_contract_order(ch, redis_cache):
    # 1 follows hubs 2 and 3. 2 follows candidates 100..124, 3 follows the even ones; candidate
    # 100 + i also has i followers of its own (users 1000 + j), so followers = i + 1 or i + 2.
    follows(ch, (1, 2), (1, 3))
    follows(ch, *[(2, 100 + i) for i in range(25)])
    follows(ch, *[(3, 100 + i) for i in range(0, 25, 2)])
    follows(ch, *[(1000 + j, 100 + i) for i in range(25) for j in range(i)])
    active(ch, 1)
    evens = [
        (100 + i, 2, i + 2) for i in range(24, -1, -2)
    ]  # 13 with 2 mutuals, most followed first
    odds = [(100 + i, 1, i + 1) for i in range(23, 0, -2)]  # 12 with 1 mutual

    materialize(ch, redis_cache)

    assert items(redis_cache, 1) == (evens + odds)[:20]


# -- dirty input, one test per case -------------------------------------------------------------


def test_self_follows_are_ignored(ch, redis_cache):
    follows(ch, (1, 1), (1, 2), (2, 2), (2, 3), (3, 3))
    # 9 follows only themselves: one "follower" if self-follows counted, so a fill candidate.
    follows(ch, (9, 9))
    active(ch, 1)

    materialize(ch, redis_cache)

    # 3 is followed by 2 only; nobody else has a real follower outside 1's exclusions.
    assert items(redis_cache, 1) == [(3, 1, 1)]


def test_unfollows_and_refollows_resolve_to_the_latest_row(ch, redis_cache):
    t0 = FOLLOWED_AT
    follows(ch, (1, 2), (2, 3), (2, 4), (2, 5), (2, 6), at=t0)
    # 1 unfollowed 3: 3 is a candidate again (2 still follows it). The deleting row is inserted
    # before the row it supersedes; order of insertion never matters.
    follows(ch, (1, 3), at=t0 + timedelta(days=2), deleted=1)
    follows(ch, (1, 3), at=t0)
    # 2 unfollowed 4 and followed again: live. 2 unfollowed 5: 5 is no candidate and has no
    # follower left, so it is not in the fill either.
    follows(ch, (2, 4), at=t0 + timedelta(days=1), deleted=1)
    follows(ch, (2, 4), at=t0 + timedelta(days=2))
    follows(ch, (2, 5), at=t0 + timedelta(days=1), deleted=1)
    # A follow and an unfollow at the same instant: the unfollow wins, so 1 does not follow 6
    # (inserted last, so a background merge of the tied rows agrees).
    follows(ch, (1, 6), at=t0 + timedelta(days=3))
    follows(ch, (1, 6), at=t0 + timedelta(days=3), deleted=1)
    active(ch, 1)

    materialize(ch, redis_cache)

    assert items(redis_cache, 1) == [(3, 1, 1), (4, 1, 1), (6, 1, 1)]


def test_blocks_either_way_exclude_and_unblocks_do_not(ch, redis_cache):
    t0 = FOLLOWED_AT
    follows(ch, (1, 2), (2, 3), (2, 4), (2, 5), (2, 6))
    blocks(ch, (1, 3), (4, 1))  # 1 blocked 3; 4 blocked 1
    blocks(ch, (1, 5), (6, 1), at=t0)  # both lifted later
    blocks(ch, (1, 5), (6, 1), at=t0 + timedelta(days=1), deleted=1)
    # The most followed: 7 (3 followers) and 11 (2) are blocked, one each way; 12 is not.
    follows(ch, (8, 7), (9, 7), (10, 7), (8, 11), (9, 11), (8, 12))
    blocks(ch, (1, 7), (11, 1))
    # A block and an unblock at the same instant: the block holds (13 is followed by 8 and 9).
    # The block row goes in last, because a background merge keeps the last inserted of tied
    # rows: inserted the other way round, the merge would leave the unblock alone.
    follows(ch, (8, 13), (9, 13))
    blocks(ch, (13, 1), at=t0 + timedelta(days=2), deleted=1)
    blocks(ch, (13, 1), at=t0 + timedelta(days=2))
    active(ch, 1)

    materialize(ch, redis_cache)

    assert items(redis_cache, 1) == [(5, 1, 1), (6, 1, 1), (12, 0, 1)]


def test_users_who_follow_nobody_get_the_most_followed(ch, redis_cache):
    # Users 100..121 with 30 - i followers each, except that 104 gets as many as 103 (a tie,
    # by user id). 100 blocked user 1, so it never appears.
    counts = {100 + i: 30 - i for i in range(22)}
    counts[104] = counts[103]
    follows(ch, *[(1000 + j, u) for u, n in counts.items() for j in range(n)])
    blocks(ch, (100, 1))
    active(ch, 1)
    expected = sorted((u for u in counts if u != 100), key=lambda u: (-counts[u], u))[:20]

    result = materialize(ch, redis_cache)

    assert items(redis_cache, 1) == [(u, 0, counts[u]) for u in expected]
    assert metadata(result)["users_needing_fill"] == 1


def test_a_neighbourhood_already_followed_leaves_only_the_fill(ch, redis_cache):
    follows(ch, (1, 2), (1, 3), (2, 3), (2, 1), (3, 2))
    follows(ch, (5, 4), (6, 4), (5, 7))
    active(ch, 1)

    materialize(ch, redis_cache)

    # 2 and 3 follow only each other and 1; the fill skips 1, 2 and 3 (all followed or self).
    assert items(redis_cache, 1) == [(4, 0, 2), (7, 0, 1)]


def test_only_users_with_events_in_the_last_seven_days_are_served(ch, redis_cache):
    follows(ch, *[(u, 50) for u in range(1, 8)])
    active(ch, 1)
    active(ch, 2, at=AS_OF - timedelta(days=7))  # the window is open at its start
    active(ch, 3, at=AS_OF + timedelta(milliseconds=1))  # after as_of: does not exist yet
    # 4 follows someone but has no event at all.
    active(ch, 5, kind="bookmark")  # an unknown type is still an event
    active(ch, 6, at=AS_OF)
    active(ch, 7, at=AS_OF - timedelta(days=7) + timedelta(milliseconds=1))

    result = materialize(ch, redis_cache)

    served_users = {u for u in range(1, 8) if served(redis_cache, u) is not None}
    assert served_users == {1, 5, 6, 7}
    assert metadata(result)["users_served"] == 4


def test_duplicate_edge_rows_count_once(ch, redis_cache):
    for _ in range(3):
        follows(ch, (1, 2), (1, 4), (2, 3), (4, 3), (5, 6))
        blocks(ch, (1, 6))
    active(ch, 1)

    materialize(ch, redis_cache)

    # 3: two mutuals (2 and 4), two followers; 6 is blocked; 2 and 4 are followed.
    assert items(redis_cache, 1) == [(3, 2, 2)]


def test_an_empty_list_keeps_the_previous_value(ch, redis_cache):
    follows(ch, (1, 2), (2, 3))
    active(ch, 1)
    materialize(ch, redis_cache)
    before = served(redis_cache, 1)
    assert [i["user_id"] for i in before["items"]] == [3]

    # 2 unfollows 3: nobody is left to suggest to 1, whose only candidate is gone.
    follows(ch, (2, 3), at=AS_OF + timedelta(minutes=1), deleted=1)
    result = materialize(ch, redis_cache, as_of=AS_OF + timedelta(hours=1))

    assert served(redis_cache, 1) == before
    assert metadata(result)["users_kept_previous"] == 1
    assert all_checks_pass(result)


# -- a randomized graph against an independent implementation ------------------------------------


def reference_live(rows, *, deletion_wins_ties):
    """Pairs whose latest row is live, self-pairs dropped (docs/design.md §3, sources' ties)."""
    latest = {}
    for a, b, deleted, t in rows:
        rank = (t, deleted if deletion_wins_ties else 1 - deleted)
        if a != b and ((a, b) not in latest or rank > latest[(a, b)][0]):
            latest[(a, b)] = (rank, deleted)
    return {pair for pair, (_, deleted) in latest.items() if deleted == 0}


def reference_suggestions(follow_rows, block_rows, events, as_of):
    """docs/design.md §3 suggestions, plainly in Python: user → [(id, mutuals, followers)]."""
    followees = defaultdict(set)
    followers = Counter()
    for a, b in reference_live(follow_rows, deletion_wins_ties=True):
        followees[a].add(b)
        followers[b] += 1
    blocked = defaultdict(set)
    for a, b in reference_live(block_rows, deletion_wins_ties=False):
        blocked[a].add(b)
        blocked[b].add(a)
    users = {u for t, u, _, _ in events if as_of - timedelta(days=7) < t <= as_of}
    most_followed = sorted(
        (c for c in followers if followers[c] >= 1), key=lambda c: (-followers[c], c)
    )
    result = {}
    for u in users:
        excluded = {u} | followees[u] | blocked[u]
        mutuals = Counter(c for f in followees[u] for c in followees[f] if c not in excluded)
        ranked = sorted(mutuals, key=lambda c: (-mutuals[c], -followers[c], c))[:20]
        fill = [c for c in most_followed if c not in excluded and c not in ranked]
        result[u] = [(c, mutuals[c], followers[c]) for c in ranked] + [
            (c, 0, followers[c]) for c in fill[: 20 - len(ranked)]
        ]
    return result


def random_graph(rng: random.Random, users: int):
    """Follows with communities and popular users, and every kind of dirty row."""
    t0 = FOLLOWED_AT
    follow_rows, block_rows, events = [], [], []
    # Each pair is drawn once, so rows at the same instant are only the deliberate ties, and
    # those are listed in the order a background merge of them agrees with (module docstring of
    # nova_assets.suggestions).
    for a in range(1, users + 1):
        if rng.random() < 0.08:
            continue  # follows nobody
        followees = set()
        for _ in range(rng.randint(1, 14)):
            if rng.random() < 0.7:  # inside the community of 40
                followees.add((a - 1) // 40 * 40 + rng.randint(1, 40))
            else:  # anyone, leaning to low ids (the popular)
                followees.add(min(int(rng.paretovariate(0.8)), users))
        for b in sorted(followees):
            t = t0 + timedelta(minutes=rng.randint(0, 10_000))
            roll = rng.random()
            follow_rows.append((a, b, 0, t))
            if roll < 0.1:  # unfollowed
                follow_rows.append((a, b, 1, t + timedelta(minutes=5)))
            elif roll < 0.15:  # unfollowed and followed again
                follow_rows += [
                    (a, b, 1, t + timedelta(minutes=5)),
                    (a, b, 0, t + timedelta(hours=1)),
                ]
            elif roll < 0.18:  # an exact duplicate row
                follow_rows.append((a, b, 0, t))
            elif roll < 0.2:  # an unfollow at the very same instant
                follow_rows.append((a, b, 1, t))
        if rng.random() < 0.03 and a not in followees:
            follow_rows.append((a, a, 0, t0))
    block_pairs = {(rng.randint(1, users), rng.randint(1, users)) for _ in range(users // 4)}
    for a, b in sorted(block_pairs):
        t = t0 + timedelta(minutes=rng.randint(0, 10_000))
        roll = rng.random()
        if roll < 0.3:  # lifted later
            block_rows += [(a, b, 0, t), (a, b, 1, t + timedelta(minutes=1))]
        elif roll < 0.4:  # lifted at the very same instant: the block holds
            block_rows += [(a, b, 1, t), (a, b, 0, t)]
        else:
            block_rows.append((a, b, 0, t))
    for u in range(1, users + 1):
        for _ in range(rng.choice([0, 1, 1, 2])):
            t = AS_OF - timedelta(minutes=rng.randint(-600, 9 * 24 * 60))
            events.append((t, u, rng.randint(1, 50), rng.choice(["view", "like", "bookmark"])))
    return follow_rows, block_rows, events


def test_randomized_graph_matches_an_independent_implementation(ch, redis_cache):
    rng = random.Random(20261128)
    users = 480
    follow_rows, block_rows, events = random_graph(rng, users)
    insert_edges(ch, "follows", follow_rows)
    insert_edges(ch, "blocks", block_rows)
    insert_events(ch, events)
    expected = reference_suggestions(follow_rows, block_rows, events, AS_OF)
    assert 200 < len(expected) < users
    # Every shape of list shows up: all ranked, ranked then filled, fill only.
    ranked = [sum(m > 0 for _, m, _ in v) for v in expected.values()]
    shapes = Counter(
        "all ranked" if n == 20 else "fill only" if n == 0 else "filled" for n in ranked
    )
    assert set(shapes) == {"all ranked", "filled", "fill only"}, shapes

    result = materialize(ch, redis_cache, chunk_users=70)

    for u in range(1, users + 1):
        if u in expected:
            assert items(redis_cache, u) == expected[u], u
        else:
            assert served(redis_cache, u) is None, u
    meta = metadata(result)
    assert meta["users_served"] == len(expected)
    assert meta["suggestions_written"] == sum(len(v) for v in expected.values())
    assert meta["users_needing_fill"] == sum(
        sum(m > 0 for _, m, _ in v) < 20 for v in expected.values()
    )
    assert all_checks_pass(result)


# -- a step failing halfway through its batches, then retried ------------------------------------


class FailingOnceRedisCache(RedisCacheResource):
    """Fails the n-th pipeline of a run once, after saving what Redis serves at that moment.

    The count lives in Redis, so it survives Dagster's copies of the resource and the retry.
    """

    fail_on_call: int = Field(description="Which set_many_json call fails (1-based).")
    watched_users: list[int] = Field(description="Users whose keys the snapshot records.")

    def set_many_json(self, entries):
        calls = self.client().incr(self.key("test", "pipeline_calls"))
        if calls == self.fail_on_call:
            keys = [self.key(ASSET_NAME, u) for u in self.watched_users]
            snapshot = dict(zip(self.watched_users, self.client().mget(keys), strict=True))
            self.client().set(
                self.key("test", "snapshot"),
                json.dumps({u: raw.decode() if raw else None for u, raw in snapshot.items()}),
            )
            raise redis.ConnectionError("injected: Redis went away mid-run")
        return super().set_many_json(entries)


def test_a_step_failing_halfway_is_retried_and_every_key_stays_whole(ch, redis_cache):
    users = list(range(1, 601))
    # A ring: u follows u+1 and u+2, so u's candidates are u+3 (2 mutuals) and u+4 (1), then
    # the fill.
    follows(ch, *[(u, u % 600 + 1) for u in users], *[(u, (u + 1) % 600 + 1) for u in users])
    active(ch, *users)
    materialize(ch, redis_cache)
    old = {u: served(redis_cache, u) for u in users}
    assert all(v["as_of"] == iso_z(AS_OF) for v in old.values())

    # Later every u also follows u+5: u+3, u+6 and u+7 (2 mutuals each) lead the new lists.
    follows(ch, *[(u, (u + 4) % 600 + 1) for u in users], at=AS_OF)
    later = AS_OF + timedelta(hours=1)
    # Chunks of 200 users are two batches each: the fourth pipeline is chunk 2's second batch.
    flaky = FailingOnceRedisCache(
        url=REDIS_URL, key_prefix=redis_cache.key_prefix, fail_on_call=4, watched_users=users
    )

    result = materialize(ch, flaky, as_of=later, chunk_users=200)

    assert result.success
    retried = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert len(retried) == 1
    snapshot = json.loads(flaky.client().get(flaky.key("test", "snapshot")))
    new = {u: served(redis_cache, u) for u in users}
    assert all(v["as_of"] == iso_z(later) for v in new.values())
    assert all(new[u]["items"] != old[u]["items"] for u in users)
    # At the failure every key was whole: exactly its old value or its complete new items.
    states = Counter()
    for u in users:
        value = json.loads(snapshot[str(u)])
        if value == old[u]:
            states["old"] += 1
        else:
            assert value["as_of"] == iso_z(later) and value["items"] == new[u]["items"], u
            states["new"] += 1
    # Chunk 1 (users 1-200) was written; chunk 2 failed with one of its batches perhaps written.
    assert 200 <= states["new"] <= 300 and states["old"] == 600 - states["new"], states
    for u in users:
        assert 0 < redis_cache.ttl(redis_cache.key(ASSET_NAME, u)) <= 86_400


# -- a ClickHouse session lost mid-run ------------------------------------------------------------


def test_a_session_lost_mid_run_is_rebuilt_and_every_list_is_the_same(ch, redis_cache):
    rng = random.Random(20261129)
    follow_rows, block_rows, events = random_graph(rng, 480)
    insert_edges(ch, "follows", follow_rows)
    insert_edges(ch, "blocks", block_rows)
    insert_events(ch, events)
    steady = materialize(ch, redis_cache, chunk_users=70)
    expected = {u: items(redis_cache, u) for u in range(1, 481) if served(redis_cache, u)}
    assert len(expected) > 200
    # Seven chunks of 70: the session is lost before chunk 2 and again before chunk 4 (the fifth
    # ranking query, counting chunk 2's second attempt). The run writes under a prefix of its own
    # (inside the test's, which the fixture cleans up), so every key it serves is its own.
    forgetful = SessionLosingClickHouse(url=ch.url, query=RANKING_SQL, lose_before=[2, 5])
    cache = RedisCacheResource(url=REDIS_URL, key_prefix=f"{redis_cache.key_prefix}lost:")
    instance = dg.DagsterInstance.ephemeral()

    result = materialize(forgetful, cache, chunk_users=70, instance=instance)

    assert result.success
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert {u: items(cache, u) for u in range(1, 481) if served(cache, u)} == expected
    meta = metadata(result)
    assert meta["clickhouse_sessions_lost"] == 2
    assert metadata(steady)["clickhouse_sessions_lost"] == 0
    assert meta["users_served"] == len(expected)
    assert meta["live_follow_edges"] == metadata(steady)["live_follow_edges"]
    assert all_checks_pass(result)
    warnings = [
        e.user_message
        for e in instance.all_logs(result.run_id)
        if "session holding the graph was lost" in e.user_message
    ]
    assert len(warnings) == 2 and "UNKNOWN_TABLE" in warnings[0]
    cache.close()


def test_a_session_lost_again_and_again_fails_as_a_transient_fault(ch):
    follows(ch, (1, 2), (2, 3))
    forgetful = SessionLosingClickHouse(
        url=ch.url, query=RANKING_SQL, lose_before=list(range(1, 100))
    )
    try:
        with suggestion_graph(forgetful) as graph:
            with pytest.raises(SessionLostError, match="lost 3 times in a row") as raised:
                graph.rank([1])
            # The retry policy retries it: not a permanent fault, though UNKNOWN_TABLE caused it.
            assert permanent_reason(raised.value) is None
            assert permanent_reason(raised.value.__cause__) is not None
            assert graph.sessions_lost == MAX_SESSION_LOSSES - 1
            assert "deploy/README.md" in str(raised.value)
    finally:
        forgetful.close()


def test_only_the_graphs_own_tables_missing_mean_a_lost_session(ch):
    """A missing source table is a schema fault (permanent), not a lost session."""
    with pytest.raises(DatabaseError) as raised:
        ch.query_rows("SELECT count() FROM nova.no_such_table")
    missing_source = raised.value
    with pytest.raises(DatabaseError) as raised:
        rank_users(ch, [1])  # no graph loaded in this session
    missing_graph = raised.value
    assert session_lost(missing_source) is None
    assert permanent_reason(missing_source) is not None
    assert "UNKNOWN_TABLE" in session_lost(missing_graph)


def test_the_runs_graph_missing_means_a_lost_session_only_when_the_error_is_about_it():
    graph = "nova_work.suggested_users_graph_abc_edges"
    about_graph = RuntimeError(
        f"Code: 60. DB::Exception: Table {graph} does not exist. (UNKNOWN_TABLE)"
    )
    # A missing source table, in a query that also reads the graph: a schema fault.
    about_source = RuntimeError(
        "Code: 60. DB::Exception: Unknown table expression identifier 'nova.follows'. "
        f"In scope SELECT * FROM nova.follows JOIN {graph} USING (follower_id). (UNKNOWN_TABLE)"
    )
    assert "graph is not on this server" in session_lost(about_graph)
    assert session_lost(about_source) is None


# -- the checks ----------------------------------------------------------------------------------


def _value(user_id, triples):
    return {
        "user_id": user_id,
        "as_of": iso_z(AS_OF),
        "generated_at": iso_z(AS_OF),
        "items": [{"user_id": c, "mutuals": m, "followers": f} for c, m, f in triples],
    }


GOOD = [(5, 3, 10), (6, 2, 40), (7, 2, 12), (8, 2, 12), (30, 0, 90), (31, 0, 2)]
NO_EXCLUSIONS = Exclusions(followed={1: {2, 3}}, blocked={1: {4}})


def _failed(triples, exclusions=NO_EXCLUSIONS, ttl=3600, value=True):
    served_values = {1: _value(1, triples) if value else None}
    results = evaluate_checks(served_values, exclusions=exclusions, ttls={1: ttl})
    return {name for name, (passed, _) in results.items() if not passed}


def test_checks_pass_on_a_good_list():
    assert _failed(GOOD) == set()
    assert _failed([]) == set()


def test_each_check_fails_on_broken_data(ch, redis_cache, raw_redis):
    assert _failed([(1, 4, 5), *GOOD]) == {"no_excluded_suggestions"}  # self
    assert _failed([*GOOD, (2, 0, 1)]) == {"no_excluded_suggestions"}  # followed
    assert _failed([*GOOD, (4, 0, 1)]) == {"no_excluded_suggestions"}  # blocked
    crowded = [(100 + i, 50 - i, 1) for i in range(21)]
    assert _failed(crowded) == {"at_most_20_per_user"}
    assert _failed([GOOD[1], GOOD[0], *GOOD[2:]]) == {"ordered_by_contract"}  # mutuals
    assert _failed([GOOD[0], GOOD[2], GOOD[1], *GOOD[3:]]) == {"ordered_by_contract"}  # followers
    assert _failed([*GOOD[:2], GOOD[3], GOOD[2], *GOOD[4:]]) == {"ordered_by_contract"}  # ids
    assert _failed([(30, 0, 90), *GOOD[:4]]) == {"ordered_by_contract"}  # fill before ranked
    assert _failed([*GOOD, GOOD[-1]]) == {"ordered_by_contract"}  # twice
    assert _failed(GOOD, ttl=-1) == {"keys_have_ttl"}
    assert _failed(GOOD, ttl=-2, value=False) == {"keys_have_ttl"}

    # The exclusions come from ClickHouse's live edges, blocks either way round.
    t = FOLLOWED_AT
    follows(ch, (1, 2), (1, 9))
    follows(ch, (1, 9), at=t + timedelta(days=1), deleted=1)
    blocks(ch, (1, 4), (5, 1), (1, 6))
    blocks(ch, (1, 6), at=t + timedelta(days=1), deleted=1)
    exclusions = live_exclusions(ch, [1])
    assert exclusions.followed == {1: {2}}
    assert exclusions.blocked == {1: {4, 5}}
    assert _failed([(5, 1, 1)], exclusions=exclusions) == {"no_excluded_suggestions"}
    assert _failed([(6, 1, 1), (9, 1, 1)], exclusions=exclusions) == set()

    # keys_have_ttl reads Redis: a key written without a TTL fails, as a missing one does.
    key = redis_cache.key(ASSET_NAME, 1)
    raw_redis.set(key, json.dumps(_value(1, GOOD)))
    assert _failed(GOOD, ttl=redis_cache.ttl(key)) == {"keys_have_ttl"}


def _interrupt_a_real_run(ch, redis_cache, tmp_path, *, request_termination: bool, sig: int):
    """Run the suggestions job in a worker process of its own and interrupt it mid-way.

    The run writes to Redis through a proxy that the test holds once the first new value is
    there, so the run is stopped mid-way by construction, however fast it is; the signal goes
    while it is held, and the run's writes go on after it. Every active user starts with an "old"
    value; returns the finished run and how many users hold a new value, after checking every key
    is whole and has its TTL.
    """
    from nova_assets.defs.suggestions.ranking import active_users
    from nova_assets.local import seed

    seed.generate(
        ch,
        seed.SeedSpec(
            seed=5, users=60_000, posts=60_000, events=600_000, follows_per_user=20, as_of=AS_OF
        ),
    )
    users = active_users(ch, AS_OF)
    old = {"generation": "old", "items": []}
    redis_cache.set_many_json(
        (redis_cache.key("suggested_users", u), old | {"user_id": u}, 86400) for u in users
    )
    ch.close()  # the run's own process needs the embedded engine

    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    run_config = tmp_path / "run_config.json"
    run_config.write_text(json.dumps({"ops": {OP_NAME: {"config": {"as_of": iso_z(AS_OF)}}}}))
    gate = GateProxy(urlsplit(REDIS_URL).port)
    env = os.environ | {
        "DAGSTER_HOME": str(tmp_path),
        "CLICKHOUSE_URL": ch.url,
        "REDIS_URL": REDIS_URL.replace(":6379/", f":{gate.port}/"),
        "REDIS_KEY_PREFIX": redis_cache.key_prefix,
    }
    worker = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "dagster"),
            *("job", "execute", "-m", "nova_assets.definitions", "-j", "suggested_users"),
            *("--config", str(run_config)),
        ],
        env=env,
        stdout=(tmp_path / "worker.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    client = redis_cache.client()
    keys = [redis_cache.key("suggested_users", u) for u in users]

    def read_all() -> list:
        with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.get(key)
                pipe.ttl(key)
            return pipe.execute()

    # Each shard writes its users in ascending order: a shard's first key turns new with its
    # first batch, whichever shard runs first.
    firsts = keys[::SHARD_USERS]
    deadline = time.monotonic() + 120
    while worker.poll() is None and time.monotonic() < deadline:
        if any(b'"generation":"old"' not in raw for raw in client.mget(firsts)):
            break
        time.sleep(0.01)
    gate.hold()
    assert worker.poll() is None, "the run ended before the test could interrupt it"
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        [started] = instance.get_runs()
        if request_termination:
            # What Dagster's termination (the UI, `run_launcher.terminate`) does first.
            instance.report_run_canceling(started)
    worker.send_signal(sig)
    gate.release()
    worker.wait(timeout=120)
    gate.close()

    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        [run] = instance.get_runs()
    replies = read_all()
    written = []
    for user, raw, ttl in zip(users, replies[::2], replies[1::2], strict=True):
        value = json.loads(raw)
        assert value["user_id"] == user and 0 < ttl <= 86400
        if value.get("generation") != "old":
            written.append(user)
            assert value["as_of"] == iso_z(AS_OF)
            assert 0 < len(value["items"]) <= 20
    assert 0 < len(written) < len(users)
    shards = [set(users[i : i + SHARD_USERS]) for i in range(0, len(users), SHARD_USERS)]
    assert len(shards) == 3
    return run, [len(shard.intersection(written)) for shard in shards], [len(s) for s in shards]


def test_a_terminated_run_stops_at_a_batch_boundary_and_ends_canceled(ch, redis_cache, tmp_path):
    from nova_assets.defs.suggestions.shards import BATCH_USERS

    run, written, sizes = _interrupt_a_real_run(
        ch, redis_cache, tmp_path, request_termination=True, sig=signal.SIGINT
    )
    assert run.status == dg.DagsterRunStatus.CANCELED
    # Whole batches only: each shard stopped between batches, never inside one (or finished).
    for done, size in zip(written, sizes, strict=True):
        assert done % BATCH_USERS == 0 or done == size


def test_a_worker_killed_without_a_request_ends_failed_and_reaches_the_dlq(
    ch, redis_cache, tmp_path, kafka_dlq
):
    from nova_assets.core.resources import AlertWebhookResource
    from nova_assets.defs.dlq import sensors

    run, _, _ = _interrupt_a_real_run(
        ch, redis_cache, tmp_path, request_termination=False, sig=signal.SIGTERM
    )
    assert run.status == dg.DagsterRunStatus.FAILURE
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        _, delivered, _ = sensors.publish_failed_runs(
            instance,
            sensors.PublisherCursor(),
            kafka_dlq,
            AlertWebhookResource(),
            dg.get_dagster_logger(),
        )
    assert delivered == 1
    [body] = [json.loads(r.value) for r in kafka_dlq.read()]
    assert body["run_id"] == run.run_id
    assert body["job_name"] == "suggested_users"
    assert body["asset_keys"] == ["suggested_users"]
