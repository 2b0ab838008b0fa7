"""The local Dagster instance config: the top-level `dagster.yaml`, with the settings' run limit.

The package carries that file as `nova_assets/local/dagster.yaml`, a link to it: a checkout and an
installed package read the same single copy.
"""

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import dagster as dg
import yaml

TEMPLATE = "dagster.yaml"
"""The template beside this module, shipped in the package so any working directory finds it."""


def template_text() -> str:
    """The instance config template, as the package carries it."""
    return resources.files(__package__).joinpath(TEMPLATE).read_text()


def write_instance(home: Path, max_concurrent_jobs: int, template: Path | None = None) -> Path:
    """Write `home/dagster.yaml` from the template, allowing `max_concurrent_jobs` runs at once."""
    config = yaml.safe_load(template.read_text() if template else template_text())
    config["concurrency"]["runs"]["max_concurrent_runs"] = max_concurrent_jobs
    config["concurrency"]["pools"]["op_granularity_run_buffer"] = max_concurrent_jobs
    config["event_log_storage"] = event_log_config(home)
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    target.write_text(
        "# Written by `nova-assets instance` from the top-level dagster.yaml; edit that one.\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    return target


def event_log_config(home: Path) -> dict:
    """The local event log: every run's events in one SQLite database (history/events).

    Pool slots are claimed one process at a time (nova_assets/internals/slot_storage.py).

    A home written before keeps Dagster's database per run (DAGSTER_HOME/history/runs): its run
    history stays readable, and the run retention removes it as it ages (docs/decisions.md).
    """
    legacy = home.resolve() / "history" / "runs"
    if (legacy / "index.db").exists():
        cls, base = "SlotLockedSqliteEventLogStorage", legacy
    else:
        cls, base = "LocalEventLogStorage", home.resolve() / "history" / "events"
    return {
        "module": "nova_assets.internals.slot_storage",
        "class": cls,
        "config": {"base_dir": str(base)},
    }


def initialize_pools(home: Path, pools: Sequence[str]) -> None:
    """Create the instance's storage and give each pool its slots now, before any run starts.

    Dagster gives a pool its default slots when a step first claims one. Two runs starting at the
    same moment on a fresh SQLite instance (two `dagster asset materialize` at once) could both
    find the pool without slots and each create one, and so run side by side once.
    """
    with dg.DagsterInstance.from_config(str(home)) as instance:
        for pool in pools:
            instance.event_log_storage.initialize_concurrency_limit_to_default(pool)
