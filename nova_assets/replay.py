"""`nova-assets dlq replay RUN_ID`: run a failed run's assets again, with its run config.

The replay is planned as the `dlq_replay` sensor plans it (`plan_replays`), from the instance that
`health` reads (DAGSTER_HOME, else `<NOVA_HOME>/dagster`), opened without writing to it. Each
replay run is then launched with `dagster job launch` on that instance, which submits it to the
instance's run coordinator: it waits its turn under the same limits as any run. Every failure is
a `CommandError`: one line and an exit code (`nova_assets/cli_errors.py`).
"""

import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg

from nova_assets.cli_errors import USAGE, CommandError
from nova_assets.core.jobs import job_specs, jobs_of_run
from nova_assets.core.settings import Settings
from nova_assets.defs.dlq.sensors import Replay, plan_replays
from nova_assets.health import HINT, instance_home
from nova_assets.internals.readonly_instance import UnreadableInstance, read_instance

LOCATION_NAME = "nova_assets"
"""The code location's name, as workspace.yaml gives it to `dagster dev`."""


def _planned(settings: Settings, instance: dg.DagsterInstance, run_id: str) -> list[Replay] | None:
    """The replays of `run_id` (None when the instance has no such run)."""
    failed = instance.get_run_by_id(run_id)
    if failed is None:
        return None
    specs = job_specs(settings)
    owners = set(jobs_of_run(instance, failed, specs))
    assets = [spec.asset for spec in specs if spec.name in owners]
    return plan_replays(instance, specs, run_id, assets, failed.job_name)


def plan(settings: Settings, home: Path, run_id: str) -> list[Replay]:
    """The replay runs of failed run `run_id`, one per job whose asset it materializes."""
    try:
        replays = read_instance(home, lambda instance: _planned(settings, instance, run_id))
    except UnreadableInstance as exc:
        raise CommandError(
            f"cannot read the Dagster instance in {home}: {exc}{HINT}", USAGE
        ) from None
    if replays is None:
        raise CommandError(f"the instance has no run {run_id!r} (in {home})")
    if not replays:
        raise CommandError(f"run {run_id} materializes no asset of {LOCATION_NAME}")
    return replays


def replay(settings: Settings, run_id: str) -> Iterator[str]:
    """Launch each replay run of `run_id`; yields one line per run launched."""
    home = instance_home(settings)
    replays = plan(settings, home, run_id)
    dagster = str(Path(sys.executable).parent / "dagster")
    with tempfile.TemporaryDirectory() as scratch:
        workspace = Path(scratch) / "workspace.yaml"
        workspace.write_text(
            "load_from:\n  - python_module:\n      module_name: nova_assets.definitions\n"
            f"      location_name: {LOCATION_NAME}\n"
        )
        for planned in replays:
            new_run = str(uuid.uuid4())
            launched = subprocess.run(
                [
                    *(dagster, "job", "launch", "-w", str(workspace), "-j", planned.job_name),
                    *("--run-id", new_run, "--tags", json.dumps(planned.tags)),
                    *("--config-json", json.dumps(planned.run_config)),
                ],
                capture_output=True,
                text=True,
                check=False,
                env={**os.environ, "DAGSTER_HOME": str(home)},
            )
            if launched.returncode != 0:
                # Dagster prints its traceback; its last line is the error itself.
                said = [line.strip() for line in launched.stderr.splitlines() if line.strip()]
                reason = said[-1] if said else f"exit code {launched.returncode}"
                raise CommandError(f"launching {planned.job_name} failed: {reason}")
            yield f"Launched run {new_run} of {planned.job_name}, replaying run {run_id}."
