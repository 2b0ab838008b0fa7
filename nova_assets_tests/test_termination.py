"""Termination takes effect within 2 s wherever the run is, and no step starts after it.

Runs are launched through the local instance's own launcher (a worker forked per run, running
`dagster api execute_run`) and terminated as the UI's Terminate button does
(`run_launcher.terminate`): the run is marked CANCELING and its worker sent SIGINT. The run may
be starting, waiting for the `clickhouse` pool's slot (another run holds it), in a 31 s retry
backoff (the production policy's longest), or mid-step with more steps to go. In each case it must
end CANCELED within 2 s, and its event log must show no step starting, or starting again, after
the request. Terminate also recognises a live worker when the wall clock has been stepped since
the run started (the boot time /proc gives moves with it).
"""

import os
import signal
import time
from collections.abc import Callable, Iterator

import dagster as dg
import pytest

from nova_assets.core import workers
from nova_assets.core.resources import CLICKHOUSE_POOL
from nova_assets.core.workers import WORKER_TAG, run_worker, start_ticks, worker_running
from nova_assets.internals.run_launcher import LaunchRunContext
from nova_assets.local.instance import initialize_pools, write_instance
from nova_assets.local.launcher import PreloadedRunLauncher
from nova_assets_tests import pool_jobs
from nova_assets_tests.pool_jobs import LONGEST_BACKOFF_S

LATENCY_S = 2.0
"""How soon after the request a terminated run must be CANCELED."""
STARTS = (dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_RESTARTED)


@pytest.fixture
def local_instance(tmp_path) -> Iterator[dg.DagsterInstance]:
    home = tmp_path / "dagster"
    write_instance(home, max_concurrent_jobs=5)
    initialize_pools(home, [CLICKHOUSE_POOL])
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.run_launcher, PreloadedRunLauncher)
        try:
            yield instance
        finally:
            # A run a failed test could not stop must not outlive it.
            for run in instance.get_runs():
                worker = run_worker(run)
                if worker is not None and worker_running(worker):
                    os.kill(worker.pid, signal.SIGKILL)


def _launch(instance: dg.DagsterInstance, job: dg.JobDefinition) -> str:
    """Launch a run of `job` as the daemon launches a queued run; its run id."""
    recon = dg.reconstructable(job)
    run = instance.create_run_for_job(job, job_code_origin=recon.get_python_origin())
    instance.run_launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
    return run.run_id


def _events(instance: dg.DagsterInstance, run_id: str) -> list[dg.DagsterEvent]:
    return [e.dagster_event for e in instance.all_logs(run_id) if e.dagster_event is not None]


