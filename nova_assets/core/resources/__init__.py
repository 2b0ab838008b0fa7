"""Resources: the only code that builds clients for ClickHouse, Redis, Kafka and the Pushgateway.

Each resource owns its client's lifecycle (created on first use, closed at teardown), takes its
network timeouts from `base` and exposes small domain methods, so assets and sensors never touch
a client library directly.
"""

from nova_assets.core.resources.clickhouse import (
    CLICKHOUSE_POOL,
    UNKNOWN_TABLE,
    ClickHouseResource,
    names_in_error,
    releases_engine,
    session_tables_lost,
)
from nova_assets.core.resources.kafka import Delivery, KafkaDLQResource, KafkaRecord
from nova_assets.core.resources.observability import AlertWebhookResource, JobMetricsResource
from nova_assets.core.resources.redis_cache import RedisCacheResource, json_dumps

__all__ = [
    "CLICKHOUSE_POOL",
    "UNKNOWN_TABLE",
    "AlertWebhookResource",
    "ClickHouseResource",
    "Delivery",
    "JobMetricsResource",
    "KafkaDLQResource",
    "KafkaRecord",
    "RedisCacheResource",
    "json_dumps",
    "names_in_error",
    "releases_engine",
    "session_tables_lost",
]
