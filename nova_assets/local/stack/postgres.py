"""PostgreSQL for Dagster's production storage (`--with-postgres`, deploy/dagster.yaml)."""

import shutil
import subprocess
from pathlib import Path

from nova_assets.local.stack.config import HOST, StackConfig, StackError


def _postgres_bin(program: str) -> str:
    # Debian installs the server outside PATH, under its major version.
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{program}"))
    if not found:
        raise StackError(
            f"{program} not found under /usr/lib/postgresql; apt-get install postgresql"
        )
    return str(found[-1])


def prepare_postgres(config: StackConfig) -> list[str]:
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
