"""The fence around Dagster's private modules: each symbol it touches still has the shape we use.

`nova_assets/internals/` is the only place the package names a `dagster._` module. One short
contract test per symbol checks that it exists with the signature and attributes the fence relies
on, so a Dagster upgrade that moves one fails here, naming it, rather than somewhere deep in a run.
The pool-wait and termination fixes, applied whenever the code location loads, are also shown to
switch themselves off with one warning, not an error, when their private class is gone or has
changed.
"""

import importlib
import inspect
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest

from nova_assets.internals import pool_wait, run_launcher, slot_storage
from nova_assets.local.instance import write_instance
from nova_assets_tests.layouts import write_per_run_instance

ROOT = Path(__file__).parents[1]


@dg.op
def say_hello() -> None:
    pass


@dg.job
def hello() -> None:
    say_hello()


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


# --- pool_wait: InstanceConcurrencyContext -------------------------------------------------------


def test_instance_concurrency_context_has_the_method_and_the_pending_claims(instance):
    context_class = pool_wait.concurrency_context_class()
    assert _parameters(context_class.__init__) == ["self", "instance", "dagster_run"]
    run = instance.add_run(dg.DagsterRun(job_name="a_job"))
    context = context_class(instance, run)
    # What the replacement reads: the steps waiting for a slot and when each is due again.
    assert context._pending_claims == set()  # noqa: SLF001
    assert dict(context._pending_timeouts) == {}  # noqa: SLF001
    # The method the fix replaces (once, when the code location loads), under its name.
    assert pool_wait.fix_pool_wait() is True
    assert context_class.interval_to_next_pending_claim_check is pool_wait.interval_to_next_claim
    assert context.interval_to_next_pending_claim_check() == 0.0


def test_the_pool_wait_fix_is_off_with_one_warning_when_the_class_moved(monkeypatch, caplog):
    def moved() -> type:
        raise ImportError("cannot import name 'InstanceConcurrencyContext'")

    monkeypatch.setattr(pool_wait, "concurrency_context_class", moved)
    with caplog.at_level(logging.WARNING):
        assert pool_wait.fix_pool_wait() is False
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "pool-wait fix is off" in warning.getMessage()


def test_the_pool_wait_fix_is_off_with_one_warning_when_the_method_is_gone(monkeypatch, caplog):
    monkeypatch.setattr(pool_wait, "concurrency_context_class", lambda: type("Renamed", (), {}))
    with caplog.at_level(logging.WARNING):
        assert pool_wait.fix_pool_wait() is False
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "interval_to_next_pending_claim_check" in warning.getMessage()


def test_the_pool_wait_fix_replaces_a_spinning_method_on_a_stand_in(monkeypatch):
    class StandIn:
        def interval_to_next_pending_claim_check(self) -> float:
            return 0.0

    monkeypatch.setattr(pool_wait, "concurrency_context_class", lambda: StandIn)
    assert pool_wait.fix_pool_wait() is True
    assert StandIn.interval_to_next_pending_claim_check is pool_wait.interval_to_next_claim


