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
  (a shell's background command). The worker's pid and start time are a run tag (`nova/worker`,
  `nova_assets.core.workers`), so any process of the instance (the webserver's Terminate button)
  can terminate it, and a pid reused by another process is left alone.
- A run of a code location in another Python environment, or one without a Python origin, is
  launched by Dagster's default launcher.
- Workers belong to `dagster dev`'s process group, as the code server's do: stopping or killing it
  as a whole stops them too (the `orphaned_runs` sensor fails the runs a hard kill leaves).

What it takes from Dagster's private modules comes through `nova_assets.internals.run_launcher`.
"""

import compileall
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
from nova_assets.core.workers import WORKER_TAG, Worker, process_start, run_worker, worker_alive
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
        started = process_start(pid) if pid else None
        self._instance.add_run_tags(run.run_id, {WORKER_TAG: Worker(pid, started).tag_value})
        remember_launched(self, run.run_id)

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id) if self.has_instance else None
        if run is None or WORKER_TAG not in run.tags:
            return super().terminate(run_id)
        if run.is_finished:
            return False
        self._instance.report_run_canceling(run)
        # Only a process of its own that started when the tag says: never a pid a later process
        # took over, nor one whose start this host could not tell.
        worker = run_worker(run)
        try:
            if (
                worker is None
                or worker.started is None
                or worker_alive(worker.pid, worker.started, slack_s=0.0) is not True
            ):
                raise ProcessLookupError(worker)
            os.kill(worker.pid, signal.SIGINT)
        except ProcessLookupError:
            self._instance.report_engine_event(
                f"The run's worker ({run.tags[WORKER_TAG]!r}) is no longer running; nothing to "
                "interrupt.",
                run,
                cls=self.__class__,
            )
            return False
        return True
