"""What the local run launcher takes from Dagster's internals: the run command and its modules.

The launcher (`nova_assets.local.launcher`) subclasses the public `dg.DefaultRunLauncher`; these
are the private pieces it also needs, each checked by `nova_assets_tests/test_internals.py`.
"""

import dagster as dg
from dagster._core.launcher import LaunchRunContext
from dagster._grpc.types import ExecuteRunArgs

__all__ = [
    "RUN_EXECUTION_MODULES",
    "LaunchRunContext",
    "execute_run_command",
    "remember_launched",
    "run_dagster_api",
]

RUN_EXECUTION_MODULES = (
    "dagster._cli.api",
    "dagster._core.execution.api",
    "dagster._core.storage.event_log",
    "dagster._core.storage.runs",
    "dagster._core.executor.in_process",
    "dagster._core.definitions.antlr_asset_selection.antlr_asset_selection",
)
"""Dagster's modules that `dagster api execute_run` imports to execute a run (its CLI, the
execution API, the storages, the in-process executor, the asset selection parser)."""


def execute_run_command(run: dg.DagsterRun, instance: dg.DagsterInstance) -> list[str]:
    """The `dagster api` arguments that execute `run` on `instance`.

    The command Dagster's Docker and Kubernetes launchers start: `execute_run` with the run's
    serialized `ExecuteRunArgs`.
    """
    args = ExecuteRunArgs(
        job_origin=run.job_code_origin, run_id=run.run_id, instance_ref=instance.get_ref()
    )
    return ["execute_run", dg.serialize_value(args)]


def run_dagster_api(command: list[str]) -> None:
    """Run `dagster api <command>` in this process, as the `dagster` executable would."""
    from dagster._cli.api import api_cli

    api_cli.main(args=command, prog_name="dagster api", standalone_mode=False)


def remember_launched(launcher: dg.DefaultRunLauncher, run_id: str) -> None:
    """Count `run_id` among the launcher's runs, as its own `launch_run` does (`join` waits)."""
    launcher._run_ids.add(run_id)  # noqa: SLF001