def _until(condition: Callable[[], bool], what: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def _terminate(instance: dg.DagsterInstance, run_id: str) -> float:
    """Terminate the run; seconds from the request until the run is CANCELED (at most 30)."""
    asked = time.monotonic()
    assert instance.run_launcher.terminate(run_id) is True
    deadline = asked + 30
    while (status := instance.get_run_by_id(run_id).status) != dg.DagsterRunStatus.CANCELED:
        assert status in (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING), status
        assert time.monotonic() < deadline, "the run is still not CANCELED after 30 s"
        time.sleep(0.02)
    return time.monotonic() - asked


def _starts_after_the_request(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """Steps that started (or started again) after the run's termination was requested."""
    events = _events(instance, run_id)
    asked = next(
        i for i, e in enumerate(events) if e.event_type == dg.DagsterEventType.RUN_CANCELING
    )
    return [f"{e.event_type_value} {e.step_key}" for e in events[asked:] if e.event_type in STARTS]


def _worker_ends(instance: dg.DagsterInstance, run_id: str) -> None:
    worker = run_worker(instance.get_run_by_id(run_id))
    assert worker is not None
    _until(lambda: start_ticks(worker.pid) != worker.ticks, "the worker has exited", 30)


def _slot_held_by_another_run(instance: dg.DagsterInstance) -> None:
    holder = instance.event_log_storage.claim_concurrency_slot(
        CLICKHOUSE_POOL, "another-run", "its-step"
    )
    assert holder.is_claimed


def _pending_claims(instance: dg.DagsterInstance) -> int:
    return instance.event_log_storage.get_concurrency_info(CLICKHOUSE_POOL).pending_step_count


def test_a_run_waiting_for_the_slot_is_canceled_at_once_and_its_step_never_starts(
    local_instance,
):
    _slot_held_by_another_run(local_instance)
    run_id = _launch(local_instance, pool_jobs.waits_for_the_slot)
    _until(lambda: _pending_claims(local_instance) == 1, "the run's step waits for the slot")
    # Waiting a while, with its claim asked again several times.
    time.sleep(1.0)

    latency = _terminate(local_instance, run_id)

    assert latency < LATENCY_S, f"CANCELED {latency:.2f} s after the request"
    assert _starts_after_the_request(local_instance, run_id) == []
    assert not any(e.event_type in STARTS for e in _events(local_instance, run_id))
    # Its claim is withdrawn: the next run in line gets the slot when it is freed.
    _until(lambda: _pending_claims(local_instance) == 0, "the claim is withdrawn", 5)
    _worker_ends(local_instance, run_id)


def test_a_run_in_its_31_s_retry_backoff_is_canceled_at_once_without_another_attempt(
    local_instance,
):
    run_id = _launch(local_instance, pool_jobs.keeps_retrying)

    def retries() -> int:
        return sum(
            e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY
            for e in _events(local_instance, run_id)
        )

    # The attempt failed: its retry is 31 s away.
    _until(lambda: retries() == 1, "the step waits for its retry", 60)
    [last] = [
        e
        for e in _events(local_instance, run_id)
        if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY
    ]
    assert last.step_retry_data.seconds_to_wait == LONGEST_BACKOFF_S
    time.sleep(1.0)

    latency = _terminate(local_instance, run_id)

    assert latency < LATENCY_S, f"CANCELED {latency:.2f} s after the request"
    assert _starts_after_the_request(local_instance, run_id) == []
    # The slot the attempts took in turn is free: no attempt holds it.
    assert _pending_claims(local_instance) == 0
    _worker_ends(local_instance, run_id)


def test_a_run_terminated_mid_step_stops_that_step_and_starts_no_other(local_instance):
    run_id = _launch(local_instance, pool_jobs.sharded)

    def shard_started() -> bool:
        return any(
            e.event_type == dg.DagsterEventType.STEP_START and e.step_key.startswith("write_shard")
            for e in _events(local_instance, run_id)
        )

    _until(shard_started, "a shard is being written")
    time.sleep(10 * pool_jobs.BATCH_S)  # a few batches into it

    latency = _terminate(local_instance, run_id)

    assert latency < LATENCY_S, f"CANCELED {latency:.2f} s after the request"
    assert _starts_after_the_request(local_instance, run_id) == []
    events = _events(local_instance, run_id)
    started = [e.step_key for e in events if e.event_type == dg.DagsterEventType.STEP_START]
    failed = [e.step_key for e in events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    # The shard being written stopped, was not retried, and the other shard never started.
    assert len(failed) == 1 and failed[0].startswith("write_shard")
    assert started == ["plan_shards", failed[0]]
    assert dg.DagsterEventType.STEP_UP_FOR_RETRY not in {e.event_type for e in events}
    # The slot the stopped shard held is free again.
    assert (
        local_instance.event_log_storage.get_concurrency_info(CLICKHOUSE_POOL).active_slot_count
        == 0
    )
    _worker_ends(local_instance, run_id)


@pytest.mark.parametrize("after_s", [0.0, 0.3], ids=["at launch", "while the worker loads"])
def test_a_run_terminated_as_it_starts_is_canceled_at_once(local_instance, after_s):
    # The worker is still loading: a signal would end it before it handles signals, and a worker
    # that reads the run CANCELING leaves it alone. Either way Dagster would not end the run.
    _slot_held_by_another_run(local_instance)
    run_id = _launch(local_instance, pool_jobs.waits_for_the_slot)
    time.sleep(after_s)

    latency = _terminate(local_instance, run_id)

    assert latency < LATENCY_S, f"CANCELED {latency:.2f} s after the request"
    assert not any(e.event_type in STARTS for e in _events(local_instance, run_id))
    _worker_ends(local_instance, run_id)


def test_a_live_worker_is_terminated_after_the_clock_was_stepped(local_instance, monkeypatch):
    _slot_held_by_another_run(local_instance)
    booted = workers.boot_time()
    assert booted is not None
    for step_s in (3600.0, -3600.0):
        run_id = _launch(local_instance, pool_jobs.waits_for_the_slot)
        _until(lambda: _pending_claims(local_instance) == 1, "the run's step waits for the slot")
        worker = run_worker(local_instance.get_run_by_id(run_id))
        assert worker is not None and worker.started is not None

        # The wall clock is stepped an hour, forward then back: the kernel's boot time, derived
        # from it, moves with it, and so does every start time computed from it.
        monkeypatch.setattr(workers, "boot_time", lambda step_s=step_s: booted + step_s)
        moved = workers.process_start(worker.pid)
        assert moved is not None and abs(moved - worker.started - step_s) < 1.0

        latency = _terminate(local_instance, run_id)

        assert latency < LATENCY_S, f"CANCELED {latency:.2f} s after the request"
        messages = [e.message for e in local_instance.all_logs(run_id)]
        assert not any("no longer running" in m for m in messages)
        _worker_ends(local_instance, run_id)
        monkeypatch.undo()


def test_the_worker_tag_names_the_process_by_its_start_ticks(local_instance):
    run_id = _launch(local_instance, pool_jobs.waits_for_the_slot)
    tag = local_instance.get_run_by_id(run_id).tags[WORKER_TAG]
    pid, started, ticks = tag.split("@")
    worker = run_worker(local_instance.get_run_by_id(run_id))
    assert worker == workers.Worker(int(pid), float(started), int(ticks))
    _until(lambda: local_instance.get_run_by_id(run_id).is_finished, "the run finishes")
    assert local_instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS
