"""How `nova-assets` fails: one line on stderr and an exit code, never a traceback.

Exit codes, for every subcommand:

- 0: done (for `health`: every job is ok);
- 1: the command ran and the answer is no: a job is not ok, a service did not answer, the
  instance has no such run, a launch failed, an unexpected fault (named in one line);
- 2: the command cannot run as asked: a bad argument or option value, invalid settings, an
  instance folder that holds no readable instance (`health`).

Settings are the one exception to "one line": `SettingsError` lists every bad variable, one per
line under the `error:` line, so all of them can be fixed at once.
"""

import argparse
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

USAGE, FAILED = 2, 1
QUIETED = ("nova_assets.kafka", "dagster", "dagster_postgres")
"""Loggers whose lines a command keeps to itself; anything reaching the root is dropped too."""


class CommandError(Exception):
    """A failure the command reports as one line (`error: …`) with its exit code."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.code = code


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and its message's words, at most 300 characters."""
    words = " ".join(str(exc).split())
    name = type(exc).__name__
    return f"{name}: {words[:300]}" if words else name


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (exit 2), without the usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def port(value: str) -> int:
    """A TCP port, 1 to 65535."""
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {value!r}")
    return int(value)


@contextmanager
def quiet_library_logs() -> Iterator[None]:
    """Library log lines (librdkafka's retries, Dagster's warnings) stay off the command's stderr.

    The command says what went wrong in its own one line; a broker that refuses connections would
    otherwise add a line for every attempt. The loggers are put back as they were afterwards, for
    a caller that runs the command in its own process (the tests).
    """
    named = [logging.getLogger(name) for name in QUIETED]
    root = logging.getLogger()
    saved = [(logger, logger.handlers[:], logger.propagate) for logger in [*named, root]]
    for logger in named:
        logger.handlers = [logging.NullHandler()]
        logger.propagate = False
    # A record reaching the root without a handler would fall back to stderr (`lastResort`).
    root.addHandler(logging.NullHandler())
    try:
        yield
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate
