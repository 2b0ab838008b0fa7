"""Every `nova-assets` error is one line on stderr and an exit code, never a traceback.

Each subcommand of `build_parser()` is run as the real command, in its own process, with bad
input: unknown commands and actions, out-of-range and malformed option values (`seed --users 1`
among them), an unreachable ClickHouse server, Kafka broker and PostgreSQL-free instance, an
unknown run id, an instance folder that is not there, a home that cannot be written. `dlq
replay` without DAGSTER_HOME reads the same default instance as `health` (`<NOVA_HOME>/dagster`).
Settings errors may list several variables, one per line under the `error:` line, never as a
traceback. The option parsers take any text without raising anything but a usage error.
"""

import argparse
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, timedelta, timezone
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from nova_assets import cli
from nova_assets.cli_errors import port
from nova_assets.local.instance import write_instance

COMMAND = str(Path(sys.executable).parent / "nova-assets")
SUBCOMMANDS = set(re.search(r"\{(.+?)\}", cli.build_parser().format_usage())[1].split(","))
"""Every subcommand `build_parser()` has, as its usage line lists them."""


def _cases(tmp_path: Path) -> dict[str, tuple[list[str], dict[str, str], int, str]]:
    """name: (arguments, environment, exit code, what the one line says)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with_instance = tmp_path / "with-instance"
    write_instance(with_instance / "dagster", 5)
    nova = str(with_instance)
    return {
        # First: it waits out the Kafka client's metadata timeout (10 s) while the others run.
        "dlq list: broker down": (
            ["dlq", "list"],
            {"KAFKA_BROKERS": "127.0.0.1:1"},
            1,
            "cannot read the topic 'jobs-dlq' from 127.0.0.1:1",
        ),
        "no command": ([], {}, 2, "the following arguments are required: command"),
        "unknown command": (["bogus"], {}, 2, "invalid choice: 'bogus'"),
        "services: unknown action": (["services", "restart"], {}, 2, "invalid choice: 'restart'"),
        "services: port 0": (["services", "up", "--redis-port", "0"], {}, 2, "a port from 1"),
        "services: port too high": (
            ["services", "status", "--kafka-port", "70000"],
            {},
            2,
            "a port from 1 to 65535, got '70000'",
        ),
        "seed: one user": (["seed", "--users", "1"], {}, 2, "--users must be in 2..4294967295"),
        "seed: no user": (["seed", "--users", "0"], {}, 2, "--users must be in 2..4294967295"),
        "seed: negative posts": (["seed", "--posts", "-5"], {}, 2, "--posts must be in 1.."),
        "seed: huge users": (["seed", "--users", str(2**40)], {}, 2, "--users must be in 2.."),
        "seed: huge days": (["seed", "--days", "99999999"], {}, 2, "--days must be in 1..36500"),
        "seed: negative follows": (
            ["seed", "--follows-per-user", "-1"],
            {},
            2,
            "--follows-per-user must be in 0..100000",
        ),
        "seed: not a number": (["seed", "--users", "many"], {}, 2, "invalid int value: 'many'"),
        "seed: not a time": (["seed", "--as-of", "yesterday"], {}, 2, "give a UTC time"),
        "seed: no time zone": (
            ["seed", "--as-of", "2026-01-01T00:00:00"],
            {},
            2,
            "give a UTC time",
        ),
        "seed: server down": (
            ["seed", "--allow-server"],
            {"CLICKHOUSE_URL": "http://nova:S3cret-pw@127.0.0.1:1/"},
            1,
            "seed: ClickHouse at http://***@127.0.0.1:1/: OperationalError",
        ),
        "instance: no home": (["instance"], {}, 2, "the following arguments are required"),
        "instance: home under a file": (
            ["instance", "--home", str(a_file / "home")],
            {},
            1,
            "Not a directory",
        ),
        "instance: no template": (
            ["instance", "--home", str(tmp_path / "i"), "--template", str(tmp_path / "none")],
            {},
            1,
            "No such file or directory",
        ),
        "health: no instance": (["health"], {}, 2, "does not exist"),
        "history: unknown action": (["history", "vacuum"], {}, 2, "invalid choice: 'vacuum'"),
        "history size: no instance": (["history", "size"], {}, 2, "does not exist"),
        "history prune: no instance": (["history", "prune"], {}, 2, "no Dagster instance in"),
        "dlq: unknown action": (["dlq", "purge"], {}, 2, "invalid choice: 'purge'"),
        "dlq list: limit 0": (["dlq", "list", "--limit", "0"], {}, 2, "a whole number from 1"),
        "dlq replay: no run id": (["dlq", "replay"], {}, 2, "needs the failed run's id"),
        "dlq replay: no instance": (["dlq", "replay", "abc"], {}, 2, "does not exist"),
        "dlq replay: unknown run": (
            ["dlq", "replay", "no-such-run"],
            {"NOVA_HOME": nova},
            1,
            f"the instance has no run 'no-such-run' (in {with_instance / 'dagster'})",
        ),
    }


AT_ONCE = 3
"""Commands running at a time: one waiting on a dead broker, two for the two cores' imports.

