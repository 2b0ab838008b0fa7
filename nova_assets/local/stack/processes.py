"""The stack's processes: launched detached, recognised by their pid files, awaited, stopped.

Every process, a service of its own or a cluster's node, is started the same way: detached in a
session of its own so it outlives the command line, its output in logs/<name>.log, its pid in
run/<name>.pid. A pid file alone is not trusted (pids are reused): the process must run and its
command line must be the one launched for this stack. Stopping sends SIGTERM, then SIGKILL after
the service's grace time. Also here: waiting until a process answers, and finding free ports
for a stack beside another.
"""

import os
import random
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from nova_assets.local.stack.config import HOST, Process, StackConfig, StackError
from nova_assets.local.stack.probes import answering

# A cold JVM on a small machine needs far longer than Redis or the Pushgateway; three at once on
# two cores longer still.
READY_TIMEOUT_S = {
    "redis": 15.0,
    "kafka": 90.0,
    "pushgateway": 15.0,
    "prometheus": 30.0,
    "postgres": 60.0,
    "redis-cluster": 15.0,
    "kafka-cluster": 120.0,
}
_STOP_GRACE_S = {
    "redis": 5.0,
    "kafka": 15.0,
    "pushgateway": 5.0,
    "prometheus": 10.0,
    "postgres": 10.0,
    "redis-cluster": 5.0,
    "kafka-cluster": 15.0,
}
LOG_TAIL_LINES = 30
"""How much of a log or a command's output an error shows."""


