"""Retries: capped exponential waits, permanent faults failing at once, transient ones retried.

Runs real steps through Dagster against real Redis processes (a private one the test can stop or
fill up) and the real embedded ClickHouse, reading the waits and retry counts back from the run's
events.
"""

import itertools
import json
import threading
import time
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
import redis

from nova_assets import definitions
from nova_assets.core.contract import (
    STEP_RETRY_POLICY,
    ConfigurationError,
    DataContractError,
    fail_fast_on_permanent_faults,
    parse_utc,
)
from nova_assets.core.jobs import job_specs, windows
from nova_assets.core.resources import RedisCacheResource
from nova_assets.core.settings import Settings
from nova_assets.defs.dlq import sensors
from nova_assets.defs.dlq import writing as dlq
from nova_assets.defs.suggestions.assets import build_suggested_users_asset
from nova_assets.defs.trending.assets import build_trending_asset
from nova_assets.local.stack import StackConfig, down, up
from nova_assets_tests.factories import ago, insert_events, insert_posts, post, reset
from nova_assets_tests.test_trending import AS_OF

TRENDING_1H = windows()[0]


def retry_waits(result) -> list[float]:
    return [
        event.event_specific_data.seconds_to_wait
        for event in result.all_events
        if event.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY
    ]


def test_every_asset_carries_the_production_retry_policy():
    repository = definitions.defs.get_repository_def()
    assets = [a for a in repository.asset_graph.assets_defs if a.is_executable]
    assert assets
    for assets_def in assets:
        for op in assets_def.node_def.iterate_op_defs():
            assert op.retry_policy == dg.RetryPolicy(
                max_retries=5, delay=1, backoff=dg.Backoff.EXPONENTIAL
            ), (assets_def.key, op.name)
    assert STEP_RETRY_POLICY.max_retries == 5


def test_waits_grow_exponentially_and_stay_capped():
    attempts = []

    @dg.asset(
        retry_policy=dg.RetryPolicy(max_retries=5, delay=0.02, backoff=dg.Backoff.EXPONENTIAL)
    )
    def flaky() -> None:
        attempts.append(time.monotonic())
        if len(attempts) <= 4:
            raise ConnectionError("connection refused")

    result = dg.materialize([flaky])
    assert result.success
    # delay * (2^n - 1): the production policy (delay 1 s) waits 1, 3, 7, 15, 31 s.
    assert retry_waits(result) == pytest.approx([0.02, 0.06, 0.14, 0.30])
    production = [STEP_RETRY_POLICY.delay * (2**n - 1) for n in range(1, 6)]
    assert production == [1, 3, 7, 15, 31]
    assert max(production) <= 32
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert all(gap >= wait for gap, wait in zip(gaps, [0.02, 0.06, 0.14, 0.30], strict=True))


# -- permanent faults: no retries -------------------------------------------------------------


@pytest.fixture
def ch(clickhouse):
    reset(clickhouse)
    yield clickhouse
    reset(clickhouse)


def materialize(asset, clickhouse, redis_cache, *, as_of="2026-11-28T12:00:00Z"):
    return dg.materialize(
        [asset],
        resources={"clickhouse": clickhouse, "redis_cache": redis_cache},
        run_config={"ops": {asset.op.name: {"config": {"as_of": as_of}}}},
        raise_on_error=False,
    )


def test_a_missing_table_fails_at_once(ch, redis_cache):
    ch.command("DROP TABLE nova.posts")
    result = materialize(build_trending_asset(TRENDING_1H), ch, redis_cache)
    assert not result.success
    assert retry_waits(result) == []
    [failure] = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert "UNKNOWN_TABLE" in failure.step_failure_data.error.message


def test_a_missing_column_fails_at_once(ch, redis_cache):
    ch.command("DROP TABLE nova.posts")
    ch.command(
        "CREATE TABLE nova.posts (post_id UInt64, created_at DateTime64(3, 'UTC'), "
        "is_deleted UInt8, updated_at DateTime64(3, 'UTC')) ENGINE = MergeTree ORDER BY post_id"
    )
    insert_events(ch, [(ago(AS_OF, minutes=5), 1, 1, "like")])
    result = materialize(build_trending_asset(TRENDING_1H), ch, redis_cache)
    assert not result.success
    assert retry_waits(result) == []
    ch.command("DROP TABLE nova.posts")


