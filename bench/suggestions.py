"""Benchmark of suggested users, side by side with a one-user-per-query baseline in the same run.

    .venv/bin/python bench/suggestions.py [--keep DIR]

On a seeded graph of 100 000 users and about 5 million live follow edges (about 90 000 of them
active in the last 7 days: the seed keeps a tenth of the users dormant), one materialization of
`suggested_users` in a fresh process (all active users ranked in ClickHouse and written to Redis
db 15 under a bench prefix, deleted afterwards) reports its time, throughput and peak memory.
Then the ranking alone, chunk by chunk as the asset runs it, against the same query run for one
user at a time on a sample: both must give the same lists, and the ratio is the speed-up.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import AS_OF, REDIS_URL, materialize_as_of, peak_rss_mib

from nova_assets.core.contract import iso_z
from nova_assets.core.resources import ClickHouseResource, RedisCacheResource
from nova_assets.defs.suggestions.assets import build_suggested_users_asset
from nova_assets.defs.suggestions.checks import check_sample
from nova_assets.defs.suggestions.graph import suggestion_graph
from nova_assets.defs.suggestions.ranking import active_users, rank_users
from nova_assets.defs.suggestions.shards import CHUNK_USERS
from nova_assets.local import seed

KEY_PREFIX = "bench:suggestions:"
SPEC = seed.SeedSpec(
    seed=11,
    users=100_000,
    posts=1_000_000,
    # Enough events that every user outside the seed's dormant tenth is active in the 7 days.
    events=5_000_000,
    days=7,
    follows_per_user=56,
    as_of=AS_OF,
)
BASELINE_USERS = 200
TARGET_SECONDS = 60
TARGET_PEAK_MIB = 1536
TARGET_SPEED_UP = 20


def materialize_in_this_process(url: str) -> None:
    """Child process: one materialization; prints its figures and peak RSS as JSON."""
    result, wall, meta = materialize_as_of(build_suggested_users_asset(), url, KEY_PREFIX)
    print(
        json.dumps(
            {
                "success": result.success,
                "wall_seconds": wall,
                "peak_mib": peak_rss_mib(),
                "checks_passed": all(e.passed for e in result.get_asset_check_evaluations()),
                **{
                    name: meta[name]
                    for name in (
                        "users_served",
                        "suggestions_written",
                        "users_needing_fill",
                        "batches",
                        "seconds",
                        "graph_load_seconds",
                        "ranking_seconds",
                        "users_per_second",
                        "live_follow_edges",
                        "live_block_edges",
                    )
                },
            }
        )
    )


def delete_bench_keys() -> int:
    cache = RedisCacheResource(url=REDIS_URL, key_prefix=KEY_PREFIX)
    client = cache.client()
    deleted = 0
    keys = []
    for key in client.scan_iter(match=KEY_PREFIX + "*", count=10_000):
        keys.append(key)
        if len(keys) == 10_000:
            deleted += client.delete(*keys)
            keys = []
    if keys:
        deleted += client.delete(*keys)
    cache.close()
    return deleted


def rank_all(clickhouse: ClickHouseResource, users: list[int]) -> tuple[float, dict]:
    """The asset's ranking alone, chunk by chunk: seconds and each user's items."""
    started = time.perf_counter()
    lists = {}
    for start in range(0, len(users), CHUNK_USERS):
        for s in rank_users(clickhouse, users[start : start + CHUNK_USERS]):
            lists[s.user_id] = s.items
    return time.perf_counter() - started, lists


def rank_one_by_one(clickhouse: ClickHouseResource, users: list[int]) -> tuple[float, dict]:
    """Baseline: the same ranking, one query per user."""
    started = time.perf_counter()
    lists = {}
    for user_id in users:
        [s] = rank_users(clickhouse, [user_id])
        lists[s.user_id] = s.items
    return time.perf_counter() - started, lists


def bench_suggestions(data_dir: Path) -> list[str]:
    """Seed `data_dir` (a chdb data directory of its own) if empty, then measure; markdown lines."""
    url = f"chdb://{data_dir}"
    lines = []
    clickhouse = ClickHouseResource(url=url)
    if seed.is_empty(clickhouse):
        summary = seed.generate(clickhouse, SPEC)
        lines.append(
            f"Seeded {SPEC.users:,} users, {summary.follows:,} follow rows, "
            f"{summary.blocks:,} block rows, {summary.engagement_events:,} events in "
            f"{summary.elapsed_s:.1f} s."
        )
    clickhouse.close()

    child = subprocess.run(
        [sys.executable, __file__, "--materialize", url],
        capture_output=True,
        text=True,
        check=False,
    )
    deleted = delete_bench_keys()
    if child.returncode != 0:
        raise SystemExit(f"the materialization failed:\n{child.stderr[-3000:]}")
    run = json.loads(child.stdout.strip().splitlines()[-1])
    if not (run["success"] and run["checks_passed"]) or deleted < run["users_served"]:
        raise SystemExit(f"the materialization did not serve every user: {run}, {deleted} keys")

    clickhouse = ClickHouseResource(url=url)
    try:
        with suggestion_graph(clickhouse):
            users = active_users(clickhouse, AS_OF)
            batched_s, batched = rank_all(clickhouse, users)
            sample = check_sample(users, BASELINE_USERS)
            single_s, single = rank_one_by_one(clickhouse, sample)
    finally:
        clickhouse.close()
    if any(single[u] != batched[u] for u in sample):
        raise SystemExit("the batched ranking and the one-user-per-query baseline disagree")

    batched_rate = len(users) / batched_s
    single_rate = len(sample) / single_s
    end_to_end_rate = run["users_served"] / run["seconds"]

    def verdict(ok: bool) -> str:
        return "ok" if ok else "**missed**"

    lines += [
        f"Graph: {run['live_follow_edges']:,} live follow edges, {run['live_block_edges']:,} "
        f"live blocks; {len(users):,} users active in the 7 days to {iso_z(AS_OF)}.",
        "",
        "| measure | value | target |",
        "|---|---:|---|",
        f"| users served | {run['users_served']:,} ({run['users_needing_fill']:,} needed the "
        f"fill) | |",
        f"| suggestions written | {run['suggestions_written']:,} in {run['batches']:,} "
        f"pipelines | |",
        f"| materialization, asset time | {run['seconds']:.1f} s (graph load "
        f"{run['graph_load_seconds']:.1f} s, ranking {run['ranking_seconds']:.1f} s, the rest "
        f"writes and checks) | ≤ {TARGET_SECONDS} s: "
        f"{verdict(run['seconds'] <= TARGET_SECONDS)} |",
        f"| materialization, wall time with Dagster start-up | {run['wall_seconds']:.1f} s | "
        f"≤ {TARGET_SECONDS} s: {verdict(run['wall_seconds'] <= TARGET_SECONDS)} |",
        f"| throughput, end to end | {end_to_end_rate:,.0f} users/s | |",
        f"| peak RSS of the materializing process | {run['peak_mib']:,.0f} MiB | "
        f"≤ {TARGET_PEAK_MIB} MiB: {verdict(run['peak_mib'] <= TARGET_PEAK_MIB)} |",
        f"| ranking, {CHUNK_USERS:,} users per query | {batched_rate:,.0f} users/s | |",
        f"| baseline, one user per query ({len(sample)} users) | {single_rate:,.0f} users/s | |",
        f"| speed-up, ranking | {batched_rate / single_rate:,.0f}x | ≥ {TARGET_SPEED_UP}x: "
        f"{verdict(batched_rate / single_rate >= TARGET_SPEED_UP)} |",
        f"| speed-up, end to end vs baseline ranking alone | "
        f"{end_to_end_rate / single_rate:,.0f}x | ≥ {TARGET_SPEED_UP}x: "
        f"{verdict(end_to_end_rate / single_rate >= TARGET_SPEED_UP)} |",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="seeded data directory to create or reuse")
    parser.add_argument("--materialize", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.materialize:
        materialize_in_this_process(args.materialize)
        return
    print(f"nova_assets suggested users benchmark on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.keep or Path(scratch) / "clickhouse"
        print("\n## Suggested users\n")
        print("\n".join(bench_suggestions(data_dir)))


if __name__ == "__main__":
    main()
