"""Benchmark of run history's cost over time: a day, a month and a year, with and without retention.

    .venv/bin/python bench/history.py [--day 3300] [--month 100000] [--year 1200000]

Production runs about 3,300 runs a day (docs/design.md §5). For each span, a fresh instance with
the local instance's event log gets that span's runs of the five jobs in bulk
(`nova_assets_tests.history`; the day's and month's runs carry twelve 3 kB log lines each, about
what a real run writes, the year's only their start and end events, to fit a disk; failed runs
are delivered to the DLQ, as the publisher tags them). Side by side in the same run:

- kept: every run, as Dagster leaves it;
- retained: the last `RUN_RETENTION_DAYS` (7) of the same span, what the run retention leaves
  once it has caught up (written as such: deleting a year at the sensor's pace takes days).

Each gets its size on disk, `nova-assets health` (the command, in a process of its own), the
metrics sensor's rebuild from history, two evaluations of each sensor (the first without a
cursor), and the GraphQL queries of the UI's runs page and asset catalog on a
`dagster-webserver` of that instance. On each kept instance the retention then runs for three
evaluations: runs deleted per second (and the days a backlog takes at the sensor's pace, its
budget every 30 s), the longest page, and how long a tick's writes (a run and an event, in a
process of their own, every 0.1 s) take while it deletes, beside the same writes with nothing
deleting.

The steady state: `dagster dev` on demo data for `--make-dev-minutes` (10), as `make dev` runs
it; the bytes its runs and ticks added, over a week at the schedules' cadence, kept as the
retention keeps them. Targets: steady state under 2 GB locally; `health` on a year within 20 %
of a day; every sensor evaluation under 5 s at a year; no tick delayed by the retention over 1 s.
"""

import argparse
import json
import multiprocessing
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import common
import dagster as dg
from confluent_kafka.admin import AdminClient, NewTopic

from nova_assets.core.budget import Budget
from nova_assets.core.jobs import job_specs
from nova_assets.core.settings import Settings
from nova_assets.defs.dlq.writing import DELIVERED_TAG, DELIVERED_VALUE
from nova_assets.defs.metrics.state import MetricsState, advance
from nova_assets.defs.retention import prune as retention
from nova_assets.defs.retention.prune import DETAIL_EVENTS, DETAIL_KEPT_DAYS
from nova_assets.defs.retention.sensor import RETENTION_BUDGET_S, RETENTION_INTERVAL_S
from nova_assets.internals.history_store import delete_events
from nova_assets.local.stack import StackConfig, down, up
from nova_assets_tests.history import FinishedRun, add_history, history_instance

SPECS = job_specs(Settings.from_env({}))
NAMES = [spec.name for spec in SPECS]
BIN = Path(sys.executable).parent
DAY_S = 86_400
RETENTION_DAYS = 7
CHUNK = 10_000
CATCH_UP_EVALUATIONS = 3
PROBE_EVERY_S = 0.1
IDLE_PROBE_S = 5.0

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


def write_span(instance, runs: int, days: float, log_events: int, last_days: float = 0) -> None:
    """`runs` finished runs of the jobs in turn, evenly over the last `days`, one in 7 failed.

    With `last_days`, only those of the span's last `last_days` are written.
    """
    now = time.time()
    every = days * DAY_S / runs
    first = now - days * DAY_S
    since = now - last_days * DAY_S if last_days else first
    delivered = {DELIVERED_TAG: DELIVERED_VALUE}
    for start in range(0, runs, CHUNK):
        batch = [
            FinishedRun(
                job_name=NAMES[i % len(NAMES)],
                ok=i % 7 != 0,
                start=first + i * every,
                end=first + i * every + 2.0,
                tags={} if i % 7 else delivered,
                log_events=log_events,
                log_bytes=3000,
            )
            for i in range(start, min(runs, start + CHUNK))
            if first + i * every >= since
        ]
        if batch:
            add_history(instance, batch)


def du(path: Path) -> int:
    """Bytes `path` takes on disk, as `du` counts them: blocks of its files and folders."""
    return sum(p.stat().st_blocks * 512 for p in [path, *path.rglob("*")] if p.exists())


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


