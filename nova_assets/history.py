"""`nova-assets history size|prune`: the instance's footprint, and the run retention by hand.

`size [--json]` reads the instance (DAGSTER_HOME, else `<NOVA_HOME>/dagster`) without writing to
it, as `health` does, and prints its runs, indexed events, files and bytes (and on PostgreSQL the
database's size). `prune [--dry-run]` deletes what the `run_retention` sensor would, all of it at
once (`RUN_RETENTION_DAYS`; docs/design.md §10), and prints what went and the space it freed.
"""

from collections.abc import Iterator

import dagster as dg

from nova_assets.cli_errors import USAGE, CommandError
from nova_assets.core.budget import Budget
from nova_assets.core.jobs import job_specs
from nova_assets.core.settings import Settings
from nova_assets.defs.retention.prune import cutoff_for, prune
from nova_assets.defs.retention.size import footprint_of
from nova_assets.health import HINT, instance_home
from nova_assets.internals.readonly_instance import UnreadableInstance, read_instance

NO_LIMIT = Budget(float("inf"))


def size(settings: Settings, *, as_json: bool = False) -> str:
    """The instance's footprint, as text or JSON."""
    home = instance_home(settings)
    try:
        footprint = read_instance(home, lambda instance: footprint_of(instance, home))
    except UnreadableInstance as exc:
        raise CommandError(f"cannot read the Dagster instance in {home}: {exc}{HINT}", USAGE)
    return footprint.as_json() if as_json else footprint.as_text()


def prune_by_hand(settings: Settings, *, dry_run: bool = False) -> Iterator[str]:
    """Delete (or, dry, list) the runs past the retention; lines to print."""
    days = settings.run_retention_days
    if days == 0:
        yield "RUN_RETENTION_DAYS=0: every run is kept; nothing to prune."
        return
    home = instance_home(settings)
    if not (home / "dagster.yaml").is_file():
        raise CommandError(f"no Dagster instance in {home} (no dagster.yaml){HINT}", USAGE)
    job_names = [spec.name for spec in job_specs(settings)]
    cutoff = cutoff_for(days)
    if dry_run:  # read-only, as `size` and `health` read it
        done = read_instance(
            home,
            lambda instance: prune(
                instance, job_names, cutoff, NO_LIMIT, dry_run=True, storage=home / "storage"
            ),
        )
    else:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            done = prune(instance, job_names, cutoff, NO_LIMIT)
    yield f"Runs finished more than {days} day(s) ago: {done.summary(dry_run)}."
    for (job, kind), count in sorted(done.by_job.items()):
        yield f"  {job:<16} {kind:<8} {count:>8,}"
