"""A production install: `pip install .` alone, without the `local` extra, as the image does.

Builds a fresh virtualenv from the files the image copies (pyproject.toml, README.md and the
package), with no extra, and proves in it that the embedded engine is absent (`pip show chdb`
finds nothing), that the code location loads against a ClickHouse server URL with every job and
without importing chdb (nothing is contacted at load), that the production commands run
(`nova-assets --help`, `health`, `dlq list`, `dlq replay`), and that asking for the embedded
engine there fails with a message naming the `local` extra, not a traceback.

pip reaches PyPI for the dependencies (the registry `make test` installs from), so the test runs
with the services. It takes about half a minute, most of it pip: the venv is made without a pip
of its own (the running pip installs into it with `--python`) and nothing is byte-compiled ahead;
the commands run side by side once the first load has compiled what they import.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from nova_assets_tests.conftest import KAFKA_BROKERS

ROOT = Path(__file__).parents[1]
SERVER_URL = "http://nova:secret@127.0.0.1:1/"
"""A server URL whose port answers nothing: loading the code location must not contact it."""

LOAD = """
import json, sys
import nova_assets.definitions as location
jobs = sorted(j.name for j in location.defs.resolve_all_job_defs())
chdb = sorted(m for m in sys.modules if m.split(".")[0] == "chdb")
print(json.dumps({"jobs": jobs, "chdb": chdb}))
"""


def _run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, check=False, env=env, timeout=600
    )


def _side_by_side(
    commands: dict[str, tuple[list[str | Path], dict[str, str]]],
) -> dict[str, subprocess.CompletedProcess]:
    """Run independent commands at once; each one's completed process by name."""
    started = {
        name: subprocess.Popen(
            [str(a) for a in args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name, (args, env) in commands.items()
    }
    done = {}
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return done


def test_a_production_install_has_no_embedded_engine_and_serves_a_server(tmp_path, kafka_dlq):
    # What the image copies (deploy/README.md), without caches of this checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "nova_assets", source / "nova_assets", ignore=shutil.ignore_patterns("__pycache__")
    )
    venv = tmp_path / "venv"
    made = _run(sys.executable, "-m", "venv", "--without-pip", venv)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    pip = (sys.executable, "-m", "pip", "--python", python)

    installed = _run(*pip, "install", "--quiet", "--no-compile", source)
    assert installed.returncode == 0, installed.stderr[-3000:]
    shown = _run(*pip, "show", "chdb")
    assert shown.returncode != 0, shown.stdout
    assert "not found: chdb" in shown.stderr

    home = tmp_path / "home"
    # Two fresh instances: `health` and `dlq replay` run at once, each creating its storage.
    for instance in ("dagster", "replay"):
        (home / instance).mkdir(parents=True)
        (home / instance / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    local = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(home),
        "NOVA_HOME": str(home / "nova"),
        "DAGSTER_HOME": str(home / "dagster"),
        "KAFKA_BROKERS": KAFKA_BROKERS,
        "DLQ_TOPIC": kafka_dlq.topic,
    }
    server = local | {"CLICKHOUSE_URL": SERVER_URL}

    loaded = _run(python, "-c", LOAD, env=server)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert json.loads(loaded.stdout.strip().splitlines()[-1]) == {
        "jobs": [
            "__ASSET_JOB",
            "cache_warmer",
            "suggested_users",
            "trending_1h",
            "trending_24h",
            "trending_7d",
        ],
        "chdb": [],
    }

    cli = venv / "bin" / "nova-assets"
    ran = _side_by_side(
        {
            "help": ([cli, "--help"], server),
            "health": ([cli, "health"], server),
            "dlq list": ([cli, "dlq", "list"], server),
            "dlq replay": (
                [cli, "dlq", "replay", "no-such-run"],
                server | {"DAGSTER_HOME": str(home / "replay")},
            ),
            # The embedded engine asked for (CLICKHOUSE_URL unset: chdb under NOVA_HOME), absent.
            "load embedded": ([python, "-c", "import nova_assets.definitions"], local),
            "seed embedded": ([cli, "seed", "--if-empty"], local),
        }
    )
    assert ran["help"].returncode == 0 and "dlq" in ran["help"].stdout, ran["help"].stderr
    # A fresh instance: every job "never run", exit 1, a table and no error.
    assert ran["health"].returncode == 1, ran["health"].stderr
    assert "never run" in ran["health"].stdout and not ran["health"].stderr
    assert ran["dlq list"].returncode == 0, ran["dlq list"].stderr
    assert f"(no messages on {kafka_dlq.topic})" in ran["dlq list"].stdout
    assert ran["dlq replay"].returncode == 1
    assert "the instance has no run 'no-such-run'" in ran["dlq replay"].stderr

    refused = ran["load embedded"]
    assert refused.returncode != 0
    assert "EmbeddedEngineMissingError" in refused.stderr
    assert "`local` extra" in refused.stderr and "CLICKHOUSE_URL" in refused.stderr
    seeded = ran["seed embedded"]
    assert seeded.returncode == 1
    assert seeded.stderr.startswith("error: CLICKHOUSE_URL=chdb://")
    assert "`local` extra" in seeded.stderr and "Traceback" not in seeded.stderr