def test_data_breaking_the_contract_fails_at_once(redis_cache):
    @dg.asset(retry_policy=STEP_RETRY_POLICY)
    @fail_fast_on_permanent_faults
    def broken_scores(redis_cache: RedisCacheResource) -> None:
        redis_cache.set_json(redis_cache.key("feed", 1), {"items": [{"score": float("nan")}]}, 60)

    result = dg.materialize(
        [broken_scores], resources={"redis_cache": redis_cache}, raise_on_error=False
    )
    assert not result.success
    assert retry_waits(result) == []
    with pytest.raises(DataContractError):
        redis_cache.set_json("k", {"score": float("inf")}, 60)


def test_credentials_redis_refuses_fail_at_once(ch, redis_url):
    wrong_url = redis_url.replace("redis://", "redis://nobody:not-the-password@")
    wrong = RedisCacheResource(url=wrong_url, key_prefix="t:")
    insert_posts(ch, post(1, 1, ago(AS_OF, days=1)))
    insert_events(ch, [(ago(AS_OF, minutes=5), 1, 1, "like")])
    result = materialize(build_trending_asset(TRENDING_1H), ch, wrong)
    assert not result.success
    assert retry_waits(result) == []
    [failure] = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert "REDIS_URL" in failure.step_failure_data.error.message
    assert "not-the-password" not in failure.step_failure_data.error.message


@pytest.mark.parametrize(
    "as_of",
    [
        "yesterday",
        "2026-11-28T12:00:00",
        "2026-13-01T00:00:00Z",
        "0001-01-01T00:00:00+05:00",  # out of range, and astimezone(UTC) would overflow
    ],
)
def test_bad_configuration_fails_at_once(ch, redis_cache, as_of):
    result = materialize(build_trending_asset(TRENDING_1H), ch, redis_cache, as_of=as_of)
    assert not result.success
    assert retry_waits(result) == []
    [failure] = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    message = dlq.describe_error(failure.step_failure_data.error)["message"]
    assert "as_of" in message and "2026-11-28T12:00:00Z" in message
    with pytest.raises(ConfigurationError):
        parse_utc(as_of)


@pytest.mark.parametrize(
    "as_of",
    [
        "0001-01-01T00:00:00Z",
        "0001-01-01T00:00:00+05:00",
        "0001-01-01T00:00:00-14:00",
        "1900-01-01T00:00:00Z",
        "1999-12-31T23:59:59.999Z",
        "9999-12-31T23:59:59.999999Z",
        "9999-12-31T23:59:59-14:00",
        "9999-12-31T23:59:59+14:00",
    ],
)
def test_an_as_of_outside_its_range_is_a_configuration_error(as_of):
    with pytest.raises(ConfigurationError) as caught:
        parse_utc(as_of)
    assert "[2000-01-01T00:00:00Z, now + 1 day = " in str(caught.value)
    assert repr(as_of) in str(caught.value)


def test_an_as_of_two_days_ahead_is_a_configuration_error():
    ahead = datetime.now(UTC) + timedelta(days=2)
    with pytest.raises(ConfigurationError, match=r"outside \[2000-01-01T00:00:00Z, now \+ 1 day"):
        parse_utc(ahead.isoformat())


@pytest.mark.parametrize(
    ("as_of", "expected"),
    [
        ("2000-01-01T00:00:00Z", datetime(2000, 1, 1, tzinfo=UTC)),
        ("1999-12-31T23:30:00-01:00", datetime(2000, 1, 1, 0, 30, tzinfo=UTC)),
        ("2026-11-28T12:00:00.123456+02:00", datetime(2026, 11, 28, 10, 0, 0, 123000, tzinfo=UTC)),
    ],
)
def test_an_as_of_in_range_is_parsed_to_utc_milliseconds(as_of, expected):
    assert parse_utc(as_of) == expected


