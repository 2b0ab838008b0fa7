"""The local run launcher: each run's worker is forked from a process that has imported Dagster.

Dagster's default launcher asks the code server for a worker, and the code server starts each one
as a new interpreter (multiprocessing's `spawn`) that imports Dagster and the code location before
the run's first event: two to four seconds of a 2-core machine for an every-minute step that
itself takes one (docs/design.md §5). This launcher keeps, in the process that launches runs (the
daemon, under `dagster dev`), a multiprocessing fork server that has imported Dagster and the
clients' libraries once. Each run's worker is a fork of it that runs `dagster api execute_run` for
the run, the command Dagster's Docker and Kubernetes launchers start, so the run's events, its
"Started process for run (pid: N)" line, its interrupts and its exit are those of that command.
The worker imports the code location itself, so a code change reaches the next run.

- The embedded engine (chdb) is not imported ahead: its import starts ClickHouse's thread pools
  (numpy and pyarrow, which it imports, start threads too), and a fork keeps only the thread that
  forked. The worker imports it first thing, before its run asks for the engine's one slot, so
  the slot is held for the work alone.
- The worker writes the code location's bytecode where imports write none (PYTHONDONTWRITEBYTECODE),
  so the next workers do not compile its modules again.
- Termination sends the worker SIGINT, as the code server's termination does; the command
  installs its own handler, so it works even where the daemon was started with SIGINT ignored
  (a shell's background command). The worker's pid, start time and start in clock ticks since
  boot are a run tag (`nova/worker`, `nova_assets.core.workers`), so any process of the instance
  (the webserver's Terminate button) can terminate it. The worker is recognised by its start
  ticks, which a stepped wall clock does not move: a pid reused by another process is left
  alone, and a live worker is never taken for gone. The run's executor stops within a moment
  wherever the run is, and starts no step after the request (`nova_assets.internals.pool_wait`);
  a worker that has not begun executing its run (still loading) is killed outright, and
  Terminate reports the run CANCELED itself.
- A run of a code location in another Python environment, or one without a Python origin, is
  launched by Dagster's default launcher.
- Workers belong to `dagster dev`'s process group, as the code server's do: stopping or killing it
  as a whole stops them too (the `orphaned_runs` sensor fails the runs a hard kill leaves).

What it takes from Dagster's private modules comes through `nova_assets.internals.run_launcher`.
"""

import compileall
import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import dagster as dg

from nova_assets.core.urls import is_embedded
from nova_assets.core.workers import WORKER_TAG, Worker, run_worker, worker_running
from nova_assets.internals.run_launcher import (
    RUN_EXECUTION_MODULES,
    LaunchRunContext,
    execute_run_command,
    remember_launched,
    run_dagster_api,
)

PRELOAD = (
    "dagster",
    *RUN_EXECUTION_MODULES,
    "upath",
    "clickhouse_connect",
    "redis",
    "prometheus_client",
)
"""What the fork server imports once for every worker: Dagster's run execution and the clients."""


def _location_sources(pointer: Any) -> tuple[Path, bool] | None:
    """The code location's sources: its top package's folder (every level), or its file's folder."""
    module = getattr(pointer, "module", None)
    if isinstance(module, str) and module:
        try:
            spec = find_spec(module.partition(".")[0])
        except (ImportError, ValueError):
            return None
        folders = list(spec.submodule_search_locations or []) if spec else []
        return (Path(folders[0]), True) if folders else None
    python_file = getattr(pointer, "python_file", None)
    return (Path(python_file).parent, False) if isinstance(python_file, str) else None


BEFORE_START = (dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING)
"""A run in these has not been taken by its worker's `execute_run` yet."""
STOP_WAIT_S = 5.0
"""How long Terminate waits, at most, for a killed worker to be gone before it reports the run."""

SETTLED_S = 2.0
"""A source changed this recently is left to the import: its bytecode is not written yet."""