def _probe(home: str, stop, seconds) -> None:
    """What a tick writes (a run, an event of it), every PROBE_EVERY_S until `stop`; the times."""
    with dg.DagsterInstance.from_config(home) as instance:
        while not stop.is_set():
            started = time.perf_counter()
            run = instance.add_run(dg.DagsterRun(job_name="probe", run_id=uuid.uuid4().hex))
            instance.report_engine_event("probe", run)
            seconds.append(time.perf_counter() - started)
            time.sleep(PROBE_EVERY_S)


class TickProbe:
    """A tick's writes in a process of their own; the longest they took while it ran."""

    def __init__(self, home: Path) -> None:
        context = multiprocessing.get_context("fork")
        self.stop = context.Event()
        self.seconds = context.Manager().list()
        self.process = context.Process(target=_probe, args=(str(home), self.stop, self.seconds))

    def __enter__(self) -> "TickProbe":
        self.process.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.process.join(timeout=60)

    def longest_s(self) -> float:
        return max(self.seconds, default=float("nan"))


def catch_up(home: Path) -> dict[str, float]:
    """Three evaluations of the retention, beside a tick's writes; its rates and holds.

    Then one evaluation's budget of its other work alone, on what the deletions left: successful
    runs over `DETAIL_KEPT_DAYS` old losing their detail (runs per second).
    """
    with TickProbe(home) as idle:
        time.sleep(IDLE_PROBE_S)
    deleted, longest = 0, 0.0
    with history_instance(home) as instance:
        cutoff = retention.cutoff_for(RETENTION_DAYS)
        past = instance.get_runs_count(dg.RunsFilter(created_before=cutoff))
        with TickProbe(home) as busy:
            started = time.perf_counter()
            for _ in range(CATCH_UP_EVALUATIONS):
                done = retention.prune(instance, NAMES, cutoff, Budget(RETENTION_BUDGET_S))
                longest = max(longest, done.longest_page_s)
                deleted += done.deleted
                if not done.more:
                    break
            seconds = time.perf_counter() - started
            # One evaluation's worth of the other half: successes over a day old lose their detail.
            thinning = retention.Pruned()
            thin_started = time.perf_counter()
            retention.remove_old_detail(
                instance,
                thinning,
                Budget(RETENTION_BUDGET_S),
                retention.latest_materialization_runs(instance),
            )
            thin_s = time.perf_counter() - thin_started
    rate = deleted / seconds
    # The sensor works at most its budget every interval.
    pace = rate * RETENTION_BUDGET_S / RETENTION_INTERVAL_S
    return {
        "deleted": deleted,
        "rate": rate,
        "days_to_catch_up": past / pace / DAY_S,
        "longest_page_s": longest,
        "thinned_rate": thinning.thinned / thin_s,
        "tick_idle_s": idle.longest_s(),
        "tick_busy_s": busy.longest_s(),
    }


@contextmanager
def bench_topic() -> Iterator[str]:
    """A DLQ topic of the benchmark's own on the local broker, deleted afterwards."""
    topic = f"nova-bench-history-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": "127.0.0.1:9092"})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(timeout=30)
    try:
        yield topic
    finally:
        admin.delete_topics([topic])[topic].result(timeout=30)


def _evaluate_sensors(home: Path) -> None:
    """Each sensor of the code location evaluated twice on `home`; {name: [s, s]} printed as JSON.

    Run in a process of its own, its settings from the environment. The first evaluation has no
    cursor, the second the one the first left.
    """
    from nova_assets.definitions import defs

    times = {}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        for sensor in defs.sensors:
            cursor, times[sensor.name] = None, []
            for _ in range(2):
                started = time.perf_counter()
                with dg.build_sensor_context(
                    instance=instance, cursor=cursor, resources=defs.resources, definitions=defs
                ) as context:
                    result = sensor.evaluate_tick(context)
                    # A sensor returning a SensorResult carries its cursor there.
                    cursor = result.cursor if result.cursor is not None else context.cursor
                times[sensor.name].append(time.perf_counter() - started)
    print(json.dumps(times))


