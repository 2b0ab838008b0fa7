"""Every benchmark, each cache family beside its baseline in the same run.

Each family runs in a process of its own: the embedded engine admits one data directory per
process. What the families print goes to the terminal as it comes and is appended to
bench/RESULTS.md under a dated heading, so the file keeps every run, newest last (headings one
level down there, under the run's own).

    make bench          # or: .venv/bin/python bench/run.py
"""

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "RESULTS.md"
FAMILIES = (
    "trending.py",
    "suggestions.py",
    "feeds.py",
    "metrics.py",
    "redis_cluster.py",
    "kafka_cluster.py",
    "scale.py",
    "tick_to_fresh.py",
    "history.py",
)
# Unbuffered, so a family's lines reach the terminal as it prints them rather than when it exits;
# in UTF-8, as the record is written (the tables print "≤" and "→").
FAMILY_ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}


def main() -> None:
    with RESULTS.open("a", encoding="utf-8") as record:

        def show(line: str) -> None:
            """One line of output to the terminal and to the record."""
            sys.stdout.write(line)
            sys.stdout.flush()
            record.write(f"#{line}" if line.startswith("#") else line)
            record.flush()

        show("\n")
        show(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores\n")
        for script in FAMILIES:
            with subprocess.Popen(
                [sys.executable, str(HERE / script)],
                stdout=subprocess.PIPE,
                encoding="utf-8",
                env=FAMILY_ENV,
            ) as family:
                for line in family.stdout:
                    show(line)
            if family.returncode != 0:
                show(f"\n{script} failed with exit code {family.returncode}\n")
                sys.exit(1)


if __name__ == "__main__":
    main()
