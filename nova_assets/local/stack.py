"""The local stack: real Redis, Apache Kafka (KRaft, one node) and a Pushgateway on 127.0.0.1.

`up` installs what is missing, starts each service detached so it outlives the command line,
and returns only once every service answers for real. `down` stops only what `up` started.
"""

import base64
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import redis
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic
from redis.backoff import NoBackoff
from redis.retry import Retry

HOST = "127.0.0.1"
SERVICES = ("redis", "kafka", "pushgateway")
OPTIONAL_SERVICES = ("prometheus", "postgres")
"""Started only on request: Prometheus to watch the alerts locally (`--with-prometheus`), and
PostgreSQL for Dagster's production storage (`--with-postgres`, deploy/dagster.yaml)."""

# One apt line for the binaries the stack runs; `prometheus` brings promtool along.
APT_PACKAGES = ("redis-server", "prometheus-pushgateway", "prometheus")
# Which apt packages provide each binary, for a machine that lacks it.
_BINARY_PACKAGES = {
    "redis-server": APT_PACKAGES,
    "prometheus-pushgateway": APT_PACKAGES,
    "promtool": APT_PACKAGES,
    "prometheus": APT_PACKAGES,
    "pg_ctlcluster": ("postgresql",),
    "java": ("default-jre-headless",),
    "mvn": ("maven",),
}
_BINARIES = {
    "redis": ("redis-server",),
    "kafka": ("java", "mvn"),
    "pushgateway": ("prometheus-pushgateway", "promtool"),
    "prometheus": ("prometheus",),
    "postgres": ("pg_ctlcluster",),
}
# A cold JVM on a small machine needs far longer than Redis or the Pushgateway.
_READY_TIMEOUT_S = {
    "redis": 15.0,
    "kafka": 90.0,
    "pushgateway": 15.0,
    "prometheus": 30.0,
    "postgres": 60.0,
}
_STOP_GRACE_S = {
    "redis": 5.0,
    "kafka": 15.0,
    "pushgateway": 5.0,
    "prometheus": 10.0,
    "postgres": 10.0,
}
_PROBE_TIMEOUT_S = 1.0
_LOG_TAIL_LINES = 30
_KAFKA_HEAP = "-Xmx512m"


@dataclass(frozen=True)
class StackConfig:
    state_dir: Path
    redis_port: int = 6379
    redis_socket: Path | None = None
    """A unix socket for Redis (from a `unix://` REDIS_URL); Redis then listens on no port."""
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    pushgateway_port: int = 9091
    dlq_topic: str = "jobs-dlq"
    jars_dir: Path | None = None
    prometheus_port: int = 9090
    prometheus_rules: Path | None = None
    postgres_port: int = 5432
    postgres_dir: Path | None = None
    """PostgreSQL's data directory (default state_dir/postgres); the `postgres` user owns it."""

    @property
    def postgres_data(self) -> Path:
        return self.postgres_dir or self.state_dir / "postgres"

    @property
    def postgres_url(self) -> str:
        """SQLAlchemy URL for Dagster's storage (psycopg2, the driver dagster-postgres uses)."""
        return f"postgresql+psycopg2://postgres@{HOST}:{self.postgres_port}/postgres"

    @property
    def kafka_jars(self) -> Path:
        return self.jars_dir or self.state_dir / "kafka-libs"

    @property
    def kafka_dir(self) -> Path:
        return self.state_dir / "kafka"

    def port(self, service: str) -> int:
        return {
            "redis": self.redis_port,
            "kafka": self.kafka_port,
            "pushgateway": self.pushgateway_port,
            "prometheus": self.prometheus_port,
            "postgres": self.postgres_port,
        }[service]

    def address(self, service: str) -> str:
        """Where `service` listens, as the command line shows it."""
        if service == "redis" and self.redis_socket is not None:
            return f"unix:{self.redis_socket}"
        return f"{HOST}:{self.port(service)}"

    def log_path(self, service: str) -> Path:
        return self.state_dir / "logs" / f"{service}.log"

    def pid_path(self, service: str) -> Path:
        return self.state_dir / "run" / f"{service}.pid"


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    address: str
    answering: bool
    pid: int | None


class StackError(RuntimeError):
    """A service of the local stack could not be installed, started or reached."""


def _no_log(message: str) -> None:
    del message


