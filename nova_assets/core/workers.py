"""Run workers as processes of this host: whether one still runs, and whether a pid is still it."""

import os
from pathlib import Path


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


def worker_alive(pid: int, run_started: float) -> bool:
    """Whether the worker still runs: the pid exists and was not reused after the run started."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone's process; it exists
    started = process_start(pid)
    # Clock ticks and the boot time are coarse: a second of slack.
    return started is None or started <= run_started + 1.0
