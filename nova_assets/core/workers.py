"""Run workers as processes of this host: which process is a run's worker, and whether it runs.

The local run launcher tags each run it starts with its worker's pid, the process's start time
and its start in clock ticks since boot (`WORKER_TAG`); the launcher's termination and the
`orphaned_runs` sensor read that tag. A pid is only ever trusted together with when its process
started: once a process ends, the kernel may give its pid to a later one.

Which "when" decides matters. The kernel keeps a process's start as clock ticks since boot
(field 22 of /proc/<pid>/stat), a count that no change of the wall clock moves. A start *time*
is that count added to the boot time /proc/stat gives (`btime`), and the kernel derives `btime`
from the wall clock: when the clock is stepped (NTP correcting a drift, a VM resumed, an
operator's `date -s`), every process's start time moves by the step. So the worker is matched by
its start ticks, exactly; the start time in the tag is for people reading it.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

WORKER_TAG = "nova/worker"
"""Run tag `<pid>@<start time>@<start ticks>` of the run's worker, written by the local launcher.

Tags written before the start ticks were recorded read `<pid>@<start time>`."""


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name; None where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields start after its last `)`.
    return stat[stat.rindex(")") + 2 :].split()


def start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot; None where /proc cannot tell.

    This is how the kernel itself records it (starttime, the 22nd field of /proc/<pid>/stat):
    stepping the wall clock does not change it, and two processes that held the same pid one
    after the other have different values.
    """
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields is not None else None
    except (IndexError, ValueError):
        return None


def boot_time() -> float | None:
    """When this host booted (unix time), as /proc/stat says now; None where it cannot tell.

    Derived by the kernel from the wall clock: it moves when the clock is stepped.
    """
    try:
        return next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def process_start(pid: int) -> float | None:
    """When process `pid` started (unix time), from /proc; None where /proc cannot tell.

    Good for showing and for comparing with other wall-clock times; it moves with the boot time
    when the clock is stepped, so it never identifies a process (`start_ticks` does).
    """
    ticks = start_ticks(pid)
    boot = boot_time()
    if ticks is None or boot is None:
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Worker:
    """A run's worker process: its pid, when it started, and its start in clock ticks since boot.

    `started` (unix time) and `ticks` are None where /proc could not tell; `ticks` is also None
    in a tag written before it was recorded.
    """

    pid: int
    started: float | None
    ticks: int | None = None

    @property
    def tag_value(self) -> str:
        value = f"{self.pid}@{self.started}"
        return value if self.ticks is None else f"{value}@{self.ticks}"

    @classmethod
    def of_process(cls, pid: int) -> "Worker":
        """Process `pid` as a run's worker, as /proc describes it now."""
        return cls(pid=pid, started=process_start(pid), ticks=start_ticks(pid))


def run_worker(run: dg.DagsterRun) -> Worker | None:
    """The run's worker as the local run launcher tagged it; None without a usable tag.

    A run without the tag was launched some other way (Dagster's default launcher, or in the
    process that executes it). A tag naming no process of its own (pid 0 or -1 would signal a
    process group or every process, text is no pid) counts as none.
    """
    value = run.tags.get(WORKER_TAG)
    if value is None:
        return None
    pid_text, _, rest = value.partition("@")
    if not pid_text.isdigit() or int(pid_text) <= 0:
        return None
    started_text, _, ticks_text = rest.partition("@")
    try:
        started = float(started_text)
    except ValueError:
        started = None  # "None": /proc could not tell when the worker started
    ticks = int(ticks_text) if ticks_text.isdigit() else None
    return Worker(pid=int(pid_text), started=started, ticks=ticks)


def worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The pid of the run's worker, from the launcher's tag; None for a run without one."""
    run = instance.get_run_by_id(run_id)
    worker = run_worker(run) if run is not None else None
    return worker.pid if worker is not None else None


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists, and /proc still tells when it started
    return True


def worker_running(worker: Worker) -> bool | None:
    """Whether the tagged worker process still runs: its pid, held by the process it tagged.

    Matched by start ticks, exactly: a later process on the same pid has other ticks, and a
    stepped clock changes none. A process that has exited but not been collected (a zombie)
    does not run. A tag without ticks (written before they were recorded) falls
    back to the start time, with `worker_alive`'s one-second slack. None where this host cannot
    tell (no /proc, or a tag without either).
    """
    if not _exists(worker.pid):
        return False
    if worker.ticks is not None:
        fields = _stat_fields(worker.pid)
        if fields is None:
            # Gone since it was looked for, or a host without /proc.
            return False if Path("/proc/self").exists() else None
        # A zombie (state Z) has exited; only its parent has not collected its status yet.
        return fields[0] != "Z" and fields[19] == str(worker.ticks)
    if worker.started is None:
        return None
    return worker_alive(worker.pid, worker.started)


def worker_alive(pid: int, run_started: float, slack_s: float = 1.0) -> bool | None:
    """Whether process `pid` still runs as the worker that had it at `run_started` (unix time).

    False when no process has the pid, or when the one that has it started more than `slack_s`
    after `run_started` (the pid was reused by a later process); None where this host cannot tell
    when the process started (no /proc). The default slack is for a run's start time, which comes
    after its worker's: clock ticks and the boot time are coarse. Both sides are wall-clock
    times, so a clock stepped forward by more than the slack since the run started makes a live
    worker look later than its run; `worker_running` compares start ticks instead.
    """
    if not _exists(pid):
        return False
    started = process_start(pid)
    if started is None:
        return None
    return started <= run_started + slack_s
