"""Suggested users: whom each active user might follow, and how (docs/design.md §3-4).

Every user with an event in the 7 days up to `as_of` gets up to 20 suggestions: the followees of
their followees, ranked by mutuals (how many of their followees follow the candidate), then by
the candidate's followers, then by user id; topped up, when fewer than 20, with the most followed
users. Nobody is suggested themselves, someone they follow, or anyone blocked either way.

This module holds the asset: a graph of three kinds of step in one run (run config goes to the
graph, `{"ops": {SUGGESTIONS_OP: {"config": {"as_of": …}}}}`, and on to its first step):

1. `plan_suggestions` finds the active users and builds the run's graph once, into tables of its
   own named after the run (`graph.py`): each user's followees with each followee's follower
   count alongside (two arrays per user, 12 bytes per edge), the blocked users either way, and
   the most followed users for the fill. Resolving the latest row of five million edges is the
   expensive part; it is done once per run, not once per shard. It then splits the users, in
   ascending order, into shards (`shards.py`).
2. One `rank_suggestions` step per shard (Dagster's dynamic fan-out) copies the graph into Join
   tables of its ClickHouse session and ranks and writes its users chunk by chunk (`shards.py`),
   copying the graph into a new session when the session is lost (`graph.SessionGraph`). A
   failed shard is retried alone.
3. `finish_suggestions` adds the shards up, checks a sample of the values Redis serves
   (`checks.py`), and drops the run's graph (a run that never gets there leaves it to the next
   run's plan, which drops the graphs of finished runs).

Every step takes a slot of the ClickHouse pool and lets it go when done, closing its connection:
on the embedded engine, which admits one process at a time, the every-minute jobs run between
shards. On a server the shards take no slot and run side by side, SHARDS_IN_PARALLEL at once.

Edges are the latest row of each pair, as of now (like posts in trending; docs/decisions.md): the
graph has no history to rewind to `as_of`. Ties of `updated_at` follow `core.sources`: when in
doubt, claim no follow and suggest no one across a block. (A background merge of tied rows keeps
the last inserted one instead; the rule decides only while both rows are still there.)
"""

import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

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
    fail_fast_on_permanent_faults,
    iso_z,
)
from nova_assets.core.jobs import SUGGESTIONS_ASSET, SUGGESTIONS_OP
from nova_assets.core.resources import (
    CLICKHOUSE_POOL,
    ClickHouseResource,
    RedisCacheResource,
    releases_engine,
)
from nova_assets.core.settings import load_settings
from nova_assets.defs.suggestions.checks import CHECKS, evaluate_checks, live_exclusions
from nova_assets.defs.suggestions.graph import (
    build_graph,
    drop_finished_graphs,
    drop_graph,
    graph_id_for,
)
from nova_assets.defs.suggestions.ranking import TOP_SUGGESTIONS, active_users
from nova_assets.defs.suggestions.shards import (
    CHUNK_USERS,
    PRIORITY_TAG,
    SHARD_PRIORITY,
    SHARD_USERS,
    Shard,
    ShardResult,
    plan_shards,
    suggest_shard,
)

PLAN_OP = "plan_suggestions"
SHARD_OP = "rank_suggestions"
FINISH_OP = "finish_suggestions"
DEFAULT_TTL_SEC = 86_400
SAMPLE_LISTS = 3
"""Sampled users' lists shown in the materialization's preview."""


def _check_outputs() -> dict[str, str]:
    """Check name → the graph output that carries its result."""
    return {check: f"{SUGGESTIONS_ASSET}_{check}" for check in CHECKS}


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
        name=SUGGESTIONS_ASSET,
        group="suggestions",
        description=f"Up to {TOP_SUGGESTIONS} users to follow for everyone active in the last 7 "
        "days: followees of their followees by mutuals, then the most followed.",
        refresh_sec=refresh_sec,
        metadata={"cache_key_pattern": f"{SUGGESTIONS_ASSET}:{{user_id}}", "ttl_seconds": ttl_sec},
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
        graph_id = graph_id_for(context.instance, context.run_id)
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
            f"{SUGGESTIONS_ASSET}: {len(users):,} active users as of {iso_z(as_of)} in "
            f"{len(shards)} shards; live graph of {graph.live_follows:,} follows and "
            f"{graph.live_blocks:,} blocks built in {graph_s:.1f} s"
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
        drop_step_outputs(context)
        yield dg.Output(None, "result", metadata=materialization.metadata)
        yield from materialization.check_results or []

    @dg.config_mapping
    def as_of_for_plan(config: AsOfConfig) -> dict[str, Any]:
        return {PLAN_OP: {"config": {"as_of": config.as_of}}}

    # The graph is named apart from the asset: the job is called suggested_users too
    # (docs/design.md §5), and Dagster wants node and job names distinct within a location.
    @dg.graph_multi_asset(
        name=SUGGESTIONS_OP,
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
    served = {u: redis_cache.get_json(redis_cache.key(SUGGESTIONS_ASSET, u)) for u in sample}
    verdicts = evaluate_checks(
        served,
        exclusions=live_exclusions(clickhouse, sample),
        ttls={u: redis_cache.ttl(redis_cache.key(SUGGESTIONS_ASSET, u)) for u in sample},
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
        keys=[redis_cache.key(SUGGESTIONS_ASSET, u) for u in sample],
    )
    return with_reason(context, result)


def drop_step_outputs(context: dg.OpExecutionContext) -> None:
    """Remove what the plan and the shards handed on through the run's storage folder.

    Dagster's default IO manager keeps each step's output in `<storage>/<run_id>/<step_key>/`
    for good; once the run's values are written and checked, the shards and their results are
    of no more use, so a finished run leaves none of them (docs/design.md §10). Compute logs, in
    the same folder, stay with the run until the retention removes it.
    """
    folder = Path(context.instance.storage_directory()) / context.run_id
    if not folder.is_dir():
        return
    for step in folder.iterdir():
        ours = step.name.startswith((f"{SUGGESTIONS_OP}.{PLAN_OP}", f"{SUGGESTIONS_OP}.{SHARD_OP}"))
        if step.is_dir() and ours:
            shutil.rmtree(step, ignore_errors=True)


def _sample_table(served: Mapping[int, Mapping[str, Any] | None]) -> str:
    lines = ["| user | # | suggested | mutuals | followers |", "|---:|---:|---:|---:|---:|"]
    shown = [(u, v) for u, v in served.items() if v and v["items"]][:SAMPLE_LISTS]
    for user_id, value in shown:
        lines += [
            f"| {user_id} | {n} | {i['user_id']} | {i['mutuals']} | {i['followers']} |"
            for n, i in enumerate(value["items"], start=1)
        ]
    return "\n".join(lines)


@dg.definitions
def defs() -> dg.Definitions:
    settings = load_settings()
    return dg.Definitions(
        assets=[
            build_suggested_users_asset(
                settings.suggestion_ttl_sec,
                refresh_sec=settings.suggestion_interval_sec,
                shard_users=settings.suggestion_shard_users,
                pool=asset_pool(SUGGESTIONS_ASSET, embedded=settings.embedded_clickhouse),
                # On a server the shards run side by side (the job's executor bounds how many);
                # the embedded engine takes them one at a time, between other runs' steps.
                shard_pool=CLICKHOUSE_POOL if settings.embedded_clickhouse else None,
            )
        ]
    )
