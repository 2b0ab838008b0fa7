"""The nova_assets code location: one `Definitions`, its resources chosen once per deployment."""

import os
import warnings

import dagster as dg

from nova_assets import feeds, seed, suggestions
from nova_assets.dlq import build_dlq_replay_sensor, dlq_publisher
from nova_assets.metrics import build_job_metrics_sensor
from nova_assets.resources import (
    AlertWebhookResource,
    ClickHouseResource,
    JobMetricsResource,
    KafkaDLQResource,
    RedisCacheResource,
)
from nova_assets.schedules import JobSpec, build_jobs_and_schedules, build_schedule
from nova_assets.settings import Settings, interval_to_cron
from nova_assets.trending import build_trending_assets, windows


def _secret_or(variable: str, value: str) -> str | dg.EnvVar:
    """Bind a URL that may carry a password through `dg.EnvVar`, so the UI shows only its name."""
    return dg.EnvVar(variable) if os.environ.get(variable, "").strip() else value


def _job_metrics(gateway: str) -> JobMetricsResource:
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
        "job_metrics": _job_metrics(settings.pushgateway_url),
        "alerts": AlertWebhookResource(
            url=_secret_or("ALERT_WEBHOOK_URL", settings.alert_webhook_url or "") or None,
            ui_url=settings.dagster_ui_url,
        ),
    }


def job_specs(settings: Settings) -> list[JobSpec]:
    """One job per cache family and its cadence (DESIGN.md §5)."""
    trending = [
        JobSpec(w.job_name, w.asset_name, interval_to_cron(w.refresh_sec))
        for w in windows(settings.trending_interval_sec)
    ]
    return [
        *trending,
        JobSpec(suggestions.JOB_NAME, suggestions.ASSET_NAME, settings.suggestion_cron),
        JobSpec(feeds.JOB_NAME, feeds.ASSET_NAME, interval_to_cron(feeds.REFRESH_SEC)),
    ]


settings = Settings.from_env()
specs = job_specs(settings)
jobs, schedules = build_jobs_and_schedules(specs)
# Live demo traffic only runs against the local embedded engine, never against a real server.
demo_jobs, demo_schedules = (
    (
        [seed.demo_traffic],
        [
            build_schedule(
                JobSpec(seed.DEMO_TRAFFIC_JOB, "demo events", "* * * * *"), seed.demo_traffic
            )
        ],
    )
    if settings.embedded_clickhouse
    else ([], [])
)

defs = dg.Definitions(
    assets=[
        *build_trending_assets(settings.trending_interval_sec),
        suggestions.build_suggested_users_asset(
            settings.suggestion_ttl_sec, refresh_sec=settings.suggestion_interval_sec
        ),
        feeds.build_warmed_feeds_asset(settings.feed_ttl_sec),
    ],
    jobs=[*jobs, *demo_jobs],
    schedules=[*schedules, *demo_schedules],
    sensors=[
        dlq_publisher,
        build_dlq_replay_sensor(jobs, {spec.name: [spec.asset] for spec in specs}),
        build_job_metrics_sensor([job.name for job in jobs]),
    ],
    resources=build_resources(settings),
)
