"""Scale curve: suggestions by users and trending 7d by events, each size in fresh processes.

    .venv/bin/python bench/scale.py [--users 30000,100000,300000] [--events 1000000,10000000]
                                    [--repeat 5] [--keep DIR]

Each size gets a dataset of its own (suggestions: 56 follows and 50 events per user; trending:
events over 7 days among 100,000 users and a post per 10 events), then `--repeat` materializations,
each in a fresh process that reports its own peak resident memory (VmHWM). Then the same after
`OPTIMIZE … FINAL` has merged the tables' parts. Reported: medians of time, rate and peak memory,
the memory per live follow edge (the peak's growth between two sizes over the edges added), and
the exponent of time against size fitted over the sizes (1 is linear).
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import AS_OF, materialize_as_of, peak_rss_mib

from nova_assets.core.jobs import windows
from nova_assets.core.resources import ClickHouseResource
from nova_assets.defs.suggestions.assets import build_suggested_users_asset
from nova_assets.defs.trending.assets import build_trending_asset
from nova_assets.local import seed

KEY_PREFIX = "bench:scale:"
TABLES = ("nova.posts", "nova.engagement_events", "nova.follows", "nova.blocks")


def materialize_in_this_process(kind: str, url: str) -> None:
    """Child process: one materialization; prints its figures as JSON."""
    asset = (
        build_suggested_users_asset()
        if kind == "suggestions"
        else build_trending_asset(windows()[2])
    )
    result, seconds, meta = materialize_as_of(asset, url, KEY_PREFIX)
    print(
        json.dumps(
            {
                "success": result.success,
                "seconds": seconds,
                "peak_mib": peak_rss_mib(),
                "rows": meta["dagster/row_count"],
                "edges": meta.get("live_follow_edges", 0),
            }
        )
    )


def run_child(kind: str, url: str) -> dict:
    child = subprocess.run(
        [sys.executable, __file__, "--materialize", kind, url],
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode != 0:
        raise SystemExit(f"{kind} at {url} failed:\n{child.stderr[-3000:]}")
    report = json.loads(child.stdout.strip().splitlines()[-1])
    if not report["success"]:
        raise SystemExit(f"{kind} at {url} did not succeed: {report}")
    return report


def merge(url: str) -> None:
    clickhouse = ClickHouseResource(url=url)
    try:
        for table in TABLES:
            clickhouse.command(f"OPTIMIZE TABLE {table} FINAL")
    finally:
        clickhouse.close()


def seed_size(kind: str, size: int, data_dir: Path) -> tuple[str, float]:
    url = f"chdb://{data_dir}"
    clickhouse = ClickHouseResource(url=url)
    try:
        if not seed.is_empty(clickhouse):
            return url, 0.0  # kept from an earlier run (--keep): merged, not fresh
        if kind == "suggestions":
            spec = seed.SeedSpec(
                seed=11,
                users=size,
                posts=10 * size,
                events=50 * size,
                days=7,
                follows_per_user=56,
                as_of=AS_OF,
            )
        else:
            spec = seed.SeedSpec(
                seed=7, users=100_000, posts=size // 10, events=size, days=7, as_of=AS_OF
            )
        summary = seed.generate(clickhouse, spec)
    finally:
        clickhouse.close()
    return url, summary.elapsed_s


def fitted_exponent(sizes: list[int], seconds: list[float]) -> float:
    """The slope of log(time) against log(size), least squares."""
    xs, ys = [math.log(s) for s in sizes], [math.log(t) for t in seconds]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def bench(kind: str, sizes: list[int], repeat: int, work: Path) -> list[str]:
    unit = "users" if kind == "suggestions" else "events"
    lines = [
        f"| {unit} | data | seconds (median of {repeat}) | {unit}/s | peak RSS MiB | "
        "live follow edges | load (1 min avg) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    medians: dict[str, list[tuple[int, float, float, int]]] = {"fresh": [], "merged": []}
    for size in sizes:
        url, seeded_s = seed_size(kind, size, work / f"{kind}-{size}")
        for data in ("fresh", "merged"):
            if data == "merged":
                merge(url)
            reports = [run_child(kind, url) for _ in range(repeat)]
            seconds = statistics.median(r["seconds"] for r in reports)
            peak = statistics.median(r["peak_mib"] for r in reports)
            rows, edges = reports[0]["rows"], reports[0]["edges"]
            rate = (rows if kind == "suggestions" else size) / seconds
            medians[data].append((size, seconds, peak, edges))
            lines.append(
                f"| {size:,} | {data} | {seconds:.1f} | {rate:,.0f} | {peak:,.0f} | {edges:,} | "
                f"{os.getloadavg()[0]:.2f} |"
            )
        print(f"  {kind} {size:,}: seeded in {seeded_s:.0f} s", file=sys.stderr, flush=True)
    lines.append("")
    for data, points in medians.items():
        if len(points) < 2:
            continue
        exponent = fitted_exponent([p[0] for p in points], [p[1] for p in points])
        text = f"{data}: time grows as size^{exponent:.2f}"
        if kind == "suggestions":
            (_, _, low_peak, low_edges), (_, _, high_peak, high_edges) = points[0], points[-1]
            per_edge = (high_peak - low_peak) * 2**20 / max(high_edges - low_edges, 1)
            text += f"; peak memory grows {per_edge:.0f} bytes per live follow edge"
        lines.append(text)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", default="30000,100000,300000")
    parser.add_argument("--events", default="1000000,10000000")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="a directory for the datasets (kept)")
    parser.add_argument("--materialize", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.materialize:
        materialize_in_this_process(*args.materialize)
        return
    with tempfile.TemporaryDirectory() as scratch:
        work = args.keep or Path(scratch)
        print(f"\n## Scale curve ({os.cpu_count()} cores)\n")
        print("### Suggested users\n")
        users = [int(n) for n in args.users.split(",") if n]
        print("\n".join(bench("suggestions", users, args.repeat, work)))
        print("\n### Trending 7d\n")
        events = [int(n) for n in args.events.split(",") if n]
        print("\n".join(bench("trending", events, args.repeat, work)))


if __name__ == "__main__":
    main()
