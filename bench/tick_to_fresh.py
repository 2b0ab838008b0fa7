"""Tick to fresh cache: the every-minute jobs under `dagster dev`, in process and process per step.

    .venv/bin/python bench/tick_to_fresh.py [--minutes 5] [--keep DIR]

On a dataset of 10 million events ending now, `dagster dev` (webserver, daemon, code server) runs
the code location for `--minutes` minutes, twice, one after the other on the same data: with the
project's in-process executor, and with Dagster's multiprocess executor
(`bench/multiprocess_location.py`), the baseline. For `trending_1h` and `cache_warmer`, both every
minute, it reports for each scheduled run the time from the schedule's tick (the run's scheduled
time) to the moment the Redis key holds the run's value, polled every 20 ms, and the CPU-seconds
of the run's processes (its worker and any step process it starts, read from /proc every 50 ms).
The demo traffic job keeps appending events every minute, as under `make dev`, and the 24h window
runs every five minutes; suggestions move to daily, so a long run of theirs does not fall into one
variant's minutes and not the other's (the 7d window still runs on the hour).
"""

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import redis
from common import REDIS_URL

from nova_assets.core.resources import CLICKHOUSE_POOL, ClickHouseResource
from nova_assets.local import instance as local_instance
from nova_assets.local import seed
from nova_assets.local.demo import SCHEDULED_AT_TAG

