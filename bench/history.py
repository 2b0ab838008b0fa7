"""Benchmark of run history's cost over time: a day, a month and a year, with and without retention.

    .venv/bin/python bench/history.py [--day 3300] [--month 100000] [--year 1200000]

Production runs about 3,300 runs a day (docs/design.md §5). For each span, a fresh SQLite instance
gets that span's runs of the five jobs in bulk (`nova_assets_tests.history`; the month's runs
carry twelve 3 kB log lines each, about what a real run writes, the year's only their start and
end events, to fit a disk). Then, side by side in the same run:

- kept: every run, as Dagster leaves it;
- retained: after the run retention (`RUN_RETENTION_DAYS`, 7) caught up, timed as it goes: runs
  deleted per second, and the longest single page (how long it holds the instance at most).

Each gets its size on disk, `nova-assets health` (the command, in a process of its own), the
metrics sensor's rebuild from history, and the GraphQL queries of the UI's runs page and asset
catalog on a `dagster-webserver` of that instance. Targets: `health` on a year within 20 % of a
day; no page of the retention over 1 s.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import common

from nova_assets.core.budget import Budget
from nova_assets.core.jobs import job_specs
from nova_assets.core.settings import Settings
from nova_assets.defs.metrics.state import MetricsState, advance
from nova_assets.defs.retention import prune as retention
from nova_assets_tests.history import FinishedRun, add_history, history_instance

SPECS = job_specs(Settings.from_env({}))
NAMES = [spec.name for spec in SPECS]
BIN = Path(sys.executable).parent
DAY_S = 86_400
RETENTION_DAYS = 7
CHUNK = 10_000

RUNS_QUERY = """
query Runs($filter: RunsFilter, $limit: Int) {
  runsOrError(filter: $filter, limit: $limit) {
    ... on Runs { results { runId status startTime endTime tags { key value } } }
  }
}"""
CATALOG_QUERY = """
query Catalog {
  assetNodes { assetKey { path } assetMaterializations(limit: 1) { runId timestamp } }
}"""


def write_span(instance, runs: int, days: float, log_events: int) -> None:
    """`runs` finished runs of the jobs in turn, evenly over the last `days`, one in 7 failed."""
    now = time.time()
    every = days * DAY_S / runs
    first = now - days * DAY_S
    for start in range(0, runs, CHUNK):
        add_history(
            instance,
            [
                FinishedRun(
                    job_name=NAMES[i % len(NAMES)],
                    ok=i % 7 != 0,
                    start=first + i * every,
                    end=first + i * every + 2.0,
                    log_events=log_events,
                    log_bytes=3000,
                )
                for i in range(start, min(runs, start + CHUNK))
            ],
        )


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def health_s(home: Path) -> float:
    """Wall time of `nova-assets health --json` on the instance at `home`."""
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    started = time.perf_counter()
    subprocess.run(
        [str(BIN / "nova-assets"), "health", "--json"], env=env, capture_output=True, check=False
    )
    return time.perf_counter() - started


def rebuild_s(instance) -> float:
    started = time.perf_counter()
    state = MetricsState()
    while True:
        state = advance(instance, state, SPECS, Budget(3600))
        if state.caught_up:
            return time.perf_counter() - started


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str, variables: dict | None = None) -> float:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.load(response)
    elapsed = time.perf_counter() - started
    if answer.get("errors"):
        raise SystemExit(f"GraphQL refused the query: {answer['errors']}")
    return elapsed


def ui_queries_ms(home: Path) -> tuple[float, float]:
    """Median ms of the runs page's and the asset catalog's queries on a webserver of `home`."""
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    server = subprocess.Popen(
        [
            str(BIN / "dagster-webserver"),
            *("-h", "127.0.0.1", "-p", str(port), "-m", "nova_assets.definitions"),
        ],
        env=env,
        cwd=common.ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("dagster-webserver did not answer") from None
                time.sleep(0.5)
        variables = {"filter": {"pipelineName": "trending_1h"}, "limit": 25}
        runs = [_graphql(port, RUNS_QUERY, variables) for _ in range(5)]
        catalog = [_graphql(port, CATALOG_QUERY) for _ in range(5)]
    finally:
        server.terminate()
        server.wait(timeout=30)
    return sorted(runs)[2] * 1000, sorted(catalog)[2] * 1000


def catch_up(instance) -> dict[str, float]:
    """Run the retention to the end, one evaluation's budget at a time; its rates."""
    deleted, evaluations, longest = 0, 0, 0.0
    started = time.perf_counter()
    cutoff = retention.cutoff_for(RETENTION_DAYS)
    while True:
        done = retention.prune(instance, NAMES, cutoff, Budget(10.0))
        longest = max(longest, done.longest_page_s)
        deleted += done.deleted
        evaluations += 1
        if not done.more:
            break
    seconds = time.perf_counter() - started
    return {
        "deleted": deleted,
        "rate": deleted / seconds,
        "evaluations": evaluations,
        "longest_page_s": longest,
    }


def measure(label: str, runs: int, days: float, log_events: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(dir=common.ROOT / ".nova") as scratch:
        home = Path(scratch)
        with history_instance(home) as instance:
            write_span(instance, runs, days, log_events)
            rows.append(
                {
                    "history": f"{label}, kept",
                    "runs": runs,
                    "bytes": du(home),
                    "health_s": health_s(home),
                    "rebuild_s": rebuild_s(instance),
                }
            )
        rows[-1]["runs_ms"], rows[-1]["catalog_ms"] = ui_queries_ms(home)
        if days <= RETENTION_DAYS:
            return rows
        with history_instance(home) as instance:
            rates = catch_up(instance)
            left = instance.get_runs_count()
            rows.append(
                {
                    "history": f"{label}, retained ({RETENTION_DAYS} d)",
                    "runs": left,
                    "bytes": du(home),
                    "health_s": health_s(home),
                    "rebuild_s": rebuild_s(instance),
                    **rates,
                }
            )
        rows[-1]["runs_ms"], rows[-1]["catalog_ms"] = ui_queries_ms(home)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--day", type=int, default=3_300)
    parser.add_argument("--month", type=int, default=100_000)
    parser.add_argument("--year", type=int, default=1_200_000)
    args = parser.parse_args()
    print("\n## Run history over time: kept, and after the run retention\n")
    print(
        "| history | runs | size (MiB) | `health` (s) | metrics rebuild (s) "
        "| runs page (ms) | asset catalog (ms) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for label, runs, days, events in (
        ("a day", args.day, 1, 12),
        ("30 days", args.month, 30, 12),
        ("a year", args.year, 365, 0),
    ):
        for row in measure(label, runs, days, events):
            rows.append(row)
            print(
                f"| {row['history']} | {row['runs']:,} | {row['bytes'] / 2**20:,.0f} "
                f"| {row['health_s']:.2f} | {row['rebuild_s']:.1f} | {row['runs_ms']:,.0f} "
                f"| {row['catalog_ms']:,.0f} |",
                flush=True,
            )
    print(
        "\n| retention catch-up | runs deleted | runs/s | evaluations (10 s) | longest page (s) |"
    )
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        if "rate" in row:
            print(
                f"| {row['history']} | {row['deleted']:,} | {row['rate']:,.0f} "
                f"| {row['evaluations']} | {row['longest_page_s']:.2f} |"
            )
    day, year = rows[0]["health_s"], rows[-1]["health_s"]
    print(
        f"\n`health`, a year retained vs a day: {year / day:.2f}x "
        f"(target ≤ 1.2x: {'met' if year <= 1.2 * day else 'missed'})."
    )


if __name__ == "__main__":
    main()