def registered_pid(config: StackConfig, process: Process) -> int | None:
    """The pid in `process`'s pid file, if that process runs and is the one launched for it."""
    try:
        pid = int(config.pid_path(process.name).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None
    if _running(pid) and all(marker in cmdline for marker in _cmdline_markers(config, process)):
        return pid
    return None


def _cmdline_markers(config: StackConfig, process: Process) -> tuple[str, ...]:
    port = process.port
    # Redis rewrites its process title to "redis-server 127.0.0.1:<port>" (or "unixsocket:<path>"),
    # followed by "[cluster]" on a cluster node.
    redis_title = f"unixsocket:{config.redis_socket}" if config.redis_socket else f"{HOST}:{port}"
    kafka_properties = str(config.kafka_home(process) / "server.properties")
    return {
        "redis": ("redis-server", redis_title),
        "redis-cluster": ("redis-server", f"{HOST}:{port} [cluster]"),
        "kafka": ("kafka.Kafka", kafka_properties),
        "kafka-cluster": ("kafka.Kafka", kafka_properties),
        "pushgateway": ("pushgateway", f"--web.listen-address={HOST}:{port}"),
        "prometheus": ("prometheus", f"--web.listen-address={HOST}:{port}"),
        "postgres": ("postgres", str(config.postgres_data), f"-p {port}"),
    }[process.service]


def launch(
    config: StackConfig, process: Process, command: list[str], log: Callable[[str], None]
) -> int:
    """Starts `command` detached, its output in the process's log; writes and returns its pid."""
    log_path = config.log_path(process.name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if log_path.exists():
        # Keep the previous run's log one step back: it holds the story of the last shutdown.
        log_path.replace(log_path.with_suffix(".log.1"))
    postgres = process.service == "postgres"
    with log_path.open("wb") as out:
        # A new session detaches the service from the terminal, so it outlives the command line.
        # PostgreSQL will not run as root: it runs as the `postgres` user, in its own folder.
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=config.postgres_data if postgres else config.state_dir,
            start_new_session=True,
            user="postgres" if postgres and os.geteuid() == 0 else None,
        )
    pid = child.pid
    config.pid_path(process.name).parent.mkdir(parents=True, exist_ok=True)
    config.pid_path(process.name).write_text(f"{pid}\n")
    # Popen warns when dropped while its child runs; this child is meant to outlive us.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        del child
    log(f"started {process.name} (pid {pid}), log in {log_path}")
    return pid


def wait_until_answering(config: StackConfig, process: Process, pid: int, deadline: float) -> None:
    """Polls until `process` answers; fails with its log's tail if it exits or `deadline` passes."""
    timeout = READY_TIMEOUT_S[process.service]
    while time.monotonic() < deadline:
        if not _running(pid):
            config.pid_path(process.name).unlink(missing_ok=True)
            raise StackError(
                f"{process.name} (pid {pid}) exited before answering on {process.address}.\n"
                f"{tail(config.log_path(process.name))}\n"
                f"If port {process.port} is taken by another program, stop it or choose another "
                "port; then run `nova-assets services up` again."
            )
        if answering(config, process):
            return
        time.sleep(0.2)
    raise StackError(
        f"{process.name} (pid {pid}) did not answer on {process.address} within {timeout:.0f} s.\n"
        f"{tail(config.log_path(process.name))}\n"
        "Run `nova-assets services down`, fix the cause shown above, "
        "then `nova-assets services up`."
    )


def wait_for(
    problem: Callable[[], str | None],
    what: str,
    timeout_s: float,
    processes: Sequence[Process],
    config: StackConfig,
) -> None:
    """Polls `problem` until it returns None; past `timeout_s`, fails with the last problem."""
    deadline = time.monotonic() + timeout_s
    while (found := problem()) is not None:
        if time.monotonic() >= deadline:
            logs = ", ".join(str(config.log_path(process.name)) for process in processes)
            raise StackError(
                f"waited {timeout_s:.0f} s for {what}: {found}. See {logs}; then run "
                "`nova-assets services down` and `up` again."
            )
        time.sleep(0.2)


def stop(config: StackConfig, service: str, log: Callable[[str], None]) -> None:
    """Stops every process of `service` that `up` started, together; removes stale pid files."""
    processes = config.processes(service)
    running: dict[Process, int] = {}
    not_ours = []
    for process in processes:
        pid_path = config.pid_path(process.name)
        pid = registered_pid(config, process)
        if pid is not None:
            running[process] = pid
        elif pid_path.exists():
            log(f"{process.name}: the process in {pid_path} is gone; removing the stale pid file")
            pid_path.unlink()
        else:
            not_ours.append(process.name)
    if len(not_ours) == len(processes):
        log(f"{service}: not started by nova-assets; leaving it alone")
    else:
        for name in not_ours:
            log(f"{name}: not started by nova-assets; leaving it alone")
    for process, pid in running.items():
        log(f"stopping {process.name} (pid {pid})")
    grace_s = _STOP_GRACE_S[service]
    killed = _terminate(list(running.values()), grace_s)
    for process, pid in running.items():
        if pid in killed:
            log(f"{process.name} (pid {pid}) ignored SIGTERM for {grace_s:.0f} s; killed it")
        config.pid_path(process.name).unlink(missing_ok=True)


def _terminate(pids: Sequence[int], grace_s: float) -> set[int]:
    """Sends SIGTERM to every pid, then SIGKILL to those still running `grace_s` later.

    Returns:
        The pids that needed SIGKILL.
    """
    remaining = list(pids)
    killed: set[int] = set()
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if sig == signal.SIGKILL:
            killed = set(remaining)
        for pid in remaining:
            try:
                os.kill(pid, sig)
                # A stopped process (tests SIGSTOP Kafka) acts on SIGTERM only once continued.
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        remaining = [pid for pid in remaining if _running(pid)]
        while remaining and time.monotonic() < deadline:
            time.sleep(0.1)
            remaining = [pid for pid in remaining if _running(pid)]
        if not remaining:
            break
    return killed


def _running(pid: int) -> bool:
    """True while `pid` runs; a process that exited but was not yet reaped counts as gone."""
    try:
        # Reap it if it is our own child (as in tests), so it does not linger as a zombie.
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the parenthesised command name, which may itself hold spaces.
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def tail(path: Path) -> str:
    """The last lines of the log at `path`, headed by its path, for an error message."""
    try:
        lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    except OSError:
        return f"(no log at {path})"
    return f"--- last {len(lines)} lines of {path} ---\n" + "\n".join(lines)


def free_port_range(count: int, *, bus_offset: int = 0) -> int:
    """The first of `count` consecutive ports free on HOST, for a cluster beside another stack.

    With `bus_offset`, the ports that far above them are free too (a Redis Cluster's bus,
    `REDIS_CLUSTER_BUS_OFFSET`). Ports are drawn at random from 15000 to 22000, below the kernel's
    ephemeral range (from 32768) even with a bus offset of 10000, so an outgoing connection never
    takes one before the cluster binds it, and two callers rarely draw the same range.
    """
    for _ in range(200):
        first = random.randrange(15_000, 22_000 - count)
        wanted = [first + i + offset for i in range(count) for offset in {0, bus_offset}]
        if all(_port_free(port) for port in wanted):
            return first
    raise StackError(f"found no {count} consecutive free ports on {HOST} in 15000-22000")


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True