HERE = Path(__file__).parent
DAGSTER = Path(sys.executable).parent / "dagster"
VARIANTS = {
    "in process (now)": ["-m", "nova_assets.definitions"],
    "a process per step (before)": ["-f", str(HERE / "multiprocess_location.py")],
}
JOBS = {"trending_1h": "trending_posts_1h", "cache_warmer": "warmed_feeds"}
SCHEDULED_AT = SCHEDULED_AT_TAG
TARGET_P50_S = 5.0
TARGET_CPU_S = 3.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RUN_PID = re.compile(r"process for run \(pid: (\d+)\)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """CPU time of every process on the machine, and its parent, read from /proc while it lives.

    A process's last reading is kept after it exits, so up to one polling interval of its CPU at
    the very end is not counted.
    """

    def __init__(self) -> None:
        self.cpu_s: dict[int, float] = {}
        self.parent: dict[int, int] = {}

    def poll(self) -> None:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            pid = int(name)
            self.parent[pid] = int(fields[1])
            self.cpu_s[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def tree_cpu_s(self, pid: int) -> float:
        """CPU-seconds of `pid` and every process descended from it."""
        children: dict[int, list[int]] = {}
        for child, parent in self.parent.items():
            children.setdefault(parent, []).append(child)
        total, todo = 0.0, [pid]
        while todo:
            current = todo.pop()
            total += self.cpu_s.get(current, 0.0)
            todo += children.get(current, [])
        return total


def run_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The run worker's pid, from the run's "Started process for run (pid: N)" event."""
    for entry in instance.all_logs(run_id):
        match = RUN_PID.search(entry.message or "")
        if match:
            return int(match.group(1))
    return None


@dataclass
class KeyWatch:
    """When each new value of a Redis key was first seen."""

    key: str | None
    changes: list[tuple[float, bytes]] = field(default_factory=list)

    def poll(self, client: redis.Redis) -> None:
        if self.key is None:
            return
        value = client.get(self.key)
        if value is not None and (not self.changes or self.changes[-1][1] != value):
            self.changes.append((time.time(), value))

    def fresh_at(self, start: float, end: float) -> float | None:
        """The first new value seen while a run was going (or just after it ended)."""
        return next((t for t, _ in self.changes if start <= t <= end + 0.5), None)


@dataclass
class JobFigures:
    latencies: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    runs: int = 0
    failed: int = 0


def feed_key(instance: dg.DagsterInstance) -> str | None:
    """A feed key the last `warmed_feeds` materialization wrote (from its healing sample)."""
    event = instance.get_latest_materialization_event(dg.AssetKey("warmed_feeds"))
    if event is None or event.asset_materialization is None:
        return None
    keys = event.asset_materialization.metadata.get("healing_keys")
    return keys.value[0] if keys and keys.value else None


def run_variant(name: str, location: list[str], url: str, minutes: float, work: Path) -> dict:
    home = work / re.sub(r"\W+", "-", name) / "dagster"
    local_instance.write_instance(home, max_concurrent_jobs=5)
    local_instance.initialize_pools(home, [CLICKHOUSE_POOL])
    prefix = f"bench:tick:{home.parent.name}:"
    env = os.environ | {
        "DAGSTER_HOME": str(home),
        "CLICKHOUSE_URL": url,
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": prefix,
        "SUGGESTION_INTERVAL_SEC": "86400",
    }
    log = (home.parent / "dagster-dev.log").open("wb")
    command = [str(DAGSTER), "dev", *location, "--host", "127.0.0.1", "--port", str(free_port())]
    dev = subprocess.Popen(
        command, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    client = redis.Redis.from_url(REDIS_URL)
    watches = {
        "trending_1h": KeyWatch(prefix + "trending:1h"),
        "cache_warmer": KeyWatch(None),
    }
    processes = Processes()
    loads = []
    started = time.time()
    next_process_poll = next_load = 0.0
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            while time.time() - started < minutes * 60:
                if dev.poll() is not None:
                    raise SystemExit(f"dagster dev exited; see {log.name}")
                for watch in watches.values():
                    watch.poll(client)
                now = time.monotonic()
                if now >= next_process_poll:
                    processes.poll()
                    next_process_poll = now + 0.05
                if now >= next_load:
                    loads.append(os.getloadavg()[0])
                    if watches["cache_warmer"].key is None:
                        watches["cache_warmer"].key = feed_key(instance)
                    next_load = now + 5
                time.sleep(0.02)
            figures = collect(instance, watches, processes, started)
    finally:
        os.killpg(dev.pid, 15)
        try:
            dev.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, 9)
            dev.wait()
        client.close()
        log.close()
    return {"figures": figures, "load": statistics.mean(loads) if loads else 0.0}


def collect(
    instance: dg.DagsterInstance,
    watches: dict[str, KeyWatch],
    processes: Processes,
    since: float,
) -> dict[str, JobFigures]:
    figures = {}
    for job in JOBS:
        job_figures = JobFigures()
        records = instance.get_run_records(
            filters=dg.RunsFilter(
                job_name=job,
                statuses=[dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE],
            )
        )
        for record in records:
            tags = record.dagster_run.tags
            if SCHEDULED_AT not in tags or record.start_time is None:
                continue
            tick = datetime.fromisoformat(tags[SCHEDULED_AT]).timestamp()
            if tick < since:
                continue
            job_figures.runs += 1
            if record.dagster_run.status != dg.DagsterRunStatus.SUCCESS:
                job_figures.failed += 1
                continue
            fresh = watches[job].fresh_at(record.start_time, record.end_time or time.time())
            if fresh is not None:
                job_figures.latencies.append(fresh - tick)
            pid = run_pid(instance, record.dagster_run.run_id)
            if pid is not None:
                job_figures.cpu.append(processes.tree_cpu_s(pid))
        figures[job] = job_figures
    return figures


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(results: dict[str, dict]) -> list[str]:
    lines = [
        "| job | executor | runs (failed) | tick → fresh p50 (s) | p95 (s) | CPU-s per run, "
        "median | load (1 min avg) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for job in JOBS:
        for name, result in results.items():
            f = result["figures"][job]
            cpu = statistics.median(f.cpu) if f.cpu else float("nan")
            lines.append(
                f"| {job} | {name} | {f.runs} ({f.failed}) | "
                f"{percentile(f.latencies, 0.5):.2f} | {percentile(f.latencies, 0.95):.2f} | "
                f"{cpu:.2f} | {result['load']:.2f} |"
            )
    lines.append("")
    now = results[next(iter(VARIANTS))]["figures"]
    for job in JOBS:
        f = now[job]
        p50 = percentile(f.latencies, 0.5)
        cpu = statistics.median(f.cpu) if f.cpu else float("nan")
        lines.append(
            f"{job}, in process: p50 {p50:.2f} s (target ≤ {TARGET_P50_S:.0f} s: "
            f"{'met' if p50 <= TARGET_P50_S else '**missed**'}), {cpu:.2f} CPU-s per run "
            f"(target ≤ {TARGET_CPU_S:.0f}: {'met' if cpu <= TARGET_CPU_S else '**missed**'})"
        )
    return lines


def seed_now(data_dir: Path, events: int) -> str:
    url = f"chdb://{data_dir}"
    clickhouse = ClickHouseResource(url=url)
    try:
        if seed.is_empty(clickhouse):
            spec = seed.SeedSpec(
                seed=7,
                users=100_000,
                posts=events // 10,
                events=events,
                days=7,
                as_of=datetime.now(UTC),
            )
            summary = seed.generate(clickhouse, spec)
            print(f"seeded {events:,} events ending now in {summary.elapsed_s:.1f} s")
    finally:
        clickhouse.close()
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--keep", type=Path, help="seeded data directory to create or reuse")
    args = parser.parse_args()
    print("\n## Tick to fresh cache\n")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        url = seed_now(args.keep or work / "clickhouse", args.events)
        results = {
            name: run_variant(name, location, url, args.minutes, work)
            for name, location in VARIANTS.items()
        }
    print(f"{args.minutes:g} minutes each, {args.events:,} events, {os.cpu_count()} cores.\n")
    print("\n".join(report(results)))


if __name__ == "__main__":
    main()
