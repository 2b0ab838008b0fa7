"""`cache_healer` on a real Redis and a real Dagster instance, one evaluation at a time.

Never-materialized assets are run at once, each once per interval; a missing key or one that
expires before the next tick is healed with its reason; a job with a run in flight is left to
it; Redis down requests nothing, and its return heals at once what a request made before the
outage left missing; and a healing run's materialization says why it ran. With
many jobs to look at and a small budget, each evaluation returns within it and the next goes on
where it stopped, until every job was looked at, as one unbounded evaluation would; a Redis that
never answers costs an evaluation its budget, not the client's timeouts and retries. The
daemon-driven refills (`FLUSHDB`, a first start, Redis down for a minute) are in test_e2e.py.
"""

import json
import math
import time
from urllib.parse import urlsplit

import dagster as dg
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from nova_assets.core.budget import Budget
from nova_assets.core.cache_asset import HEALING_KEYS, REASON_TAG, cache_asset, cache_result
from nova_assets.core.jobs import JOB_TAG, JobSpec, job_specs
from nova_assets.core.resources import RedisCacheResource
from nova_assets.core.settings import Settings
from nova_assets.defs.cache_healing import (
    HealerCursor,
    build_cache_healer,
    find_gaps,
    seconds_to_next_tick,
)
from nova_assets.defs.schedules import cache_jobs
from nova_assets_tests.conftest import GateProxy

SPECS = job_specs(Settings.from_env({}))
BY_ASSET = {spec.asset: spec for spec in SPECS}


def _evaluate(instance, redis_cache, cursor=None):
    healer = build_cache_healer(SPECS, cache_jobs())
    with dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"redis_cache": redis_cache}
    ) as context:
        return healer.evaluate_tick(context)


def _materialized(instance, asset: str, keys: list[str]) -> None:
    instance.report_runless_asset_event(
        dg.AssetMaterialization(asset, metadata={HEALING_KEYS: dg.MetadataValue.json(keys)})
    )


def _all_in_place(instance, redis_cache) -> None:
    """Every asset materialized, each with a key that outlives its next tick."""
    for spec in SPECS:
        key = redis_cache.key("heal", spec.asset)
        redis_cache.client().set(key, "{}", ex=spec.interval_sec * 10)
        _materialized(instance, spec.asset, [key])


def test_never_materialized_assets_are_run_at_once_and_once_per_interval(instance, redis_cache):
    first = _evaluate(instance, redis_cache)
    assert sorted((r.job_name, r.tags[REASON_TAG]) for r in first.run_requests) == sorted(
        (spec.name, "cache_missing") for spec in SPECS
    )
    # The next evaluation, a moment later, requests nothing: once per interval.
    again = _evaluate(instance, redis_cache, first.cursor)
    assert again.run_requests == []
    assert "healing requested 0 s ago and not materialized since" in again.skip_message


def test_a_missing_key_is_healed_with_its_reason(instance, redis_cache):
    _all_in_place(instance, redis_cache)
    assert _evaluate(instance, redis_cache).skip_message == "Every cache is in place."

    redis_cache.client().delete(redis_cache.key("heal", "suggested_users"))
    result = _evaluate(instance, redis_cache)
    assert [(r.job_name, r.tags[REASON_TAG]) for r in result.run_requests] == [
        ("suggested_users", "cache_missing")
    ]


def test_a_second_loss_is_healed_once_the_first_healing_materialized(instance, redis_cache):
    _all_in_place(instance, redis_cache)
    key = redis_cache.key("heal", "trending_posts_7d")
    redis_cache.client().delete(key)
    first = _evaluate(instance, redis_cache)
    assert [r.job_name for r in first.run_requests] == ["trending_7d"]
    # Not materialized since: an hourly job is not asked again within its hour.
    assert _evaluate(instance, redis_cache, first.cursor).run_requests == []
    # The healing run wrote the key; then it is lost again (a second FLUSHDB): healed again.
    time.sleep(0.01)
    redis_cache.client().set(key, "{}", ex=36000)
    _materialized(instance, "trending_posts_7d", [key])
    assert _evaluate(instance, redis_cache, first.cursor).run_requests == []
    redis_cache.client().delete(key)
    again = _evaluate(instance, redis_cache, first.cursor)
    assert [r.job_name for r in again.run_requests] == ["trending_7d"]


