"""Tick to fresh cache: the every-minute jobs under `dagster dev`, with each way of starting runs.

    .venv/bin/python bench/tick_to_fresh.py [--minutes 6] [--keep DIR]

On a dataset of 10 million events ending now, `dagster dev` (webserver, daemon, code server) runs
the code location for `--minutes` minutes (six: five or six runs of each job, the first tick
falling while `dagster dev` starts), three times, one after the other on the same data:
with the project's run launcher (each run's worker forked from a process that has imported
Dagster) and its in-process executor; with Dagster's default run launcher (the code server starts
each worker as a new interpreter) and the in-process executor, the baseline; and with the default
launcher and Dagster's multiprocess executor (`bench/multiprocess_location.py`), Dagster's
default. For `trending_1h` and `cache_warmer`, both every minute, it reports for each
scheduled run the time from the schedule's tick (the run's scheduled time) to the moment the
Redis key holds the run's value, polled every 20 ms, and the CPU-seconds of the run's processes
(its worker and any step process it starts, read from /proc every 50 ms). The demo traffic job
keeps appending events every minute, as under `make dev`, and the 24h window runs every five
minutes; suggestions move to daily, so a long run of theirs does not fall into one variant's
minutes and not the other's (the 7d window still runs on the hour).

Then, on a dataset of `--sharing-users` users (56 follows and 50 events each, ending now), it
launches one suggestions run under `dagster dev` and reports, for the every-minute ticks that fall
during it, whether their runs succeeded and how long after the tick their keys were fresh, and
how many sampled warmed feeds were found expired (checked every second).
"""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import redis
import yaml
from common import REDIS_URL

from nova_assets.core.resources import CLICKHOUSE_POOL, ClickHouseResource
from nova_assets.core.workers import worker_pid
from nova_assets.defs.demo import SCHEDULED_AT_TAG
from nova_assets.local import instance as local_instance
from nova_assets.local import seed

HERE = Path(__file__).parent
DAGSTER = Path(sys.executable).parent / "dagster"
MODULE = ["-m", "nova_assets.definitions"]
VARIANTS = {
    # name: (the code location, whether runs use the project's preloaded run launcher)
    "preloaded worker, in process": (MODULE, True),
    "code server's worker, in process (baseline)": (MODULE, False),
    "code server's worker, a process per step": (
        ["-f", str(HERE / "multiprocess_location.py")],
        False,
    ),
}
JOBS = {"trending_1h": "trending_posts_1h", "cache_warmer": "warmed_feeds"}
SCHEDULED_AT = SCHEDULED_AT_TAG
TARGET_P50_S = 5.0
TARGET_CPU_S = 3.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STARTED_WORKER = re.compile(r"Started process for run \(pid: (\d+)\)")
"""The line `dagster api execute_run` logs with its pid, whichever launcher started it."""


def run_worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The pid of the run's worker: the local launcher's tag, else the pid the worker logged.

    Runs of Dagster's default launcher (the baseline variants) carry no tag; their worker, started
    by the code server, logs its pid in the run's log.
    """
    pid = worker_pid(instance, run_id)
    if pid is not None:
        return pid
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT).records
    for record in records:
        match = STARTED_WORKER.search(record.event_log_entry.message or "")
        if match:
            return int(match.group(1))
    return None


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
    workers: list[int] = field(default_factory=list)
    runs: int = 0
    failed: int = 0


def feed_keys(instance: dg.DagsterInstance) -> list[str]:
    """The feed keys the last `warmed_feeds` materialization recorded (a sample of 20)."""
    event = instance.get_latest_materialization_event(dg.AssetKey("warmed_feeds"))
    if event is None or event.asset_materialization is None:
        return []
    keys = event.asset_materialization.metadata.get("healing_keys")
    return list(keys.value) if keys and keys.value else []


_LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
  }
}"""


def launch(port: int, location: str, job: str, deadline_s: float = 120) -> str:
    """Launch `job` as the UI's Launch button does, once the webserver answers."""
    params = {
        "selector": {
            "repositoryLocationName": location,
            "repositoryName": "__repository__",
            "jobName": job,
        },
        "mode": "default",
        "executionMetadata": {"tags": []},
    }
    body = json.dumps({"query": _LAUNCH, "variables": {"params": params}}).encode()
    deadline = time.monotonic() + deadline_s
    while True:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/graphql",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                launched = json.load(response)["data"]["launchPipelineExecution"]
            if launched["__typename"] == "LaunchRunSuccess":
                return launched["run"]["runId"]
        except (OSError, KeyError, TypeError):
            launched = None
        if time.monotonic() >= deadline:
            raise SystemExit(f"could not launch {job}: {launched}")
        time.sleep(1)


