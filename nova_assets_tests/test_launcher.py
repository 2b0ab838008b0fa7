"""The local run launcher: workers forked from a preloaded process, as `dagster api execute_run`.

Runs of a small code location of the test's own are launched through the local instance's
launcher, as the daemon launches a queued run: each runs the code as it is on disk at launch, logs
its worker's pid, start time and start ticks, and is interrupted to CANCELED by a termination
asked from another process (the webserver's Terminate button); a pid the worker no longer holds
is never signalled.
"""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.reconstruct import ReconstructableJob
from dagster._core.errors import DagsterInvariantViolationError
from dagster._core.launcher import LaunchRunContext

from nova_assets.core.workers import WORKER_TAG, Worker, process_start, worker_pid
from nova_assets.local.instance import write_instance
from nova_assets.local.launcher import PreloadedRunLauncher, write_bytecode

LOCATION = """
import time
from pathlib import Path

import dagster as dg

VERSION = "{version}"


@dg.op
def write_version():
    Path(__file__).with_name("version.txt").write_text(VERSION)


@dg.job(executor_def=dg.in_process_executor)
def versioned():
    write_version()


@dg.op
def wait():
    while True:
        time.sleep(0.1)


@dg.job(executor_def=dg.in_process_executor)
def endless():
    wait()
"""


@pytest.fixture
def local_instance(tmp_path):
    home = tmp_path / "dagster"
    write_instance(home, max_concurrent_jobs=5)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.run_launcher, PreloadedRunLauncher)
        yield instance


def _location(tmp_path: Path, version: str) -> Path:
    path = tmp_path / "location.py"
    path.write_text(textwrap.dedent(LOCATION.format(version=version)))
    return path


def _create(instance: dg.DagsterInstance, path: Path, job: str, **changes) -> dg.DagsterRun:
    recon = ReconstructableJob.for_file(str(path), job)
    origin = recon.get_python_origin()
    if changes:
        origin = origin._replace(repository_origin=origin.repository_origin._replace(**changes))
    return instance.create_run_for_job(recon.get_definition(), job_code_origin=origin)


def _launch(instance: dg.DagsterInstance, path: Path, job: str) -> dg.DagsterRun:
    run = _create(instance, path, job)
    instance.run_launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
    return instance.get_run_by_id(run.run_id)


def _wait(instance: dg.DagsterInstance, run_id: str, done, timeout_s: float = 60) -> dg.DagsterRun:
    deadline = time.monotonic() + timeout_s
    while True:
        run = instance.get_run_by_id(run_id)
        if done(run):
            return run
        assert time.monotonic() < deadline, f"run {run_id} still {run.status}"
        time.sleep(0.1)


def test_each_run_executes_the_code_as_it_is_at_launch_and_logs_its_worker(
    local_instance, tmp_path
):
    for version in ("one", "two"):
        path = _location(tmp_path, version)
        run = _launch(local_instance, path, "versioned")
        pid, started, ticks = run.tags[WORKER_TAG].split("@")
        run = _wait(local_instance, run.run_id, lambda r: r.is_finished)
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert (tmp_path / "version.txt").read_text() == version
        assert worker_pid(local_instance, run.run_id) == int(pid)
        assert float(started) > 0 and int(ticks) > 0


LAUNCH_FROM_A_PROCESS = """
import os, signal, sys
import dagster as dg
from dagster._core.definitions.reconstruct import ReconstructableJob
from dagster._core.launcher import LaunchRunContext

if sys.argv[5:] == ["ignore-sigint"]:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
recon = ReconstructableJob.for_file(sys.argv[2], sys.argv[4])
with dg.DagsterInstance.from_config(sys.argv[1]) as instance:
    run = instance.create_run_for_job(
        recon.get_definition(), job_code_origin=recon.get_python_origin()
    )
    instance.run_launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
    open(sys.argv[3], "w").write(run.run_id)
# Gone at once: at exit, multiprocessing would wait for the worker it started (which may not end).
os._exit(0)
"""


def _launch_from_a_process(
    instance: dg.DagsterInstance, location: Path, job: str, *options: str, **env: str
) -> str:
    """Launch a run of `job` from a process of its own; its run id."""
    # The worker it forks keeps the launching process's output open: the run id goes to a file.
    launched = location.with_name("run_id")
    arguments = [instance.root_directory, str(location), str(launched), job, *options]
    subprocess.run(
        [sys.executable, "-c", LAUNCH_FROM_A_PROCESS, *arguments],
        stdout=subprocess.DEVNULL,
        check=True,
        env=os.environ | env,
    )
    return launched.read_text()


