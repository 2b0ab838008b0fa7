"""Every benchmark, each cache family beside its baseline in the same run.

Each family runs in a process of its own: the embedded engine admits one data directory per
process.

    make bench          # or: .venv/bin/python bench/run.py
"""

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

FAMILIES = (
    "trending.py",
    "suggestions.py",
    "feeds.py",
    "metrics.py",
    "redis_cluster.py",
    "kafka_cluster.py",
    "scale.py",
    "tick_to_fresh.py",
)


def main() -> None:
    print(f"# nova_assets benchmarks: {os.cpu_count()} cores, {datetime.now(UTC):%Y-%m-%d}")
    here = Path(__file__).parent
    for script in FAMILIES:
        completed = subprocess.run([sys.executable, str(here / script)], check=False)
        if completed.returncode != 0:
            sys.exit(f"{script} failed with exit code {completed.returncode}")


if __name__ == "__main__":
    main()