def test_a_key_expiring_before_the_next_tick_is_healed(instance, redis_cache):
    _all_in_place(instance, redis_cache)
    spec = BY_ASSET["trending_posts_7d"]
    # Ten seconds into trending_7d's hour: its next tick is 3590 s away.
    now = time.time() // spec.interval_sec * spec.interval_sec + 10
    assert seconds_to_next_tick(spec, now) == spec.interval_sec - 10
    redis_cache.client().expire(redis_cache.key("heal", spec.asset), 600)
    gaps = find_gaps(instance, redis_cache, SPECS, now)
    assert [(g.spec.name, g.reason) for g in gaps] == [("trending_7d", "cache_expiring")]
    # Ten seconds before the tick, the same key outlives it: nothing to heal.
    later = now + spec.interval_sec - 20
    assert find_gaps(instance, redis_cache, SPECS, later) == []


def test_a_job_with_a_run_in_flight_is_left_to_it(instance, redis_cache):
    _all_in_place(instance, redis_cache)
    redis_cache.client().delete(redis_cache.key("heal", "warmed_feeds"))
    running = dg.DagsterRun(
        job_name="cache_warmer",
        run_id="warmer-in-flight",
        status=dg.DagsterRunStatus.STARTED,
        tags={JOB_TAG: "cache_warmer"},
    )
    instance.add_run(running)
    result = _evaluate(instance, redis_cache)
    assert result.run_requests == []
    assert "run warmer-in-flight will refill it" in result.skip_message


@pytest.mark.parametrize("materialized", [False, True])
def test_redis_down_requests_nothing(instance, capsys, materialized):
    """Not even for assets never materialized: a run could not fill their cache either."""
    dead = RedisCacheResource(url="redis://127.0.0.1:1/0", key_prefix="x:", retries=0)
    if materialized:
        _materialized(instance, "trending_posts_1h", ["x:trending:1h"])
    result = _evaluate(instance, dead)
    assert result.run_requests == []
    assert result.skip_message.startswith("Redis did not answer")
    assert "no cache checked this time" in capsys.readouterr().err


def test_a_healing_run_the_outage_failed_does_not_hold_its_asset_back(instance, redis_cache):
    """Redis went away during a healing run: once it answers again, the asset is healed at once.

    Within the interval the asset waits, as after any healing that did not materialize; an
    evaluation that found Redis down forgets the requests made before, so its return does not
    leave the suggestions missing for ten minutes (or `trending:7d` for an hour).
    """
    _all_in_place(instance, redis_cache)
    redis_cache.client().delete(redis_cache.key("heal", "suggested_users"))
    first = _evaluate(instance, redis_cache)
    assert [r.job_name for r in first.run_requests] == ["suggested_users"]
    assert _evaluate(instance, redis_cache, first.cursor).run_requests == []

    dead = RedisCacheResource(url="redis://127.0.0.1:1/0", key_prefix="x:", retries=0)
    down = _evaluate(instance, dead, first.cursor)
    assert down.run_requests == [] and down.skip_message.startswith("Redis did not answer")
    back = _evaluate(instance, redis_cache, down.cursor)
    assert [(r.job_name, r.tags[REASON_TAG]) for r in back.run_requests] == [
        ("suggested_users", "cache_missing")
    ]
    # Once per interval again from this request on.
    assert _evaluate(instance, redis_cache, back.cursor).run_requests == []


def test_a_version_2_cursor_keeps_its_requests():
    stored = {"version": 2, "requested": {"suggested_users": 1.5}, "next": "warmed_feeds"}
    assert HealerCursor.parse(json.dumps(stored)) == HealerCursor(
        {"suggested_users": 1.5}, "warmed_feeds", redis_down=False
    )


@example('{"a": Infinity, "b": NaN, "c": 1}')
@given(
    st.one_of(
        st.text(),
        st.builds(
            json.dumps,
            st.recursive(
                st.none() | st.booleans() | st.floats() | st.text(),
                lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
            ),
        ),
    )
)
def test_any_stored_cursor_parses_and_round_trips(text):
    """Whatever is stored, an evaluation goes on, and no request time waits forever."""
    cursor = HealerCursor.parse(text)
    assert all(math.isfinite(at) for at in cursor.requested.values())
    assert HealerCursor.parse(cursor.serialize()) == cursor