def write_bytecode(folder: Path, recursive: bool) -> None:
    """Write the bytecode of the location's sources that lack it or whose bytecode is stale.

    Where imports write no bytecode (PYTHONDONTWRITEBYTECODE, usual in container images), every
    worker would compile the location's modules again: a few tenths of a CPU-second per run.
    Written here once, for this worker and the next. A file changed in the last two seconds is
    skipped: bytecode records its source's modification time to the second (and its size), so a
    same-sized edit within that second could pass for the compiled one; the import compiles it
    from source instead, so each run still runs the code as it is at its launch. A folder this
    process cannot write to (an installed package) is left alone.
    """
    if not os.access(folder, os.W_OK):
        return
    settled = time.time() - SETTLED_S
    pattern = "**/*.py" if recursive else "*.py"
    for source in folder.glob(pattern):
        try:
            if source.stat().st_mtime < settled:
                compileall.compile_file(source, quiet=2)
        except OSError:
            continue


def _execute_run(command: list[str], sources: tuple[Path, bool] | None = None) -> None:
    """The worker: `dagster api execute_run <args>`, in the forked process."""
    if sources is not None:
        write_bytecode(*sources)

    if is_embedded(os.environ.get("CLICKHOUSE_URL") or "chdb:") and find_spec("chdb"):
        import_module("chdb")

    run_dagster_api(command)


class PreloadedRunLauncher(dg.DefaultRunLauncher):
    """Launches each run in a worker forked from a process that has already imported Dagster."""

    def __init__(self, inst_data: Any = None) -> None:
        super().__init__(inst_data=inst_data)
        self._start_lock = threading.Lock()
        self._context: multiprocessing.context.BaseContext | None = None

    def _fork_server(self) -> multiprocessing.context.BaseContext:
        if self._context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(list(PRELOAD))
            self._context = context
        return self._context

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        origin = run.job_code_origin
        if origin is None or origin.executable_path != sys.executable:
            super().launch_run(context)
            return
        command = execute_run_command(run, self._instance)
        with self._start_lock:
            worker = self._fork_server().Process(
                target=_execute_run,
                args=(command, _location_sources(origin.repository_origin.code_pointer)),
                name=f"dagster-run-{run.run_id}",
            )
            worker.start()
        pid = worker.pid
        tagged = Worker.of_process(pid) if pid else Worker(0, None)
        self._instance.add_run_tags(run.run_id, {WORKER_TAG: tagged.tag_value})
        remember_launched(self, run.run_id)

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id) if self.has_instance else None
        if run is None or WORKER_TAG not in run.tags:
            return super().terminate(run_id)
        if run.is_finished:
            return False
        self._instance.report_run_canceling(run)
        # Only the process the tag names, recognised by its start ticks: never a pid a later
        # process took over, nor one whose start this host could not tell.
        worker = run_worker(run)
        if worker is None or worker_running(worker) is not True:
            self._instance.report_engine_event(
                f"The run's worker ({run.tags[WORKER_TAG]!r}) is no longer running; nothing to "
                "interrupt.",
                run,
                cls=self.__class__,
            )
            if run.status in BEFORE_START:
                self._report_canceled(run.run_id)
            return False
        if run.status in BEFORE_START:
            record = self._instance.get_run_record_by_id(run_id)
            if record is None or record.dagster_run.is_finished:
                return False
            started = record.dagster_run.status == dg.DagsterRunStatus.STARTED
            if not started and record.start_time is None:
                return self._stop_unstarted(run, worker)
            if started:
                # Its worker read the run just before the request: its start overwrote it.
                self._instance.report_run_canceling(record.dagster_run)
        try:
            os.kill(worker.pid, signal.SIGINT)
        except ProcessLookupError:
            return False
        return True

    def _stop_unstarted(self, run: dg.DagsterRun, worker: Worker) -> bool:
        """Stop the worker of a run it has not begun executing, and report the run CANCELED.

        A worker forked a moment ago is still loading the code location: SIGINT would end it
        before it handles signals, and a worker that reads the run CANCELING leaves it as a
        duplicate's (Dagster's `execute_run` takes only a run not yet started). Nothing would
        then end the run but run monitoring's cancel timeout, and on a busy host the worker may
        load for seconds. It has executed nothing, claimed no slot and written nothing but its
        own bytecode (written whole or not at all), so it is killed at once.
        """
        with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
            os.kill(worker.pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_WAIT_S
        while worker_running(worker) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._report_canceled(run.run_id, "its worker was stopped before it executed the run")
        return True

    def _report_canceled(self, run_id: str, why: str = "its worker had not executed it") -> None:
        current = self._instance.get_run_by_id(run_id)
        if current is not None and not current.is_finished:
            self._instance.report_run_canceled(current, message=f"Run canceled: {why}.")
