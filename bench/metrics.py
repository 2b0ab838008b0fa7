"""Benchmark of one `job_metrics` evaluation as run history grows, the old way beside the new.

    .venv/bin/python bench/metrics.py [--sizes 1000,10000,100000]

For each size, a fresh instance (SQLite, the local default, with its event log in one database)
gets that many finished runs of the five jobs, written in bulk (`nova_assets_tests.history`).
Then, in the same run:

- old: recount every job over all of history (`compute_job_metrics`, what each evaluation did
  before the sensor kept its totals);
- new, 10 new runs: the evaluation's counting step (`advance`) after ten more runs finished,
  from the state the previous evaluation left;
- new, idle: the same with nothing new;
- rebuild: `advance` from no state at all (a lost cursor), once.

Target: the new evaluation does not grow with history (100,000 runs within 1.5x of 1,000) and
takes at most 50 ms with 10 new runs.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

# Puts the repository root on sys.path: the bulk history writer is test code (nova_assets_tests).
import common  # noqa: F401

from nova_assets.core.jobs import job_specs
from nova_assets.core.settings import Settings
from nova_assets.defs.metrics.recount import compute_job_metrics
from nova_assets.defs.metrics.state import MetricsState, advance
from nova_assets_tests.history import add_history, history_instance, spread

SPECS = job_specs(Settings.from_env({}))
NAMES = [spec.name for spec in SPECS]
REPEAT = 7


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def measure(size: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as scratch, history_instance(Path(scratch)) as instance:
        now = time.time()
        written = time.perf_counter()
        for chunk in range(0, size, 10_000):
            count = min(10_000, size - chunk)
            until = now - 3600 - (size - chunk - count) * 60.0
            add_history(instance, spread(NAMES, count, until=until))
        write_ms = _ms(written)

        started = time.perf_counter()
        state = advance(instance, MetricsState(), SPECS, budget_s=3600)
        rebuild_ms = _ms(started)
        assert state.caught_up

        old = []
        for _ in range(3):
            started = time.perf_counter()
            recount = [compute_job_metrics(instance, name) for name in NAMES]
            old.append(_ms(started))

        ten, idle = [], []
        for i in range(REPEAT):
            batch = spread(NAMES, 10, until=now - 3000 + i * 60, every_s=5, fail_every=4)
            add_history(instance, batch)
            started = time.perf_counter()
            state = advance(instance, state, SPECS)
            ten.append(_ms(started))
            started = time.perf_counter()
            state = advance(instance, state, SPECS)
            idle.append(_ms(started))
        recount = [compute_job_metrics(instance, name) for name in NAMES]
        assert state.values(NAMES) == recount, "the new way disagrees with a full recount"
    return {
        "write": write_ms,
        "rebuild": rebuild_ms,
        "old": statistics.median(old),
        "ten": statistics.median(ten),
        "idle": statistics.median(idle),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    sizes = [int(size) for size in parser.parse_args().sizes.split(",")]
    print("\n## Job metrics: one evaluation against run history (medians, ms)\n")
    print(
        "| runs in history | old: full recount | new: 10 new runs | new: nothing new "
        "| speed-up (10 new) | rebuild from history |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    results = {}
    for size in sizes:
        result = results[size] = measure(size)
        print(
            f"| {size:,} | {result['old']:,.1f} | {result['ten']:.1f} | {result['idle']:.1f} "
            f"| {result['old'] / result['ten']:,.0f}x | {result['rebuild']:,.0f} |",
            flush=True,
        )
    smallest, largest = results[min(sizes)], results[max(sizes)]
    growth = largest["ten"] / smallest["ten"]
    print(
        f"\nNew way, {max(sizes):,} vs {min(sizes):,} runs: {growth:.2f}x "
        f"(target ≤ 1.5x: {'met' if growth <= 1.5 else 'missed'}); 10 new runs at "
        f"{max(sizes):,}: {largest['ten']:.1f} ms (target ≤ 50 ms: "
        f"{'met' if largest['ten'] <= 50 else 'missed'})."
    )


if __name__ == "__main__":
    main()