def test_a_healing_run_records_why_it_ran(instance):
    @cache_asset(
        name="healed_cache",
        group="test",
        description="A cache asset of one key.",
        refresh_sec=60,
        checks={},
        metadata={},
    )
    def healed_cache(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        return cache_result({"items": 1}, {}, keys=["nova:cache:healed:1"])

    dg.materialize([healed_cache], instance=instance, tags={REASON_TAG: "cache_missing"})
    event = instance.get_latest_materialization_event(dg.AssetKey("healed_cache"))
    metadata = event.asset_materialization.metadata
    assert metadata["reason"].value == "cache_missing"
    assert metadata[HEALING_KEYS].value == ["nova:cache:healed:1"]
    assert json.loads(json.dumps(metadata["items"].value)) == 1


# -- within the budget ----------------------------------------------------------------------------

BUDGET_S = 0.25
MARGIN_S = 1.0
"""What one evaluation may run past its budget: the look at one job it was in."""
JOBS, IN_FLIGHT = 120, 150


def test_many_missing_caches_are_healed_over_evaluations_each_within_the_budget(
    instance, redis_cache
):
    specs = [
        JobSpec(f"heal_job_{i}", f"heal_asset_{i}", "* * * * *", interval_sec=3600)
        for i in range(JOBS)
    ]
    jobs = [dg.define_asset_job(spec.name, selection=[spec.asset]) for spec in specs]
    # Runs in flight of another job: each job's look reads them all (is one of them its run?).
    for _ in range(IN_FLIGHT):
        instance.add_run(dg.DagsterRun(job_name="other", status=dg.DagsterRunStatus.STARTED))

    def evaluate(seconds: float, cursor: str | None) -> tuple[dg.SensorResult, float]:
        healer = build_cache_healer(specs, jobs, budget=lambda: Budget(seconds))
        with dg.build_sensor_context(
            instance=instance, cursor=cursor, resources={"redis_cache": redis_cache}
        ) as context:
            started = time.monotonic()
            result = healer.evaluate_tick(context)
            return result, time.monotonic() - started

    whole, unbounded_s = evaluate(600, None)
    everything = {(r.job_name, r.tags[REASON_TAG]) for r in whole.run_requests}
    assert len(everything) == JOBS
    assert unbounded_s > BUDGET_S + MARGIN_S, unbounded_s

    requested: set[tuple[str, str]] = set()
    cursor, evaluations, slowest = None, 0, 0.0
    while len(requested) < JOBS:
        evaluations += 1
        assert evaluations < 200, "the healer never went round every job"
        result, took = evaluate(BUDGET_S, cursor)
        slowest = max(slowest, took)
        cursor = result.cursor
        new = {(r.job_name, r.tags[REASON_TAG]) for r in result.run_requests}
        assert not new & requested, "a job was asked for twice within its interval"
        requested |= new
    assert evaluations > 2
    assert slowest < BUDGET_S + MARGIN_S
    assert requested == everything
    # Once round: nothing more within the interval.
    again, _ = evaluate(BUDGET_S, cursor)
    assert again.run_requests == []


def test_a_redis_that_never_answers_costs_the_budget_not_its_timeouts(instance, redis_url):
    """Connections accepted, nothing answered: the evaluation waits its budget, no longer.

    The client's own timeouts and retries would add up to far more.
    """
    gate = GateProxy(urlsplit(redis_url).port)
    gate.hold()
    silent = RedisCacheResource(url=redis_url.replace(":6379/", f":{gate.port}/"), key_prefix="x:")
    healer = build_cache_healer(SPECS, cache_jobs(), budget=lambda: Budget(1.0))
    try:
        with dg.build_sensor_context(
            instance=instance, resources={"redis_cache": silent}
        ) as context:
            started = time.monotonic()
            result = healer.evaluate_tick(context)
            took = time.monotonic() - started
    finally:
        gate.close()
    assert result.run_requests == []
    assert result.skip_message.startswith("Redis did not answer")
    assert took < 1.0 + MARGIN_S
