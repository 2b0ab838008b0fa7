"""The deployment's resources and executor, bound once from the validated settings (§8).

URLs that may carry a secret are bound through `dg.EnvVar`, so the UI shows only the variable's
name. Every job runs its steps in the run's own process unless its spec names another executor
(`core/jobs.py`): each job is one step, so a process per step would buy no parallelism and cost a
Python start-up and a code load per run.
"""

import os
import warnings

import dagster as dg

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
    """The five resources of a deployment with these settings.

    The embedded engine must be installed (the `local` extra) when the settings name it: without
    it the load fails here, naming the extra, rather than every run failing on its first query.
    """
    require_embedded_engine(settings.clickhouse_url)
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


defs = dg.Definitions(resources=build_resources(load_settings()), executor=dg.in_process_executor)
