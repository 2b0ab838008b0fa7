"""Run workers as processes of this host: which process is a run's worker, and whether it runs.

The local run launcher tags each run it starts with its worker's pid and the process's start time
(`WORKER_TAG`); the launcher's termination and the `orphaned_runs` sensor read that tag. A pid is
only ever trusted together with the start time: once a process ends, the kernel may give its pid
to a later one.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

WORKER_TAG = "nova/worker"
"""Run tag `<pid>@<process start time>` of the run's worker, written by the local run launcher."""


def process_start(pid: int) -> float | None:
    """When process `pid` started (unix time), from /proc; None where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    # Fields after the command name (which may hold spaces) start at its closing parenthesis;
    # starttime is the 22nd field, in clock ticks since boot.
    fields = stat[stat.rindex(")") + 2 :].split()
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Worker:
    """A run's worker process: its pid, and when it started (None where /proc could not tell)."""

    pid: int
    started: float | None

    @property
    def tag_value(self) -> str:
        return f"{self.pid}@{self.started}"


def run_worker(run: dg.DagsterRun) -> Worker | None:
    """The run's worker as the local run launcher tagged it; None without a usable tag.

    A run without the tag was launched some other way (Dagster's default launcher, or in the
    process that executes it). A tag naming no process of its own (pid 0 or -1 would signal a
    process group or every process, text is no pid) counts as none.
    """
    value = run.tags.get(WORKER_TAG)
    if value is None:
        return None
    pid_text, _, started_text = value.partition("@")
    if not pid_text.isdigit() or int(pid_text) <= 0:
        return None
    try:
        started = float(started_text)
    except ValueError:
        started = None  # "None": /proc could not tell when the worker started
    return Worker(pid=int(pid_text), started=started)


def worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The pid of the run's worker, from the launcher's tag; None for a run without one."""
    run = instance.get_run_by_id(run_id)
    worker = run_worker(run) if run is not None else None
    return worker.pid if worker is not None else None


def worker_alive(pid: int, run_started: float, slack_s: float = 1.0) -> bool | None:
    """Whether process `pid` still runs as the worker that had it at `run_started` (unix time).

    False when no process has the pid, or when the one that has it started more than `slack_s`
    after `run_started` (the pid was reused by a later process); None where this host cannot tell
    when the process started (no /proc). The default slack is for a run's start time, which comes
    after its worker's: clock ticks and the boot time are coarse. Against the worker's own start
    time as the launcher recorded it, the slack is 0.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists, and /proc still tells when it started
    started = process_start(pid)
    if started is None:
        return None
    return started <= run_started + slack_s