def test_an_as_of_within_a_day_ahead_is_accepted():
    soon = datetime.now(UTC) + timedelta(hours=23)
    assert parse_utc(soon.isoformat()) == soon.replace(microsecond=soon.microsecond // 1000 * 1000)


# -- transient faults: retried ----------------------------------------------------------------

FAST = dg.RetryPolicy(max_retries=2, delay=0.05, backoff=dg.Backoff.EXPONENTIAL)


@pytest.fixture
def private_redis(tmp_path, service_binaries):
    from nova_assets_tests.conftest import free_ports

    [port] = free_ports(1)
    config = StackConfig(state_dir=tmp_path / ".nova", redis_port=port)
    up(config, services=("redis",))
    yield config
    down(config, services=("redis",))


def _cache(port: int, **overrides) -> RedisCacheResource:
    return RedisCacheResource(url=f"redis://127.0.0.1:{port}/0", key_prefix="t:", **overrides)


def _seeded(ch):
    insert_posts(ch, post(1, 1, ago(AS_OF, days=1)))
    insert_events(ch, [(ago(AS_OF, minutes=5), 1, 1, "like")])
    return ch


def _fail_and_publish(asset, op: str, clickhouse, cache, kafka_dlq):
    """Materialize `asset` to failure, publish it as the DLQ sensor does: (result, message)."""
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [asset],
            resources={"clickhouse": clickhouse, "redis_cache": cache},
            run_config={"ops": {op: {"config": {"as_of": "2026-11-28T12:00:00Z"}}}},
            instance=instance,
            raise_on_error=False,
        )
        assert not result.success
        _, delivered, _ = sensors.publish_failed_runs(
            instance,
            sensors.PublisherCursor(),
            kafka_dlq,
            definitions.defs.resources["alerts"],
            dg.get_dagster_logger(),
            # The publisher handles this code location's runs: those of its jobs' assets.
            job_specs(Settings.from_env({})),
        )
    assert delivered == 1
    [body] = [json.loads(r.value) for r in kafka_dlq.read()]
    return result, body


def test_a_sharded_run_reports_the_retries_of_one_step_not_their_sum(ch, kafka_dlq):
    """Every shard of suggestions fails with Redis down, each after its own two retries."""
    users = range(1, 5)
    insert_posts(ch, [row for u in users for row in post(u, u, ago(AS_OF, days=1))])
    insert_events(ch, [(ago(AS_OF, hours=1), u, u, "like") for u in users])
    asset = build_suggested_users_asset(shard_users=2, retry_policy=FAST)
    _, body = _fail_and_publish(
        asset, "compute_suggested_users", ch, _cache(1, retries=0), kafka_dlq
    )
    assert body["job_name"] == "suggested_users"
    assert body["failed_steps"] == [
        "compute_suggested_users.rank_suggestions[shard_0]",
        "compute_suggested_users.rank_suggestions[shard_1]",
    ]
    assert (body["retry_count"], body["max_retries"]) == (2, 5)


def test_connection_refused_is_retried(ch):
    result = materialize(build_trending_asset(TRENDING_1H, FAST), _seeded(ch), _cache(1, retries=0))
    assert not result.success
    assert len(retry_waits(result)) == 2


def test_a_timeout_is_retried(ch):
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts connections, never answers
    try:
        cache = _cache(silent.getsockname()[1], retries=0, socket_timeout_s=0.2)
        result = materialize(build_trending_asset(TRENDING_1H, FAST), _seeded(ch), cache)
    finally:
        silent.close()
    assert not result.success
    assert len(retry_waits(result)) == 2


def test_redis_out_of_memory_is_retried(ch, private_redis):
    admin = redis.Redis(port=private_redis.redis_port)
    admin.config_set("maxmemory", "1")
    admin.config_set("maxmemory-policy", "noeviction")
    result = materialize(
        build_trending_asset(TRENDING_1H, FAST), _seeded(ch), _cache(private_redis.redis_port)
    )
    assert not result.success
    assert len(retry_waits(result)) == 2
    errors = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert "OutOfMemoryError" in dlq.describe_error(errors[0].step_failure_data.error)["message"]


def test_redis_back_within_the_retry_budget_means_success(ch, private_redis):
    down(private_redis, services=("redis",))
    policy = dg.RetryPolicy(max_retries=5, delay=0.5, backoff=dg.Backoff.EXPONENTIAL)
    restarter = threading.Timer(1.0, lambda: up(private_redis, services=("redis",)))
    restarter.start()
    try:
        result = materialize(
            build_trending_asset(TRENDING_1H, policy),
            _seeded(ch),
            _cache(private_redis.redis_port, retries=0),
        )
    finally:
        restarter.join()
    assert result.success
    assert 1 <= len(retry_waits(result)) < 5
    value = json.loads(redis.Redis(port=private_redis.redis_port).get("t:trending:1h"))
    assert [item["post_id"] for item in value["items"]] == [1]


def test_redis_down_beyond_the_budget_fails_the_run_and_reaches_the_dlq(
    ch, private_redis, kafka_dlq
):
    down(private_redis, services=("redis",))
    result, body = _fail_and_publish(
        build_trending_asset(TRENDING_1H, FAST),
        "trending_posts_1h",
        _seeded(ch),
        _cache(private_redis.redis_port, retries=0),
        kafka_dlq,
    )
    assert body["run_id"] == result.run_id
    assert body["retry_count"] == 2
    assert body["asset_keys"] == ["trending_posts_1h"]
    assert body["error"]["type"] == "ConnectionError"