def sensors(home: Path) -> dict[str, list[float]]:
    """Each sensor's two evaluations on `home`, seconds: the first without a cursor, the next.

    On the local stack, with nothing of the developer's own touched: Redis database 15, a DLQ
    topic and a Pushgateway of their own. The retention deletes what it would.
    """
    with bench_topic() as topic, tempfile.TemporaryDirectory(dir=common.ROOT / ".nova") as scratch:
        port = _free_port()
        gateway = StackConfig(state_dir=Path(scratch), pushgateway_port=port)
        up(gateway, services=("pushgateway",))
        try:
            # Nothing of the developer's own: no webhook, no ClickHouse server named outside.
            outside = {"ALERT_WEBHOOK_URL", "CLICKHOUSE_URL"}
            env = {
                **{name: value for name, value in os.environ.items() if name not in outside},
                "DAGSTER_HOME": str(home),
                "NOVA_HOME": scratch,  # the embedded engine's folder too: not the developer's
                "REDIS_URL": common.REDIS_URL,
                "REDIS_KEY_PREFIX": "bench-history",
                "DLQ_TOPIC": topic,
                "PUSHGATEWAY_URL": f"http://127.0.0.1:{port}",
            }
            done = subprocess.run(
                [sys.executable, __file__, "--evaluate-sensors", str(home)],
                env=env,
                cwd=common.ROOT,
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            down(gateway, services=("pushgateway",))
    if done.returncode != 0:
        raise SystemExit(f"a sensor evaluation failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def _row(label: str, home: Path, instance, runs: int) -> dict:
    return {
        "history": label,
        "runs": runs,
        "bytes": du(home),
        "health_s": health_s(home),
        "rebuild_s": rebuild_s(instance),
    }


def measure(label: str, runs: int, days: float, log_events: int) -> list[dict]:
    """The span kept and, if longer than the retention, retained; then the kept one caught up."""
    rows = []
    spans = [("kept", 0)] if days <= RETENTION_DAYS else [("kept", 0), ("retained", RETENTION_DAYS)]
    for kind, last_days in spans:
        with tempfile.TemporaryDirectory(dir=common.ROOT / ".nova") as scratch:
            home = Path(scratch)
            with history_instance(home) as instance:
                write_span(instance, runs, days, log_events, last_days)
                name = f"{label}, {kind}" + (f" ({RETENTION_DAYS} d)" if last_days else "")
                rows.append(_row(name, home, instance, instance.get_runs_count()))
            rows[-1]["runs_ms"], rows[-1]["catalog_ms"] = ui_queries_ms(home)
            if kind == "kept" and days > RETENTION_DAYS:
                rows[-1].update(catch_up(home))
            rows[-1]["sensors"] = sensors(home)
    return rows


def _finished_runs(home: Path) -> Counter:
    """Finished runs of each job in the instance at `home`."""
    with sqlite3.connect(f"file:{home / 'history' / 'runs.db'}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT pipeline_name, count(*) FROM runs WHERE status IN "
            "('SUCCESS', 'FAILURE', 'CANCELED') GROUP BY pipeline_name"
        ).fetchall()
    return Counter(dict(rows))


def _run_ids(home: Path) -> set[str]:
    """The ids of every run in the instance at `home`."""
    with sqlite3.connect(f"file:{home / 'history' / 'runs.db'}?mode=ro", uri=True) as conn:
        return {run_id for (run_id,) in conn.execute("SELECT run_id FROM runs")}


def _ticks(home: Path) -> Counter:
    """Ticks in the instance at `home`, by kind (SCHEDULE, SENSOR) and status."""
    with sqlite3.connect(f"file:{home / 'schedules' / 'schedules.db'}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT type, status, count(*) FROM job_ticks GROUP BY 1, 2").fetchall()
    return Counter({(kind, status): count for kind, status, count in rows})


def _database_bytes(path: Path) -> int:
    """The bytes of a SQLite database's pages in use, its WAL file's included.

    Its size once checkpointed, whatever a live writer's WAL file holds at the moment.
    """
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        pages, free, size = (
            conn.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("page_count", "freelist_count", "page_size")
        )
    return (pages - free) * size


def _parts(home: Path) -> dict[str, int]:
    """Bytes of the instance's events, runs and ticks, and its run folders on disk."""
    return {
        "events": _database_bytes(home / "history" / "events" / "event_log.db"),
        "runs": _database_bytes(home / "history" / "runs.db"),
        "folders": du(home / "storage"),
        "ticks": _database_bytes(home / "schedules" / "schedules.db"),
    }


def _until(condition, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(1)


def make_dev_sample(minutes: float) -> dict:
    """`dagster dev` on demo data, as `make dev` runs it: what `minutes` of its runs add.

    Measured from the first finished runs on (the instance's first writes, its snapshots and
    asset keys, are shared by every later run), on a folder of its own with Redis database 15.
    """
    with bench_topic() as topic, tempfile.TemporaryDirectory(dir=common.ROOT / ".nova") as scratch:
        state = Path(scratch)
        home = state / "dagster"
        env = {
            "PATH": os.environ["PATH"],
            "NOVA_HOME": str(state),
            "DAGSTER_HOME": str(home),
            "REDIS_URL": common.REDIS_URL,
            "REDIS_KEY_PREFIX": "bench-history",
            "DLQ_TOPIC": topic,
        }
        for command in (["seed", "--if-empty"], ["instance", "--home", str(home)]):
            subprocess.run(
                [str(BIN / "nova-assets"), *command], env=env, check=True, capture_output=True
            )
        server = subprocess.Popen(
            [
                *(str(BIN / "dagster"), "dev", "-w", str(common.ROOT / "workspace.yaml")),
                *("--host", "127.0.0.1", "--port", str(_free_port())),
            ],
            env=env,
            cwd=home,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            _until(lambda: sum(_finished_runs(home).values()) >= 3, "the first runs", 300)
            runs_before, ticks_before, parts_before = (
                _finished_runs(home),
                _ticks(home),
                _parts(home),
            )
            earlier = _run_ids(home)
            started = time.monotonic()
            time.sleep(minutes * 60)
            runs_after, ticks_after, parts_after = _finished_runs(home), _ticks(home), _parts(home)
            seconds = time.monotonic() - started
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:  # a run still going holds it up: the rest goes too
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=60)
        # What the retention leaves of them after a day: their detail events gone.
        with dg.DagsterInstance.from_config(str(home)) as instance:
            for record in instance.get_run_records(
                dg.RunsFilter(statuses=[dg.DagsterRunStatus.SUCCESS])
            ):
                if record.dagster_run.run_id not in earlier:
                    delete_events(instance, record.dagster_run.run_id, DETAIL_EVENTS)
        parts_thinned = _parts(home)
    runs = runs_after - runs_before
    return {
        "minutes": seconds / 60,
        "runs": runs,
        "ticks": ticks_after - ticks_before,
        "bytes": {name: parts_after[name] - parts_before[name] for name in parts_after},
        "thinned_events": parts_thinned["events"] - parts_before["events"],
    }


def steady_state(sample: dict) -> None:
    """A week of `make dev` at the bytes a run and a tick took in the sample, and the retention.

    Runs at the schedules' cadence (the five jobs and the demo's every minute), ticks at the
    sample's rate.

    Runs stay `RUN_RETENTION_DAYS`, a successful run's folder and detail events
    `DETAIL_KEPT_DAYS` (the sample's runs weighed again without them, as its pages in use: what
    deleting rows leaves of pages shared with kept rows counts); skipped sensor ticks a day,
    other ticks a week (dagster.yaml's `retention:`).
    """
    runs = sum(sample["runs"].values())
    per_day = DAY_S / (sample["minutes"] * 60)
    runs_a_day = sum(DAY_S / spec.interval_sec for spec in SPECS) + DAY_S / 60  # and the demo's
    added = sample["bytes"]
    run_bytes = (added["events"] + added["runs"]) / runs
    thinned_bytes = (sample["thinned_events"] + added["runs"]) / runs
    folder_bytes = added["folders"] / runs
    ticks = sample["ticks"]
    tick_bytes = added["ticks"] / max(1, sum(ticks.values()))
    tick_days = sum(
        count * (1 if (kind, status) == ("SENSOR", "SKIPPED") else RETENTION_DAYS)
        for (kind, status), count in ticks.items()
    )
    thinned_days = RETENTION_DAYS - DETAIL_KEPT_DAYS
    week_runs = runs_a_day * (
        (run_bytes + folder_bytes) * DETAIL_KEPT_DAYS + thinned_bytes * thinned_days
    )
    week_ticks = tick_days * per_day * tick_bytes
    total = week_runs + week_ticks
    by_job = ", ".join(f"{name} {count}" for name, count in sorted(sample["runs"].items()))
    print(
        f"\n`make dev` for {sample['minutes']:.1f} min: {runs} runs ({by_job}), "
        f"{sum(ticks.values())} ticks.\n"
    )
    print("| a run or tick, on disk | bytes | kept | a week's steady state (GB) |")
    print("|---|---:|---|---:|")
    print(
        f"| a run's events and row, whole | {run_bytes:,.0f} | {DETAIL_KEPT_DAYS} d "
        f"| {runs_a_day * run_bytes * DETAIL_KEPT_DAYS / 1e9:.2f} |"
    )
    print(
        f"| a run's events and row, without its detail | {thinned_bytes:,.0f} "
        f"| {thinned_days} d more | {runs_a_day * thinned_bytes * thinned_days / 1e9:.2f} |"
    )
    print(
        f"| a run's folder (compute logs) | {folder_bytes:,.0f} | {DETAIL_KEPT_DAYS} d "
        f"| {runs_a_day * folder_bytes * DETAIL_KEPT_DAYS / 1e9:.2f} |"
    )
    print(f"| a tick | {tick_bytes:,.0f} | 1 d skipped, else 7 d | {week_ticks / 1e9:.2f} |")
    print(
        f"\nSteady state at the defaults: {total / 1e9:.2f} GB for {runs_a_day:,.0f} runs "
        f"a day (target < 2 GB: {'met' if total < 2e9 else 'missed'})."
    )


def main() -> None:
    if sys.argv[1:2] == ["--evaluate-sensors"]:
        _evaluate_sensors(Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--day", type=int, default=3_300)
    parser.add_argument("--month", type=int, default=100_000)
    parser.add_argument("--year", type=int, default=1_200_000)
    parser.add_argument("--make-dev-minutes", type=float, default=10.0)
    args = parser.parse_args()
    print("\n## Run history over time: kept, and after the run retention\n")
    steady_state(make_dev_sample(args.make_dev_minutes))
    print(
        "\n| history | runs | size (MiB) | `health` (s) | metrics rebuild (s) "
        "| runs page (ms) | asset catalog (ms) | slowest sensor evaluation (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    rows = []
    for label, runs, days, events in (
        ("a day", args.day, 1, 12),
        ("30 days", args.month, 30, 12),
        ("a year", args.year, 365, 0),
    ):
        for row in measure(label, runs, days, events):
            rows.append(row)
            slowest = max(row["sensors"], key=lambda name: row["sensors"][name][1])
            print(
                f"| {row['history']} | {row['runs']:,} | {row['bytes'] / 2**20:,.0f} "
                f"| {row['health_s']:.2f} | {row['rebuild_s']:.1f} | {row['runs_ms']:,.0f} "
                f"| {row['catalog_ms']:,.0f} | {row['sensors'][slowest][1]:.2f} ({slowest}) |",
                flush=True,
            )
    print("\nEach sensor's evaluation, seconds: the first without a cursor / the next.\n")
    print("| sensor | " + " | ".join(row["history"] for row in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for name in rows[0]["sensors"]:
        times = [row["sensors"][name] for row in rows]
        print(f"| {name} | " + " | ".join(f"{a:.2f} / {b:.2f}" for a, b in times) + " |")
    print(
        "\n| retention catch-up | runs deleted | runs/s | days to catch up | longest page (s) "
        "| a tick's writes, longest (s): idle | while deleting | successes thinned/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        if "rate" in row:
            print(
                f"| {row['history']} | {row['deleted']:,} | {row['rate']:,.0f} "
                f"| {row['days_to_catch_up']:.2f} | {row['longest_page_s']:.2f} "
                f"| {row['tick_idle_s']:.3f} | {row['tick_busy_s']:.3f} "
                f"| {row['thinned_rate']:,.0f} |"
            )
    day, year = rows[0], rows[-1]  # a day's history; a year, retained
    # The targets are judged on a year of operation, that is with the retention at work.
    year_retained = next(row for row in rows if row["history"].startswith("a year, retained"))
    slowest_year = max(max(times) for times in year_retained["sensors"].values())
    delay = max((row["tick_busy_s"] for row in rows if "rate" in row), default=float("nan"))
    print(
        f"\n`health`, a year retained vs a day: {year['health_s'] / day['health_s']:.2f}x "
        f"(target ≤ 1.2x: {'met' if year['health_s'] <= 1.2 * day['health_s'] else 'missed'}); "
        f"slowest sensor evaluation at a year, retained {slowest_year:.2f} s (target < 5 s: "
        f"{'met' if slowest_year < 5 else 'missed'}); longest tick write while the retention "
        f"deletes {delay:.2f} s (target ≤ 1 s: {'met' if delay <= 1 else 'missed'})."
    )


if __name__ == "__main__":
    main()
