"""The local instance as an earlier version wrote it: Dagster's event log with a database per run.

`nova-assets instance` keeps that layout for a home that already has it (`history/runs/index.db`),
so the tests that read, measure or prune such a home make one here.
"""

from pathlib import Path

from nova_assets.local.instance import initialize_pools, write_instance


def write_per_run_instance(home: Path, pools: tuple[str, ...] = ("clickhouse",)) -> Path:
    """A local home whose event log keeps a database per run, its storage created."""
    (home / "history" / "runs").mkdir(parents=True, exist_ok=True)
    index = home / "history" / "runs" / "index.db"
    index.touch()  # what `nova-assets instance` looks for
    write_instance(home, 5)
    index.unlink()  # created again, with its schema, by Dagster
    initialize_pools(home, list(pools))
    return home
