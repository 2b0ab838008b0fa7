"""The nova_assets code location: everything under `defs/`, with resources chosen once here.

`defs/` holds one folder per system (trending, suggestions, feeds, the DLQ) and the jobs,
schedules and metrics around them; Dagster's defs-folder loader collects them, as `dg` does for
this project. Resources are bound here, once per deployment, from the validated settings (the
URLs that may carry a secret through `dg.EnvVar`, so the UI shows only the variable's name); the
local demo traffic joins only when ClickHouse is the embedded engine, imported only then: a
production install (no `local` extra, no chdb) loads this module against a ClickHouse server.
"""

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import dagster as dg

import nova_assets.defs
from nova_assets.core.resources import (
    AlertWebhookResource,
    ClickHouseResource,
    JobMetricsResource,
    KafkaDLQResource,
    RedisCacheResource,
)
from nova_assets.core.resources.clickhouse import require_embedded_engine
from nova_assets.core.settings import Settings, load_settings


def _secret_or(variable: str, value: str) -> str | dg.EnvVar:
    """Bind a URL that may carry a secret through `dg.EnvVar`, so the UI shows only its name.

    Unset, the variable's default (`value`, which holds no secret) is bound as it is. Set, the
    resource reads the variable itself; the settings already refused a value with spaces around
    it, so what it reads is exactly what was validated.
    """
    return dg.EnvVar(variable) if os.environ.get(variable, "").strip() else value


def _job_metrics(gateway: str | dg.EnvVar) -> JobMetricsResource:
    # dagster-prometheus marks its resource beta; the warning says nothing an operator can act on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        return JobMetricsResource(gateway=gateway)


def build_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    return {
        "clickhouse": ClickHouseResource(url=_secret_or("CLICKHOUSE_URL", settings.clickhouse_url)),
        "redis_cache": RedisCacheResource(
            url=_secret_or("REDIS_URL", settings.redis_url), key_prefix=settings.redis_key_prefix
        ),
        "kafka_dlq": KafkaDLQResource(
            brokers=",".join(settings.kafka_brokers),
            topic=settings.dlq_topic,
            passthrough_env=list(settings.kafka_passthrough),
        ),
        "job_metrics": _job_metrics(_secret_or("PUSHGATEWAY_URL", settings.pushgateway_url)),
        "alerts": AlertWebhookResource(
            url=_secret_or("ALERT_WEBHOOK_URL", settings.alert_webhook_url or "") or None,
            ui_url=settings.dagster_ui_url,
        ),
    }


def build_definitions(
    settings: Settings,
    executor: dg.ExecutorDefinition = dg.in_process_executor,
    resources: Mapping[str, dg.ConfigurableResource] | None = None,
) -> dg.Definitions:
    """The code location: the `defs/` folder, the local demo and the resources.

    `resources` are those of `build_resources` unless given: tests and benchmarks bind others,
    and pass another executor.
    """
    # The package itself is the project root: no pyproject.toml is needed at run time, so an
    # installed image loads the same folder as a checkout.
    tree = dg.ComponentTree.from_module(
        defs_module=nova_assets.defs, project_root=Path(nova_assets.defs.__file__).parents[2]
    )
    with warnings.catch_warnings():
        # Modules of plain helpers (no definitions) go through a loader Dagster marks preview.
        warnings.simplefilter("ignore", dg.PreviewWarning)
        folder = tree.build_defs()
    # Every job runs its steps in the run's own process by default: each job is one step, so a
    # process per step would buy no parallelism and cost a Python start-up and a code load per
    # run (README, "Run execution"). The benchmarks pass the multiprocess executor to compare.
    return dg.Definitions.merge(
        folder,
        _local_definitions(settings),
        dg.Definitions(
            resources=dict(build_resources(settings) if resources is None else resources),
            executor=executor,
        ),
    )


def _local_definitions(settings: Settings) -> dg.Definitions:
    """Live demo traffic, only against the local embedded engine, never a real server.

    The embedded engine must be installed (the `local` extra): without it the load fails here,
    naming the extra, rather than every run failing on its first query.
    """
    if not settings.embedded_clickhouse:
        return dg.Definitions()
    require_embedded_engine(settings.clickhouse_url)
    from nova_assets.local.demo import demo_definitions

    return demo_definitions()


defs = build_definitions(load_settings())