def up(
    config: StackConfig,
    services: Sequence[str] = SERVICES,
    log: Callable[[str], None] = _no_log,
) -> None:
    """Starts the services that are not already answering and waits until each one answers.

    Args:
        config: Ports and folders of the stack.
        services: Which services to bring up, a subset of `SERVICES`.
        log: Receives one line per step, for the command line to show.

    Raises:
        StackError: A service could not be installed, exited, or did not answer in time.
    """
    _check_names(services)
    to_start = [name for name in services if not _answering(config, name)]
    _install_missing([binary for name in to_start for binary in _BINARIES[name]], config, log)
    for name in services:
        where = config.address(name)
        if name not in to_start:
            log(f"reusing {name} already answering on {where}")
        else:
            began = time.monotonic()
            pid = started_pid(config, name)
            if pid is None:
                pid = _start(config, name, log)
            else:
                log(f"{name} (pid {pid}) started earlier is not answering yet; waiting for it")
            _wait_until_answering(config, name, pid)
            log(f"{name} answering on {where} (pid {pid}, {time.monotonic() - began:.1f} s)")
        if name == "kafka":
            _ensure_topic(config, log)


def down(
    config: StackConfig,
    services: Sequence[str] = SERVICES,
    log: Callable[[str], None] = _no_log,
) -> None:
    """Stops the services that `up` started, and nothing else.

    Args:
        config: Ports and folders of the stack.
        services: Which services to stop, a subset of `SERVICES`.
        log: Receives one line per step, for the command line to show.
    """
    _check_names(services)
    for name in services:
        pid_path = config.pid_path(name)
        pid = started_pid(config, name)
        if pid is None:
            if pid_path.exists():
                log(f"{name}: the process in {pid_path} is gone; removing the stale pid file")
                pid_path.unlink()
            else:
                log(f"{name}: not started by nova-assets; leaving it alone")
            continue
        log(f"stopping {name} (pid {pid})")
        if not _terminate(pid, _STOP_GRACE_S[name]):
            log(f"{name} (pid {pid}) ignored SIGTERM for {_STOP_GRACE_S[name]:.0f} s; killed it")
        pid_path.unlink(missing_ok=True)


def status(config: StackConfig) -> list[ServiceStatus]:
    """Reports, for every service, whether it answers on its port and whether `up` started it."""
    return [
        ServiceStatus(
            name=name,
            address=config.address(name),
            answering=_answering(config, name),
            pid=started_pid(config, name),
        )
        for name in SERVICES + OPTIONAL_SERVICES
    ]