def _loads_without(module: str, cls: str, warning: str) -> None:
    """In a fresh process whose Dagster lacks `module.cls`, the resources import, warning once."""
    code = (
        f"import {module} as module\n"
        f"del module.{cls}\n"
        "import nova_assets.core.resources\n"
        "print('loaded')\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip() == "loaded"
    assert completed.stderr.count(warning) == 1, completed.stderr[-3000:]


def test_the_modules_applying_the_fix_load_when_the_class_is_gone():
    _loads_without(
        "dagster._core.execution.plan.instance_concurrency_context",
        "InstanceConcurrencyContext",
        "pool-wait fix is off",
    )


# --- pool_wait: ActiveExecution (the termination fix) ---------------------------------------------


def _active_execution(instance: dg.DagsterInstance):
    """The in-process executor's plan state for a run of `hello`, entered as the executor does."""
    from dagster._core.execution.api import create_execution_plan
    from dagster._core.execution.retries import RetryMode

    run = instance.create_run_for_job(hello)
    context = pool_wait.concurrency_context_class()(instance, run)
    execution = pool_wait.active_execution_class()(
        create_execution_plan(hello),
        retry_mode=RetryMode.ENABLED,
        instance_concurrency_context=context,
    )
    execution.__enter__()  # left open: these plans are never completed
    return run, context, execution


def test_active_execution_has_the_loop_methods_and_the_run_the_fix_reads(instance):
    execution_class = pool_wait.active_execution_class()
    assert pool_wait.stop_on_termination() is True
    # The two methods amended (their signatures are the originals'), and where the run is found.
    assert _parameters(execution_class.sleep_til_ready) == ["self"]
    assert _parameters(execution_class.get_next_step) == ["self"]
    assert "instance_concurrency_context" in _parameters(execution_class.__init__)
    assert _parameters(pool_wait.concurrency_context_class().free_step) == ["self", "step_key"]
    run, context, execution = _active_execution(instance)
    assert execution._instance_concurrency_context is context  # noqa: SLF001
    assert context._instance is instance  # noqa: SLF001
    assert context._run_id == run.run_id  # noqa: SLF001
    assert pool_wait.termination_requested(execution) is False
    assert execution.get_next_step().key == "say_hello"


def test_no_step_is_picked_once_the_runs_termination_was_requested(instance):
    run, _, execution = _active_execution(instance)
    instance.report_run_canceling(run)
    assert pool_wait.termination_requested(execution) is True
    with pytest.raises(dg.DagsterExecutionInterruptedError, match="termination was requested"):
        execution.get_next_step()


def test_an_interrupt_ends_the_wait_for_a_retry_at_once(instance):
    from dagster._utils.interrupts import capture_interrupts

    # Signals reach the main thread only, where a run's worker executes its run.
    assert threading.current_thread() is threading.main_thread()
    _, _, execution = _active_execution(instance)
    step = execution.get_next_step()
    execution.mark_up_for_retry(step.key, time.time() + 30)
    assert execution.get_next_step() is None
    assert execution.sleep_interval() > 25
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    # As in the worker: Dagster records a signal while the run executes.
    with capture_interrupts():
        timer.start()
        with pytest.raises(dg.DagsterExecutionInterruptedError):
            execution.sleep_til_ready()
    assert time.monotonic() - started < 2.0


def test_the_termination_fix_is_off_with_one_warning_when_the_class_moved(monkeypatch, caplog):
    def moved() -> type:
        raise ImportError("cannot import name 'ActiveExecution'")

    monkeypatch.setattr(pool_wait, "active_execution_class", moved)
    with caplog.at_level(logging.WARNING):
        assert pool_wait.stop_on_termination() is False
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "termination fix is off" in warning.getMessage()


def test_the_termination_fix_wraps_each_method_once_on_a_stand_in(monkeypatch):
    class StandIn:
        def sleep_til_ready(self) -> None:
            pass

        def get_next_step(self) -> None:
            return None

    originals = {name: vars(StandIn)[name] for name in ("sleep_til_ready", "get_next_step")}
    monkeypatch.setattr(pool_wait, "active_execution_class", lambda: StandIn)
    assert pool_wait.stop_on_termination() is True
    assert pool_wait.stop_on_termination() is True  # the code location loaded again
    for name, original in originals.items():
        assert vars(StandIn)[name].__wrapped__ is original


def test_the_modules_applying_the_termination_fix_load_when_the_class_is_gone():
    _loads_without(
        "dagster._core.execution.plan.active", "ActiveExecution", "termination fix is off"
    )


# --- slot_storage: ConsolidatedSqliteEventLogStorage, SqliteEventLogStorage, the polling watcher --


def _has_the_slot_methods(base: type) -> None:
    assert _parameters(base.__init__) == ["self", "base_dir", "inst_data"]
    assert _parameters(base.claim_concurrency_slot) == [
        "self",
        "concurrency_key",
        "run_id",
        "step_key",
        "priority",
    ]
    assert _parameters(base.free_concurrency_slot_for_step) == ["self", "run_id", "step_key"]
    assert _parameters(base.free_concurrency_slots_for_run) == ["self", "run_id"]


def _claims_a_slot(storage) -> None:
    storage.initialize_concurrency_limit_to_default("a_pool")
    status = storage.claim_concurrency_slot("a_pool", "a-run", "a-step")
    # The claim status the subclass reads and amends.
    assert status.is_claimed
    assert hasattr(status, "enqueued_timestamp")
    assert status.with_sleep_interval(0.2).sleep_interval == 0.2
    # The lock file sits in the storage's own folder (`_base_dir`).
    assert (Path(storage._base_dir) / slot_storage.LOCK_FILE).is_file()  # noqa: SLF001


def test_the_local_event_log_is_one_database_that_can_give_pages_back(tmp_path):
    base = slot_storage.ConsolidatedSqliteEventLogStorage
    _has_the_slot_methods(base)
    assert _parameters(base._init_db) == ["self"]  # noqa: SLF001
    assert _parameters(base.get_db_path) == ["self"]
    assert _parameters(base.watch) == ["self", "run_id", "cursor", "callback"]
    assert _parameters(base.end_watch) == ["self", "run_id", "handler"]
    assert _parameters(base.dispose) == ["self"]

    home = tmp_path / "dagster"
    write_instance(home, max_concurrent_jobs=5)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        storage = instance.event_log_storage
        assert isinstance(storage, slot_storage.LocalEventLogStorage)
        database = home.resolve() / "history" / "events" / "event_log.db"
        assert storage.get_db_path() == str(database)
        _claims_a_slot(storage)
        run = instance.add_run(dg.DagsterRun(job_name="a_job"))
        for _ in range(400):
            instance.report_engine_event("x" * 2000, run)
        grown = database.stat().st_size
        instance.delete_run(run.run_id)
        freed = storage.reclaim_space()
    with sqlite3.connect(database) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone() == (2,)  # INCREMENTAL
    assert freed > 700_000
    assert database.stat().st_size < grown - 700_000


def test_the_polling_watcher_hands_a_run_s_new_events_to_the_ui(tmp_path):
    watcher = slot_storage.SqlPollingEventWatcher
    assert _parameters(watcher.__init__) == ["self", "event_log_storage"]
    assert _parameters(watcher.watch_run) == ["self", "run_id", "cursor", "callback"]
    assert _parameters(watcher.unwatch_run) == ["self", "run_id", "handler"]
    assert _parameters(watcher.close) == ["self"]

    write_instance(tmp_path, max_concurrent_jobs=5)
    seen: list[str] = []
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        run = instance.add_run(dg.DagsterRun(job_name="a_job"))

        def callback(entry: dg.EventLogEntry, _cursor: str) -> None:
            seen.append(entry.message)

        # Another process reading keeps the database's changes in its WAL file: the file Dagster's
        # own watcher watches is not modified, and the UI would not see the event.
        reader = sqlite3.connect(tmp_path / "history" / "events" / "event_log.db")
        reader.execute("SELECT count(*) FROM event_logs").fetchall()
        instance.watch_event_logs(run.run_id, None, callback)
        instance.report_engine_event("first", run)
        deadline = time.monotonic() + 10
        while "first" not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
        instance.end_watch_event_logs(run.run_id, callback)
        reader.close()
    assert "first" in seen


def test_a_home_with_a_database_per_run_keeps_it_with_the_slot_locks(tmp_path):
    base = slot_storage.SqliteEventLogStorage
    _has_the_slot_methods(base)
    home = write_per_run_instance(tmp_path / "dagster")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        storage = instance.event_log_storage
        assert isinstance(storage, slot_storage.SlotLockedSqliteEventLogStorage)
        assert Path(storage._base_dir) == home.resolve() / "history" / "runs"  # noqa: SLF001
        _claims_a_slot(storage)


# --- run_launcher: LaunchRunContext, ExecuteRunArgs, api_cli, _run_ids, the preloaded modules -----


def test_launch_run_context_carries_the_run():
    run = dg.DagsterRun(job_name="a_job")
    context = run_launcher.LaunchRunContext(dagster_run=run, workspace=None)
    assert context.dagster_run is run


def test_execute_run_args_round_trip_as_the_execute_run_command(instance):
    origin = dg.reconstructable(hello).get_python_origin()
    run = instance.create_run_for_job(hello, job_code_origin=origin)
    command, serialized = run_launcher.execute_run_command(run, instance)
    assert command == "execute_run"
    args = dg.deserialize_value(serialized, run_launcher.ExecuteRunArgs)
    assert args.run_id == run.run_id
    assert args.job_origin == run.job_code_origin
    assert args.instance_ref == instance.get_ref()


def test_the_api_cli_has_the_execute_run_command(capsys):
    run_launcher.run_dagster_api(["execute_run", "--help"])
    assert "dagster api execute_run" in capsys.readouterr().out


def test_the_default_run_launcher_keeps_the_runs_it_waits_for():
    launcher = dg.DefaultRunLauncher()
    run_launcher.remember_launched(launcher, "a-run")
    assert launcher._run_ids == {"a-run"}  # noqa: SLF001
    assert "timeout" in _parameters(launcher.join)


def test_the_run_execution_modules_the_fork_server_preloads_exist():
    for name in run_launcher.RUN_EXECUTION_MODULES:
        importlib.import_module(name)