Every command imports Dagster (about a second of CPU), so more at once only share the cores.
"""


def _run_side_by_side(
    runs: dict[str, tuple[list[str], dict[str, str]]],
) -> dict[str, subprocess.CompletedProcess]:
    """Runs each command in its own process, `AT_ONCE` at a time, in the order given."""

    def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [COMMAND, *argv], env=env, capture_output=True, text=True, timeout=180, check=False
        )

    with ThreadPoolExecutor(AT_ONCE) as pool:
        started = {name: pool.submit(run, argv, env) for name, (argv, env) in runs.items()}
        return {name: future.result() for name, future in started.items()}


def _environment(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """No DAGSTER_HOME, a NOVA_HOME with nothing in it: the defaults, wherever they lead."""
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    return env | {"NOVA_HOME": str(tmp_path / "nova")} | overrides


def test_every_subcommand_fails_in_one_line_with_an_exit_code(tmp_path):
    cases = _cases(tmp_path)
    assert {argv[0] for argv, *_ in cases.values() if argv} >= SUBCOMMANDS
    done = _run_side_by_side(
        {name: (argv, _environment(tmp_path, **env)) for name, (argv, env, _, _) in cases.items()}
    )
    for name, (_, _, code, says) in cases.items():
        ran = done[name]
        assert "Traceback" not in ran.stderr, (name, ran.stderr)
        assert ran.returncode == code, (name, ran.returncode, ran.stderr)
        lines = ran.stderr.splitlines()
        assert len(lines) == 1, (name, ran.stderr)
        assert lines[0].startswith("error: ") and says in lines[0], (name, lines[0])
        assert "S3cret-pw" not in ran.stderr + ran.stdout
    # Nothing was created where the defaults point.
    assert not (tmp_path / "nova").exists()
    assert not (tmp_path / "i").exists()


def test_settings_errors_list_each_variable_without_a_traceback(tmp_path):
    env = _environment(tmp_path, REDIS_URL="bogus", TRENDING_INTERVAL_SEC="7")
    commands = {
        "services": ["services", "status"],
        "seed": ["seed"],
        "instance": ["instance", "--home", str(tmp_path / "home")],
        "health": ["health"],
        "dlq": ["dlq", "list"],
        "history": ["history", "size"],
    }
    done = _run_side_by_side({name: (argv, env) for name, argv in commands.items()})
    assert set(done) == SUBCOMMANDS
    for name, ran in done.items():
        assert ran.returncode == 2, (name, ran.stderr)
        assert "Traceback" not in ran.stderr
        first, *variables = ran.stderr.splitlines()
        assert first.startswith("error: ") and "configuration is invalid" in first, first
        assert [line.split("=")[0] for line in variables] == [
            "  - REDIS_URL",
            "  - TRENDING_INTERVAL_SEC",
        ], ran.stderr
    assert not (tmp_path / "home").exists()


@given(st.text(max_size=12))
def test_a_port_is_a_number_from_1_to_65535_or_a_usage_error(value):
    try:
        parsed = port(value)
    except argparse.ArgumentTypeError:
        assert not (value.isascii() and value.isdigit() and 1 <= int(value) <= 65535)
    else:
        assert 1 <= parsed <= 65535 and str(parsed) == value.lstrip("0")


TIMES = st.builds(
    lambda moment, minutes: moment.replace(tzinfo=timezone(timedelta(minutes=minutes))).isoformat(),
    st.datetimes(),
    st.integers(-23 * 60, 23 * 60),
)


@given(st.one_of(st.text(max_size=40), TIMES, TIMES.map(lambda t: t[:19])))
def test_an_as_of_is_a_time_in_utc_or_a_usage_error(value):
    try:
        parsed = cli._utc(value)  # noqa: SLF001
    except argparse.ArgumentTypeError:
        return
    assert parsed.tzinfo == UTC