def started_pid(config: StackConfig, service: str) -> int | None:
    """Returns the pid of the running `service` that `up` started, or None.

    The pid file alone is not trusted: pids are reused, so the process must also be alive and
    its command line must be the one `up` launched for this stack.
    """
    try:
        pid = int(config.pid_path(service).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None
    if _running(pid) and all(marker in cmdline for marker in _cmdline_markers(config, service)):
        return pid
    return None


def _check_names(services: Sequence[str]) -> None:
    known = SERVICES + OPTIONAL_SERVICES
    unknown = sorted(set(services) - set(known))
    if unknown:
        raise StackError(f"unknown service(s) {unknown}; choose from {list(known)}")


def _cmdline_markers(config: StackConfig, service: str) -> tuple[str, ...]:
    port = config.port(service)
    # Redis rewrites its process title to "redis-server 127.0.0.1:<port>" (or "unixsocket:<path>").
    redis_title = f"unixsocket:{config.redis_socket}" if config.redis_socket else f"{HOST}:{port}"
    return {
        "redis": ("redis-server", redis_title),
        "kafka": ("kafka.Kafka", str(config.kafka_dir / "server.properties")),
        "pushgateway": ("pushgateway", f"--web.listen-address={HOST}:{port}"),
        "prometheus": ("prometheus", f"--web.listen-address={HOST}:{port}"),
        "postgres": ("postgres", str(config.postgres_data), f"-p {port}"),
    }[service]


# --- probes -----------------------------------------------------------------------------------


def _answering(config: StackConfig, service: str) -> bool:
    if service == "redis" and config.redis_socket is not None:
        return _redis_answers(unix_socket_path=str(config.redis_socket))
    port = config.port(service)
    # A closed port answers at once; the protocol probes below would wait for their timeouts.
    try:
        socket.create_connection((HOST, port), timeout=_PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    if service == "redis":
        return _redis_answers(port=port)
    if service in ("pushgateway", "prometheus"):
        return _pushgateway_answers(port)
    if service == "postgres":
        return _postgres_answers(port)
    return bool(_kafka_brokers(port))


def _redis_answers(**where: str | int) -> bool:
    """Whether Redis at `port=` on HOST, or at `unix_socket_path=`, answers a PING."""
    # No retries: a probe answers once, and the callers poll.
    client = redis.Redis(
        host=HOST,
        **where,
        socket_timeout=_PROBE_TIMEOUT_S,
        socket_connect_timeout=_PROBE_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _postgres_answers(port: int) -> bool:
    import psycopg2  # comes with dagster-postgres

    try:
        psycopg2.connect(
            host=HOST, port=port, user="postgres", dbname="postgres", connect_timeout=1
        ).close()
    except psycopg2.Error:
        return False
    return True


def _pushgateway_answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(
            f"http://{HOST}:{port}/-/ready", timeout=_PROBE_TIMEOUT_S
        ) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _kafka_admin(port: int) -> AdminClient:
    # log_level 0 keeps librdkafka from printing "connection refused" while the broker boots.
    return AdminClient({"bootstrap.servers": f"{HOST}:{port}", "log_level": 0})


def _kafka_brokers(port: int) -> dict:
    # Metadata lists only brokers that registered with the controller, so a non-empty list
    # means the node is serving, not merely listening.
    try:
        return _kafka_admin(port).list_topics(timeout=2 * _PROBE_TIMEOUT_S).brokers
    except KafkaException:
        return {}


def _ensure_topic(config: StackConfig, log: Callable[[str], None]) -> None:
    """Creates the dead-letter topic, which also proves the broker accepts writes to metadata."""
    topic, port = config.dlq_topic, config.kafka_port
    admin = _kafka_admin(port)
    # Keep `admin` referenced until the future resolves: dropping it cancels the request.
    future = admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic]
    try:
        future.result(timeout=30)
        log(f"created Kafka topic {topic!r}")
    except KafkaException as error:
        if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise StackError(
                f"Kafka on {HOST}:{port} answers but creating topic {topic!r} failed: {error}. "
                f"See {config.log_path('kafka')}, then run `nova-assets services down` and `up`."
            ) from error
    # Wait until the topic has a leader, so producers can write the moment `up` returns.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            partitions = admin.list_topics(topic=topic, timeout=5).topics[topic].partitions
        except KafkaException:
            partitions = {}
        if partitions and all(p.leader >= 0 for p in partitions.values()):
            return
        time.sleep(0.2)
    raise StackError(
        f"Kafka topic {topic!r} on {HOST}:{port} got no leader within 30 s.\n"
        f"{_tail(config.log_path('kafka'))}\n"
        "Run `nova-assets services down`, then `nova-assets services up` again."
    )


# --- installing -------------------------------------------------------------------------------


def _install_missing(binaries: list[str], config: StackConfig, log: Callable[[str], None]) -> None:
    missing = sorted({binary for binary in binaries if shutil.which(binary) is None})
    if not missing:
        return
    packages = list(dict.fromkeys(pkg for binary in missing for pkg in _BINARY_PACKAGES[binary]))
    install_line = "apt-get install -y " + " ".join(packages)
    if os.geteuid() != 0 or not Path("/etc/debian_version").exists() or not shutil.which("apt-get"):
        raise StackError(
            f"{', '.join(missing)} not found on PATH. Install them (on Debian/Ubuntu: "
            f"`sudo {install_line}`), then run `nova-assets services up` again."
        )
    log(f"{', '.join(missing)} missing; running apt-get update and {install_line}")
    apt_log = config.state_dir / "logs" / "apt.log"
    apt_log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with apt_log.open("wb") as out:
        for command in (["apt-get", "update"], ["apt-get", "install", "-y", *packages]):
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                check=False,
            )
            if result.returncode != 0:
                raise StackError(
                    f"`{' '.join(command)}` failed with exit code {result.returncode}.\n"
                    f"{_tail(apt_log)}\nFix the apt error above, or run `{install_line}` "
                    "yourself, then run `nova-assets services up` again."
                )
    still_missing = [binary for binary in missing if shutil.which(binary) is None]
    if still_missing:
        raise StackError(
            f"{still_missing} still not on PATH after `{install_line}`; see {apt_log}."
        )


def _kafka_jars(config: StackConfig, log: Callable[[str], None]) -> Path:
    """Resolves Kafka's runtime jars from Maven Central once, and again only if the POM changes."""
    jars = config.kafka_jars
    pom = resources.files(__package__).joinpath("kafka_pom.xml").read_text()
    stamp = hashlib.sha256(pom.encode()).hexdigest()
    marker = jars / ".resolved"
    if marker.is_file() and marker.read_text() == stamp:
        return jars
    log(f"resolving Kafka jars from Maven Central into {jars} (once)")
    jars.parent.mkdir(parents=True, exist_ok=True)
    # Resolve beside the cache and swap it in whole, so an interrupted download never looks done.
    with tempfile.TemporaryDirectory(prefix=f".{jars.name}-", dir=jars.parent) as staging:
        (Path(staging) / "pom.xml").write_text(pom)
        libs = Path(staging) / "libs"
        command = [
            "mvn", "-q", "-B", "-f", str(Path(staging) / "pom.xml"),
            "dependency:copy-dependencies", "-DincludeScope=runtime",
            f"-DoutputDirectory={libs}",
        ]  # fmt: skip
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            output = "\n".join((result.stdout + result.stderr).splitlines()[-_LOG_TAIL_LINES:])
            raise StackError(
                f"Maven could not resolve Kafka's jars (exit code {result.returncode}):\n{output}\n"
                "Check that Maven Central is reachable (proxy settings in ~/.m2/settings.xml), "
                "then run `nova-assets services up` again."
            )
        (libs / ".resolved").write_text(stamp)
        shutil.rmtree(jars, ignore_errors=True)
        libs.rename(jars)
    return jars


# --- starting and stopping --------------------------------------------------------------------


def _start(config: StackConfig, name: str, log: Callable[[str], None]) -> int:
    if name == "kafka":
        command = _prepare_kafka(config, log)
    elif name == "redis":
        data_dir = config.state_dir / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        # A cache needs no snapshots: `save ""` and no AOF keep the disk quiet.
        command = [
            "redis-server", "--port", str(config.redis_port), "--bind", HOST,
            "--dir", str(data_dir), "--daemonize", "no", "--save", "", "--appendonly", "no",
        ]  # fmt: skip
        if config.redis_socket is not None:
            config.redis_socket.parent.mkdir(parents=True, exist_ok=True)
            command += [
                "--port", "0", "--unixsocket", str(config.redis_socket), "--unixsocketperm", "700",
            ]  # fmt: skip
    elif name == "prometheus":
        command = _prepare_prometheus(config)
    elif name == "postgres":
        command = _prepare_postgres(config)
    else:
        # Memory only: Debian's build defaults --persistence.file to a path shared by every
        # gateway on the machine, so it is cleared explicitly. Our metrics are recomputed from
        # durable state at each push, never read back from the gateway.
        command = [
            "prometheus-pushgateway",
            f"--web.listen-address={HOST}:{config.pushgateway_port}",
            "--persistence.file=",
        ]

    log_path = config.log_path(name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if log_path.exists():
        # Keep the previous run's log one step back: it holds the story of the last shutdown.
        log_path.replace(log_path.with_suffix(".log.1"))
    with log_path.open("wb") as out:
        # A new session detaches the service from the terminal, so it outlives the command line.
        # PostgreSQL will not run as root: it runs as the `postgres` user, in its own folder.
        as_postgres = name == "postgres" and os.geteuid() == 0
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=config.postgres_data if name == "postgres" else config.state_dir,
            start_new_session=True,
            user="postgres" if as_postgres else None,
        )
    pid = process.pid
    config.pid_path(name).parent.mkdir(parents=True, exist_ok=True)
    config.pid_path(name).write_text(f"{pid}\n")
    # Popen warns when dropped while its child runs; this child is meant to outlive us.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        del process
    log(f"started {name} (pid {pid}), log in {log_path}")
    return pid


def _postgres_bin(program: str) -> str:
    # Debian installs the server outside PATH, under its major version.
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{program}"))
    if not found:
        raise StackError(
            f"{program} not found under /usr/lib/postgresql; apt-get install postgresql"
        )
    return str(found[-1])


def _prepare_postgres(config: StackConfig) -> list[str]:
    """A cluster of our own (trust auth on 127.0.0.1 only), created once, run as `postgres`.

    PostgreSQL refuses to run as root, so the data directory belongs to the `postgres` user and
    the server starts under it.
    """
    data = config.postgres_data
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True)
        shutil.chown(data, user="postgres", group="postgres")
        subprocess.run(
            [_postgres_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"],
            user="postgres",
            check=True,
            capture_output=True,
        )
    return [
        _postgres_bin("postgres"),
        "-D", str(data),
        "-p", str(config.postgres_port),
        "-c", f"listen_addresses={HOST}",
        "-c", f"unix_socket_directories={data}",
    ]  # fmt: skip


def _prepare_prometheus(config: StackConfig) -> list[str]:
    """A Prometheus scraping the local Pushgateway and evaluating the project's alert rules."""
    prometheus_dir = config.state_dir / "prometheus"
    prometheus_dir.mkdir(parents=True, exist_ok=True)
    rules = [str(config.prometheus_rules)] if config.prometheus_rules else []
    settings = prometheus_dir / "prometheus.yml"
    settings.write_text(
        "global: {scrape_interval: 15s, evaluation_interval: 15s}\n"
        f"rule_files: {rules}\n"
        "scrape_configs:\n"
        "  - job_name: pushgateway\n"
        "    honor_labels: true\n"
        f"    static_configs: [{{targets: ['{HOST}:{config.pushgateway_port}']}}]\n"
    )
    return [
        "prometheus",
        f"--config.file={settings}",
        f"--storage.tsdb.path={prometheus_dir / 'data'}",
        f"--web.listen-address={HOST}:{config.prometheus_port}",
    ]


def _prepare_kafka(config: StackConfig, log: Callable[[str], None]) -> list[str]:
    """Writes Kafka's configuration, formats its storage once, and returns the server command."""
    jars = _kafka_jars(config, log)
    kafka_dir = config.kafka_dir
    kafka_dir.mkdir(parents=True, exist_ok=True)
    properties = kafka_dir / "server.properties"
    log4j = kafka_dir / "log4j2.properties"
    properties.write_text(_server_properties(config))
    log4j.write_text(_LOG4J2_PROPERTIES)
    java = ["java", _KAFKA_HEAP, f"-Dlog4j2.configurationFile={log4j}", "-cp", f"{jars}/*"]

    cluster_id_path = kafka_dir / "cluster-id"
    if not cluster_id_path.exists():
        cluster_id_path.write_text(_new_cluster_id())
    format_command = [
        *java, "kafka.tools.StorageTool", "format", "-t", cluster_id_path.read_text(),
        "-c", str(properties), "--ignore-formatted",
    ]  # fmt: skip
    result = subprocess.run(
        format_command, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        output = "\n".join((result.stdout + result.stderr).splitlines()[-_LOG_TAIL_LINES:])
        raise StackError(
            f"formatting Kafka's storage in {kafka_dir / 'data'} failed "
            f"(exit code {result.returncode}):\n{output}\n"
            f"If the folder holds another cluster's data, remove {kafka_dir} and run "
            "`nova-assets services up` again."
        )
    return [*java, "kafka.Kafka", str(properties)]


def _new_cluster_id() -> str:
    # What `StorageTool random-uuid` prints, without starting a JVM: 16 random bytes as
    # unpadded URL-safe base64. A leading '-' would be read as an option, so draw again.
    while True:
        cluster_id = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _server_properties(config: StackConfig) -> str:
    port, controller = config.kafka_port, config.kafka_controller_port
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{HOST}:{controller}",
        "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(config.kafka_dir / "data"),
        # One node: every replicated topic must make do with a single replica.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        # The cleaner's buffer (128 MiB by default) is taken from the heap at start.
        "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        # Fast consumer groups for tests and the local loop.
        "group.initial.rebalance.delay.ms": "0",
        "offsets.topic.num.partitions": "1",
        "group.min.session.timeout.ms": "1000",
        # After a kill the controller holds the old registration until its session expires
        # (9 s by default), and the restarted broker waits that long to be unfenced.
        "broker.heartbeat.interval.ms": "500",
        "broker.session.timeout.ms": "4000",
    }
    return "".join(f"{key}={value}\n" for key, value in settings.items())


_LOG4J2_PROPERTIES = """\
status = warn
# Kafka's own shutdown hook logs its clean shutdown; log4j's hook must not close the log first.
shutdownHook = disable
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
"""


def _wait_until_answering(config: StackConfig, name: str, pid: int) -> None:
    port = config.port(name)
    where = config.address(name)
    timeout = _READY_TIMEOUT_S[name]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(pid):
            config.pid_path(name).unlink(missing_ok=True)
            raise StackError(
                f"{name} (pid {pid}) exited before answering on {where}.\n"
                f"{_tail(config.log_path(name))}\n"
                f"If port {port} is taken by another program, stop it or choose another port; "
                "then run `nova-assets services up` again."
            )
        if _answering(config, name):
            return
        time.sleep(0.2)
    raise StackError(
        f"{name} (pid {pid}) did not answer on {where} within {timeout:.0f} s.\n"
        f"{_tail(config.log_path(name))}\n"
        "Run `nova-assets services down`, fix the cause shown above, "
        "then `nova-assets services up`."
    )


def _terminate(pid: int, grace_s: float) -> bool:
    """Sends SIGTERM, then SIGKILL after `grace_s`; returns False if SIGKILL was needed."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
            # A stopped process (tests SIGSTOP Kafka) acts on SIGTERM only once continued.
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _running(pid):
                return sig == signal.SIGTERM
            time.sleep(0.1)
    return False


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


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
    except OSError:
        return f"(no log at {path})"
    return f"--- last {len(lines)} lines of {path} ---\n" + "\n".join(lines)
