"""A run whose step waits for the engine's pool slot sleeps while it waits, and then runs.

The run is a `dagster job execute` process on the local instance, its step on the `clickhouse`
pool while another run's step holds the one slot: the path of every run that waits its turn for
the embedded engine. Dagster's executor loop would spin a core for the whole wait; the process
must instead use next to no CPU, and take the slot once it is freed. The local instance's storage
tells a waiting step to ask again after 0.2 s, and less often the longer it has waited.
"""

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg

from nova_assets.core.resources import CLICKHOUSE_POOL
from nova_assets.internals import pool_wait
from nova_assets.internals.slot_storage import FIRST_RETRY_S, LAST_RETRY_S, claim_retry_s
from nova_assets.local.instance import initialize_pools, write_instance

ROOT = Path(__file__).parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
HOLD_S = 3.0


def _cpu_s(pid: int) -> float:
    """CPU-seconds (user and system) process `pid` has used, from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_step_waiting_for_the_slot_sleeps_and_then_runs(clickhouse, tmp_path):
    clickhouse.close()  # this process must not hold the engine while the run uses it
    write_instance(tmp_path, max_concurrent_jobs=5)
    initialize_pools(tmp_path, [CLICKHOUSE_POOL])
    env = os.environ | {"DAGSTER_HOME": str(tmp_path), "NOVA_TEST_CLICKHOUSE_URL": clickhouse.url}
    command = [
        str(Path(sys.executable).parent / "dagster"),
        *("job", "execute", "-m", "nova_assets_tests.pool_jobs", "-j", "engine_job"),
    ]
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        storage = instance.event_log_storage
        holder = storage.claim_concurrency_slot(CLICKHOUSE_POOL, "another-run", "its-step")
        assert holder.is_claimed
        worker = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            # The run's step has asked for the slot and waits in line.
            _until(lambda: storage.get_concurrency_info(CLICKHOUSE_POOL).pending_step_count == 1)
            before = _cpu_s(worker.pid)
            time.sleep(HOLD_S)
            waiting_cpu_s = _cpu_s(worker.pid) - before
            pending = storage.get_concurrency_info(CLICKHOUSE_POOL).pending_step_count
            storage.free_concurrency_slot_for_step("another-run", "its-step")
            output = worker.communicate(timeout=120)[0].decode()
        finally:
            worker.kill()
        runs = instance.get_runs()

    assert pending == 1, "the step did not wait for the slot"
    # Spinning, the process would use about one CPU-second per second of the wait.
    assert waiting_cpu_s < 0.2 * HOLD_S, f"{waiting_cpu_s:.2f} CPU-s while waiting {HOLD_S} s"
    assert worker.returncode == 0, output[-3000:]
    assert [r.status for r in runs] == [dg.DagsterRunStatus.SUCCESS]


def test_the_fix_replaces_only_a_wait_that_spins():
    assert pool_wait.spins(lambda self: 0.0)
    assert not pool_wait.spins(pool_wait.interval_to_next_claim)
    # Internals of another shape: not the method the fix was written for.
    assert not pool_wait.spins(lambda self: self.no_such_attribute)
    assert pool_wait.fix_pool_wait()


def test_a_step_without_a_slot_asks_again_soon_and_less_often_as_it_waits(tmp_path):
    write_instance(tmp_path, max_concurrent_jobs=5)
    initialize_pools(tmp_path, [CLICKHOUSE_POOL])
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        storage = instance.event_log_storage
        held = storage.claim_concurrency_slot(CLICKHOUSE_POOL, "a-run", "its-step")
        waiting = storage.claim_concurrency_slot(CLICKHOUSE_POOL, "another-run", "its-step")
    assert held.is_claimed and held.sleep_interval is None
    assert not waiting.is_claimed
    assert waiting.sleep_interval == FIRST_RETRY_S

    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    # SQLite's timestamps come without a zone: they are UTC.
    assert claim_retry_s(datetime(2026, 11, 30, 11, 59, 30), now) == 3.0
    assert claim_retry_s(now - timedelta(seconds=1), now) == FIRST_RETRY_S
    assert claim_retry_s(now - timedelta(hours=1), now) == LAST_RETRY_S
    assert claim_retry_s(None, now) == FIRST_RETRY_S
