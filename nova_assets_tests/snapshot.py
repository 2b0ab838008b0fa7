"""What the code location exposes, as plain data: the snapshot `test_definitions` compares.

Asset keys with their groups, node names (under which run config goes), each step's pool and
retry policy, checks; jobs with their tags and selections; schedules with their crons; sensors;
resource keys.
Regenerate the stored snapshot after an intended change with
`python -m nova_assets_tests.snapshot > nova_assets_tests/code_location.json`.
"""

import json
import sys
from typing import Any

import dagster as dg


def _freshness(policy: Any) -> list[float] | None:
    if policy is None:
        return None
    return [
        policy.warn_window.to_timedelta().total_seconds(),
        policy.fail_window.to_timedelta().total_seconds(),
    ]


def _retry(policy: dg.RetryPolicy | None) -> list[Any] | None:
    return None if policy is None else [policy.max_retries, policy.delay, policy.backoff.value]


def snapshot(defs: dg.Definitions) -> dict[str, Any]:
    repository = defs.get_repository_def()
    assets: dict[str, Any] = {}
    for assets_def in repository.asset_graph.assets_defs:
        steps = {
            op.name: {"pool": op.pool, "retry": _retry(op.retry_policy)}
            for op in assets_def.node_def.iterate_op_defs()
        }
        for spec in assets_def.specs:
            assets[spec.key.to_user_string()] = {
                "group": spec.group_name,
                "kinds": sorted(spec.kinds),
                "op": assets_def.node_def.name,
                "steps": dict(sorted(steps.items())),
                "checks": sorted(c.name for c in assets_def.check_specs if c.asset_key == spec.key),
                "required_resources": sorted(assets_def.required_resource_keys),
                "freshness_s": _freshness(spec.freshness_policy),
                "metadata": {k: str(v) for k, v in sorted(spec.metadata.items())},
                "description": spec.description,
            }
    jobs = {
        job.name: {
            "tags": dict(sorted(job.tags.items())),
            "ops": sorted(node.name for node in job.graph.node_dict.values()),
            "executor": job.executor_def.name,
        }
        for job in repository.get_all_jobs()
        if not job.name.startswith("__")
    }
    schedules = {
        s.name: {
            "cron": s.cron_schedule,
            "timezone": s.execution_timezone,
            "job": s.job_name,
            "default_status": s.default_status.value,
        }
        for s in repository.schedule_defs
    }
    sensors = {
        s.name: {
            "interval_s": s.minimum_interval_seconds,
            "default_status": s.default_status.value,
        }
        for s in repository.sensor_defs
    }
    return {
        "assets": dict(sorted(assets.items())),
        "jobs": dict(sorted(jobs.items())),
        "schedules": dict(sorted(schedules.items())),
        "sensors": dict(sorted(sensors.items())),
        "resources": sorted(defs.resources or {}),
    }


def main() -> None:
    from nova_assets.definitions import defs

    json.dump(snapshot(defs), sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