def write_instance(home: Path, preloaded: bool) -> None:
    """The local instance; without `preloaded`, with Dagster's default run launcher."""
    local_instance.write_instance(home, max_concurrent_jobs=5)
    if not preloaded:
        config_file = home / "dagster.yaml"
        config = yaml.safe_load(config_file.read_text())
        del config["run_launcher"]
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    local_instance.initialize_pools(home, [CLICKHOUSE_POOL])


def run_variant(
    name: str,
    variant: tuple[list[str], bool],
    url: str,
    minutes: float,
    work: Path,
    *,
    suggestions: bool = False,
) -> dict:
    """Run `dagster dev` for `minutes` and measure.

    With `suggestions`, run it instead until a suggestions run it launches has ended, counting
    meanwhile the sampled warmed feeds found expired.
    """
    location, preloaded = variant
    home = work / re.sub(r"\W+", "-", name) / "dagster"
    write_instance(home, preloaded)
    prefix = f"bench:tick:{home.parent.name}:"
    env = os.environ | {
        "DAGSTER_HOME": str(home),
        "CLICKHOUSE_URL": url,
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": prefix,
        "SUGGESTION_INTERVAL_SEC": "86400",
        # A TTL must cover two intervals (docs/design.md §8).
        "SUGGESTION_TTL_SEC": "172800",
        # Steady state: at start the healer would fill all five caches at once.
        "CACHE_HEALING": "off",
    }
    log = (home.parent / "dagster-dev.log").open("wb")
    port = free_port()
    command = [str(DAGSTER), "dev", *location, "--host", "127.0.0.1", "--port", str(port)]
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
    suggestions_run, feeds, expired = None, [], 0
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            if suggestions:
                suggestions_run = launch(port, location[1], "suggested_users")

            ended: list[float] = []

            def going() -> bool:
                if suggestions_run is None:
                    return time.time() - started < minutes * 60
                # Then 30 s more, for the runs of the ticks during it to finish.
                if not ended:
                    run = instance.get_run_by_id(suggestions_run)
                    if run is not None and run.is_finished:
                        ended.append(time.time())
                return not ended or time.time() < ended[0] + 30

            while going():
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
                        feeds = feed_keys(instance)
                        watches["cache_warmer"].key = feeds[0] if feeds else None
                    elif feeds:
                        expired += len(feeds) - client.exists(*feeds)
                    next_load = now + 1
                time.sleep(0.02)
            since, until = started, time.time()
            if suggestions_run is not None:
                record = instance.get_run_record_by_id(suggestions_run)
                since, until = record.start_time or started, record.end_time or until
                status = record.dagster_run.status.value
            figures = collect(instance, watches, processes, since, until)
    finally:
        os.killpg(dev.pid, 15)
        try:
            dev.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, 9)
            dev.wait()
        client.close()
        log.close()
    result = {"figures": figures, "load": statistics.mean(loads) if loads else 0.0}
    if preloaded:
        # The fork server's own CPU (its imports, once, and each fork), not counted per run.
        servers = {processes.parent.get(pid) for f in figures.values() for pid in f.workers}
        result["fork_server_cpu_s"] = sum(processes.cpu_s.get(pid, 0.0) for pid in servers if pid)
    if suggestions_run is not None:
        result |= {
            "span_s": until - since,
            "status": status,
            "expired": expired,
            "watched": len(feeds),
        }
    return result


