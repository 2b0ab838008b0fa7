"""The shards of a run and the Redis writers: how the active users are split, ranked and written.

`plan_shards` splits the active users, ascending, into shards of SHARD_USERS, one step each.
`suggest_shard` ranks a shard's users from the run's graph in chunks of CHUNK_USERS, one query
each, and writes each chunk before the next is ranked: batches of BATCH_USERS, one Redis pipeline
each, at most WRITERS_IN_FLIGHT in flight. Every key is written whole with its TTL in one
command, so a shard that stops between chunks (a failure, a retry, a termination) leaves each key
either its old or its new value; a retried shard rewrites its keys from scratch.
"""

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nova_assets.core.contract import iso_z
from nova_assets.core.jobs import SUGGESTIONS_ASSET
from nova_assets.core.resources import ClickHouseResource, RedisCacheResource
from nova_assets.defs.suggestions.checks import CHECK_SAMPLE_USERS, check_sample
from nova_assets.defs.suggestions.graph import Graph, session_graph
from nova_assets.defs.suggestions.ranking import UserSuggestions, active_users

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


# -- the Redis writers --------------------------------------------------------------------------


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
        (key(SUGGESTIONS_ASSET, s.user_id), cache_value(s, as_of, generated_at), ttl_sec)
        for s in batch
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


# -- the shards ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One step's share of a run: users to rank from the run's graph, as of one instant."""

    index: int
    count: int
    graph_id: str
    graph: Graph
    as_of: datetime
    first_user: int
    """The shard's users are the active users from `first_user` to `last_user`, both included:
    the step reads them again (`active_users`), so a shard passed between steps (pickled by
    Dagster's IO manager under the run's storage folder) is a few numbers, whatever its size."""
    last_user: int
    users: int
    """How many active users the plan found in that range (for the progress lines)."""
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
        total = self.shard.users
        left = (total - self.users) / rate if rate > 0 else 0.0
        return (
            f"{SUGGESTIONS_ASSET} {self.shard.name}: {self.users:,}/{total:,} users written "
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
    """Split the active users (ascending) into shards of at most `shard_users`, at least one.

    Each shard is a range of user ids, from its first active user to its last; with no active
    users the one shard is an empty range.
    """
    if not users:
        return [Shard(0, 1, graph_id, graph, as_of, 1, 0, 0, started, graph_s)]
    starts = range(0, len(users), shard_users)
    return [
        Shard(
            i,
            len(starts),
            graph_id,
            graph,
            as_of,
            users[a],
            users[min(a + shard_users, len(users)) - 1],
            len(users[a : a + shard_users]),
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
    users = active_users(clickhouse, shard.as_of, shard.first_user, shard.last_user)
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
