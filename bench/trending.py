"""Trending benchmark: the ranking query of each window against a pandas baseline.

    .venv/bin/python bench/trending.py [--events N] [--keep DIR]

 on a seeded dataset (default 10 million events over 7 days), the ranking query of each
window against a baseline that pulls the window's events with clickhouse-connect and ranks them
in pandas; both must return the same ranking. Then one 7d materialization in a fresh process
reports its peak memory.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
from common import AS_OF, materialize_as_of, peak_rss_mib, timed

from nova_assets.core.contract import epoch_ms
from nova_assets.core.jobs import windows
from nova_assets.core.resources import ClickHouseResource
from nova_assets.core.sources import EVENT_WEIGHTS
from nova_assets.defs.trending.assets import (
    POSTS_PER_AUTHOR,
    TOP_POSTS,
    build_trending_asset,
    rank,
)
from nova_assets.local import seed


def pandas_trending(clickhouse: ClickHouseResource, window, as_of: datetime) -> list[tuple]:
    """Baseline: the window's raw events into pandas, ranked there."""
    events = clickhouse.query_df(
        "SELECT toUnixTimestamp64Milli(event_time) AS t, user_id, post_id, "
        "toString(event_type) AS event_type FROM nova.engagement_events "
        "WHERE event_time > fromUnixTimestamp64Milli({start:Int64}, 'UTC') "
        "AND event_time <= fromUnixTimestamp64Milli({as_of:Int64}, 'UTC')",
        {"start": epoch_ms(as_of - window.length), "as_of": epoch_ms(as_of)},
    )
    posts = clickhouse.query_df(
        "SELECT post_id, author_id, is_deleted, toUnixTimestamp64Milli(created_at) AS created, "
        "toUnixTimestamp64Milli(updated_at) AS updated FROM nova.posts"
    )
    events = events[events["event_type"].isin(list(EVENT_WEIGHTS))]
    latest = events.groupby(["post_id", "user_id", "event_type"], as_index=False)["t"].max()
    weights = latest["event_type"].map(EVENT_WEIGHTS).astype(float)
    age_h = (epoch_ms(as_of) - latest["t"]) / 3_600_000
    latest["score"] = weights * np.power(window.decay_per_hour, age_h)
    scores = latest.groupby("post_id", as_index=False)["score"].sum()
    state = posts.sort_values("updated").drop_duplicates("post_id", keep="last")
    state = state[(state["is_deleted"] == 0) & (state["created"] <= epoch_ms(as_of))]
    ranked = scores.merge(state[["post_id", "author_id"]], on="post_id")
    ranked = ranked.sort_values(["score", "post_id"], ascending=[False, True])
    ranked = ranked[ranked.groupby("author_id").cumcount() < POSTS_PER_AUTHOR].head(TOP_POSTS)
    return list(ranked[["post_id", "author_id", "score"]].itertuples(index=False, name=None))


def same_ranking(sql_items: list[dict], baseline: list[tuple]) -> bool:
    if [(i["post_id"], i["author_id"]) for i in sql_items] != [(p, a) for p, a, _ in baseline]:
        return False
    return all(
        abs(i["score"] - s) <= 1e-9 * abs(s)
        for i, (_, _, s) in zip(sql_items, baseline, strict=True)
    )


def materialize_peak_memory(url: str) -> None:
    """Child process: one 7d materialization; prints its peak RSS in MiB."""
    result, elapsed, _ = materialize_as_of(build_trending_asset(windows()[2]), url, "bench:")
    peak_mib = peak_rss_mib()
    print(json.dumps({"success": result.success, "seconds": elapsed, "peak_mib": peak_mib}))


def bench_trending(data_dir: Path, events: int) -> list[str]:
    url = f"chdb://{data_dir}"
    clickhouse = ClickHouseResource(url=url)
    lines = []
    if seed.is_empty(clickhouse):
        spec = seed.SeedSpec(
            seed=7,
            users=100_000,
            posts=events // 10,
            events=events,
            days=7,
            as_of=AS_OF,
        )
        summary = seed.generate(clickhouse, spec)
        lines.append(f"seeded {events:,} events in {summary.elapsed_s:.1f} s")
    lines.append("")
    lines.append("Medians: of 15 rankings and of 2 baseline runs, each after a warm-up run.")
    lines.append("")
    lines.append(
        "| window | events in window | SQL ranking (ms) | pandas baseline (ms) | speed-up |"
    )
    lines.append("|---|---:|---:|---:|---:|")
    for window in windows():
        in_window = clickhouse.query_rows(
            "SELECT count() FROM nova.engagement_events "
            "WHERE event_time > fromUnixTimestamp64Milli({s:Int64}, 'UTC') "
            "AND event_time <= fromUnixTimestamp64Milli({e:Int64}, 'UTC')",
            {"s": epoch_ms(AS_OF - window.length), "e": epoch_ms(AS_OF)},
        )[0][0]
        sql_ms, ranking = timed(lambda w=window: rank(clickhouse, w, AS_OF), repeat=15)
        base_ms, baseline = timed(lambda w=window: pandas_trending(clickhouse, w, AS_OF), repeat=2)
        if ranking.widened or not same_ranking(ranking.items, baseline):
            raise SystemExit(f"{window.name}: the SQL ranking and the pandas baseline disagree")
        lines.append(
            f"| {window.name} | {in_window:,} | {sql_ms:.1f} | {base_ms:.0f} | "
            f"{base_ms / sql_ms:.0f}x |"
        )
    clickhouse.close()

    child = subprocess.run(
        [sys.executable, __file__, "--materialize-7d", url],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(child.stdout.strip().splitlines()[-1])
    lines.append("")
    lines.append(
        f"7d materialization in a fresh process: {report['seconds']:.2f} s including Dagster's "
        f"start-up, peak RSS {report['peak_mib']:.0f} MiB, success={report['success']}"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--keep", type=Path, help="seeded data directory to create or reuse")
    parser.add_argument("--materialize-7d", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.materialize_7d:
        materialize_peak_memory(args.materialize_7d)
        return
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.keep or Path(scratch) / "clickhouse"
        print("\n## Trending\n")
        print("\n".join(bench_trending(data_dir, args.events)))


if __name__ == "__main__":
    main()