def collect(
    instance: dg.DagsterInstance,
    watches: dict[str, KeyWatch],
    processes: Processes,
    since: float,
    until: float,
) -> dict[str, JobFigures]:
    """Each job's scheduled runs whose tick fell in [since, until]."""
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
            if not since <= tick <= until:
                continue
            job_figures.runs += 1
            if record.dagster_run.status != dg.DagsterRunStatus.SUCCESS:
                job_figures.failed += 1
                continue
            fresh = watches[job].fresh_at(record.start_time, record.end_time or time.time())
            if fresh is not None:
                job_figures.latencies.append(fresh - tick)
            pid = run_worker_pid(instance, record.dagster_run.run_id)
            if pid is not None:
                job_figures.cpu.append(processes.tree_cpu_s(pid))
                job_figures.workers.append(pid)
        figures[job] = job_figures
    return figures


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(results: dict[str, dict]) -> list[str]:
    lines = [
        "| job | worker, executor | runs (failed) | tick → fresh p50 (s) | p95 (s) | "
        "CPU-s per run, median | load (1 min avg) |",
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
            f"{job}, {next(iter(VARIANTS))}: p50 {p50:.2f} s (target ≤ {TARGET_P50_S:.0f} s: "
            f"{'met' if p50 <= TARGET_P50_S else '**missed**'}), {cpu:.2f} CPU-s per run "
            f"(target ≤ {TARGET_CPU_S:.0f}: {'met' if cpu <= TARGET_CPU_S else '**missed**'})"
        )
    server_cpu_s = results[next(iter(VARIANTS))].get("fork_server_cpu_s")
    if server_cpu_s is not None:
        lines.append(
            f"The fork server the workers are forked from used {server_cpu_s:.2f} CPU-s in all "
            "(its imports, once, and the forks), not counted in any run's CPU-s above."
        )
    return lines


def seed_now(data_dir: Path, events: int, users: int = 100_000, follows: int = 30) -> str:
    url = f"chdb://{data_dir}"
    clickhouse = ClickHouseResource(url=url)
    try:
        if seed.is_empty(clickhouse):
            spec = seed.SeedSpec(
                seed=7,
                users=users,
                posts=events // 10,
                events=events,
                days=7,
                follows_per_user=follows,
                as_of=datetime.now(UTC),
            )
            summary = seed.generate(clickhouse, spec)
            print(
                f"seeded {users:,} users and {events:,} events ending now in "
                f"{summary.elapsed_s:.1f} s"
            )
    finally:
        clickhouse.close()
    return url


def sharing_report(result: dict) -> list[str]:
    lines = [
        f"A suggestions run launched under `dagster dev`: {result['status']} after "
        f"{result['span_s']:.0f} s. Every-minute ticks that fell during it "
        f"(load {result['load']:.2f}):",
        "",
        "| job | ticks during the run | failed | tick → fresh p50 (s) | max (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for job in JOBS:
        f = result["figures"][job]
        worst = max(f.latencies) if f.latencies else float("nan")
        lines.append(
            f"| {job} | {f.runs} | {f.failed} | {percentile(f.latencies, 0.5):.2f} | {worst:.2f} |"
        )
    lines.append("")
    lines.append(
        f"Warmed feeds found expired during the run: {result['expired']} "
        f"(of {result['watched']} sampled keys, checked every second)."
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=6)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--keep", type=Path, help="seeded data directory to create or reuse")
    parser.add_argument(
        "--sharing-users",
        type=int,
        default=300_000,
        help="users of the sharing run's dataset (0 to skip it)",
    )
    parser.add_argument(
        "--logs", type=Path, help="keep the instances and `dagster dev` logs in this directory"
    )
    parser.add_argument("--skip-ticks", action="store_true", help="only the sharing run")
    args = parser.parse_args()
    if not args.skip_ticks:
        tick_to_fresh(args)
    if args.sharing_users:
        sharing(args)


def tick_to_fresh(args: argparse.Namespace) -> None:
    print("\n## Tick to fresh cache\n")
    with tempfile.TemporaryDirectory() as scratch:
        work = args.logs or Path(scratch)
        url = seed_now(args.keep or work / "clickhouse", args.events)
        results = {
            name: run_variant(name, variant, url, args.minutes, work)
            for name, variant in VARIANTS.items()
        }
    print(f"{args.minutes:g} minutes each, {args.events:,} events, {os.cpu_count()} cores.\n")
    print("\n".join(report(results)))


def sharing(args: argparse.Namespace) -> None:
    print(f"\n## Sharing the engine with a suggestions run on {args.sharing_users:,} users\n")
    with tempfile.TemporaryDirectory() as scratch:
        work = (args.logs / "sharing") if args.logs else Path(scratch)
        users = args.sharing_users
        url = seed_now(work / "clickhouse", 50 * users, users=users, follows=56)
        variant = next(iter(VARIANTS.values()))
        result = run_variant("sharing", variant, url, 0, work, suggestions=True)
    print("\n".join(sharing_report(result)))


if __name__ == "__main__":
    main()
