"""The nova_assets code location: every definition under `defs/`, collected as `dg` does.

`defs/` holds one folder per cache family, the DLQ and the metrics, the jobs and schedules, the
resources bound from the settings (`defs/resources.py`) and the local demo traffic
(`defs/demo.py`, only with the embedded engine). The package itself is the project root: no
pyproject.toml is needed at run time, so an installed image loads the same folder as a checkout.
"""

import warnings
from collections.abc import Mapping
from pathlib import Path

import dagster as dg

import nova_assets.defs


def load_defs() -> dg.Definitions:
    tree = dg.ComponentTree.from_module(
        defs_module=nova_assets.defs, project_root=Path(nova_assets.defs.__file__).parents[2]
    )
    with warnings.catch_warnings():
        # Modules of plain helpers (no definitions) go through a loader Dagster marks preview.
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return tree.build_defs()


def rebind(
    definitions: dg.Definitions,
    *,
    resources: Mapping[str, dg.ConfigurableResource] | None = None,
    executor: dg.ExecutorDefinition | None = None,
) -> dg.Definitions:
    """The same definitions with some resources or the executor replaced (tests, benchmarks)."""
    return dg.Definitions(
        assets=definitions.assets,
        asset_checks=definitions.asset_checks,
        schedules=definitions.schedules,
        sensors=definitions.sensors,
        jobs=definitions.jobs,
        resources={**(definitions.resources or {}), **(resources or {})},
        executor=executor or definitions.executor,
        loggers=definitions.loggers,
        metadata=definitions.metadata,
    )


defs = load_defs()
