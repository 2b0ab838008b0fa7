"""Installing what the stack runs: binaries from apt, Kafka's jars from Maven Central.

Only what is missing is installed. apt runs only as root on Debian or Ubuntu; elsewhere the
error names the packages to install. Kafka's jars are resolved once from kafka_pom.xml into a
cache, and again only when the POM changes.
"""

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from nova_assets.local.stack.config import StackConfig, StackError
from nova_assets.local.stack.processes import LOG_TAIL_LINES, tail

# One apt line for the binaries the stack runs; `prometheus` brings promtool along.
APT_PACKAGES = ("redis-server", "prometheus-pushgateway", "prometheus")
# Which apt packages provide each binary, for a machine that lacks it. redis-server depends on
# redis-tools, but a machine may have lost it since; naming it installs it again.
_BINARY_PACKAGES = {
    "redis-server": APT_PACKAGES,
    "redis-cli": ("redis-tools",),
    "prometheus-pushgateway": APT_PACKAGES,
    "promtool": APT_PACKAGES,
    "prometheus": APT_PACKAGES,
    "pg_ctlcluster": ("postgresql",),
    "java": ("default-jre-headless",),
    "mvn": ("maven",),
}
BINARIES = {
    "redis": ("redis-server",),
    "kafka": ("java", "mvn"),
    "pushgateway": ("prometheus-pushgateway", "promtool"),
    "prometheus": ("prometheus",),
    "postgres": ("pg_ctlcluster",),
    "redis-cluster": ("redis-server", "redis-cli"),
    "kafka-cluster": ("java", "mvn"),
}
"""The binaries each service needs on PATH."""


def install_missing(binaries: list[str], config: StackConfig, log: Callable[[str], None]) -> None:
    """Installs with apt the packages providing those of `binaries` that are not on PATH."""
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
                    f"{tail(apt_log)}\nFix the apt error above, or run `{install_line}` "
                    "yourself, then run `nova-assets services up` again."
                )
    still_missing = [binary for binary in missing if shutil.which(binary) is None]
    if still_missing:
        raise StackError(
            f"{still_missing} still not on PATH after `{install_line}`; see {apt_log}."
        )


def kafka_jars(config: StackConfig, log: Callable[[str], None]) -> Path:
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
            output = "\n".join((result.stdout + result.stderr).splitlines()[-LOG_TAIL_LINES:])
            raise StackError(
                f"Maven could not resolve Kafka's jars (exit code {result.returncode}):\n{output}\n"
                "Check that Maven Central is reachable (proxy settings in ~/.m2/settings.xml), "
                "then run `nova-assets services up` again."
            )
        (libs / ".resolved").write_text(stamp)
        shutil.rmtree(jars, ignore_errors=True)
        libs.rename(jars)
    return jars