@pytest.mark.parametrize("launcher_sigint", ["handled", "ignored"])
def test_a_termination_from_another_process_interrupts_the_worker_and_cancels_the_run(
    local_instance, tmp_path, launcher_sigint
):
    location = _location(tmp_path, "one")
    if launcher_sigint == "handled":
        run_id = _launch(local_instance, location, "endless").run_id
    else:
        # Launched by a process that ignores SIGINT, as a daemon a shell started in the background.
        run_id = _launch_from_a_process(local_instance, location, "endless", "ignore-sigint")

    def step_started(r: dg.DagsterRun) -> bool:
        return any(
            e.dagster_event and e.dagster_event.event_type == dg.DagsterEventType.STEP_START
            for e in local_instance.all_logs(r.run_id)
        )

    run = _wait(local_instance, run_id, step_started)
    pid = int(run.tags[WORKER_TAG].partition("@")[0])
    terminated = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, dagster as dg\n"
            "with dg.DagsterInstance.from_config(sys.argv[1]) as instance:\n"
            "    print(instance.run_launcher.terminate(sys.argv[2]))",
            local_instance.root_directory,
            run_id,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert terminated.stdout.strip() == "True", terminated.stderr
    run = _wait(local_instance, run_id, lambda r: r.is_finished)
    assert run.status == dg.DagsterRunStatus.CANCELED
    deadline = time.monotonic() + 30
    while process_start(pid) is not None:
        assert time.monotonic() < deadline, f"worker {pid} still runs"
        time.sleep(0.1)


def test_a_worker_leaves_the_locations_bytecode_where_imports_write_none(local_instance, tmp_path):
    # As in a container image that sets PYTHONDONTWRITEBYTECODE: without the launcher writing it,
    # every worker would compile the location's modules again.
    location = _location(tmp_path, "one")
    compiled = tmp_path / "__pycache__" / f"location.{sys.implementation.cache_tag}.pyc"

    def run_once(version: str) -> None:
        run_id = _launch_from_a_process(
            local_instance, location, "versioned", PYTHONDONTWRITEBYTECODE="1"
        )
        run = _wait(local_instance, run_id, lambda r: r.is_finished)
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert (tmp_path / "version.txt").read_text() == version

    # Saved a while ago: written by the worker, and the next worker loads it.
    settled = time.time() - 10
    os.utime(location, (settled, settled))
    run_once("one")
    assert compiled.exists()
    # Edited (same size) and saved a while ago again: compiled anew, and the run runs the edit.
    location.write_text(location.read_text().replace('"one"', '"two"'))
    os.utime(location, (settled + 1, settled + 1))
    run_once("two")


def test_a_source_saved_a_moment_ago_is_left_to_the_import(tmp_path):
    # Bytecode records its source's modification time to the second: a same-sized edit within
    # that second could pass for the compiled file, so a file that recent is not compiled ahead.
    location = _location(tmp_path, "one")
    compiled = tmp_path / "__pycache__" / f"location.{sys.implementation.cache_tag}.pyc"
    write_bytecode(tmp_path, recursive=False)
    assert not compiled.exists()
    settled = time.time() - 10
    os.utime(location, (settled, settled))
    write_bytecode(tmp_path, recursive=False)
    assert compiled.exists()


@pytest.mark.parametrize("tagged", ["start ticks", "start time only"])
def test_a_pid_the_worker_no_longer_holds_is_not_signalled(local_instance, tmp_path, tagged):
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = _create(local_instance, _location(tmp_path, "one"), "endless")
        # The run's worker had this pid once, but started a minute before the process now on it
        # (a tag written before start ticks were recorded has the start time alone).
        worker = Worker.of_process(stranger.pid)
        started = worker.started - 60
        ticks = worker.ticks - 60 * os.sysconf("SC_CLK_TCK")
        tag = f"{stranger.pid}@{started}" + (f"@{ticks}" if tagged == "start ticks" else "")
        local_instance.add_run_tags(run.run_id, {WORKER_TAG: tag})
        assert local_instance.run_launcher.terminate(run.run_id) is False
        with pytest.raises(subprocess.TimeoutExpired):
            stranger.wait(timeout=1)
        messages = [entry.message for entry in local_instance.all_logs(run.run_id)]
        assert any("is no longer running; nothing to interrupt" in m for m in messages)
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.parametrize("tag", ["0@None", "0@0.0", "abc@1.0", "", "@", "-5@1.0", "7x@1.0"])
def test_a_worker_tag_naming_no_process_of_its_own_is_never_signalled(
    local_instance, tmp_path, tag
):
    run = _create(local_instance, _location(tmp_path, "one"), "endless")
    local_instance.add_run_tags(run.run_id, {WORKER_TAG: tag})
    assert local_instance.run_launcher.terminate(run.run_id) is False
    messages = [entry.message for entry in local_instance.all_logs(run.run_id)]
    assert any("is no longer running; nothing to interrupt" in m for m in messages)


def test_a_run_of_another_python_goes_to_the_code_server(local_instance, tmp_path):
    run = _create(
        local_instance, _location(tmp_path, "one"), "versioned", executable_path="/opt/other/python"
    )
    # Dagster's default launcher: it needs the workspace's code server, which this call has not.
    with pytest.raises(DagsterInvariantViolationError, match="requires a workspace"):
        local_instance.run_launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
    assert WORKER_TAG not in local_instance.get_run_by_id(run.run_id).tags
