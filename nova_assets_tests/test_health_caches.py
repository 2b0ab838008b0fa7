"""`nova-assets health` judges each cache by what the real Redis serves, not only by the runs.

An instance whose five jobs all succeeded moments ago, each asset's last materialization naming
its keys (one per trending window, three users' for suggestions and feeds): every cache served is
`ok` with its items, `generated_at` age and TTL left; then the same with the caches flushed, one
feed key gone, a key without TTL and a value off the contract, each `cache …` and exit 1; and
with Redis down, each cache says `unreachable` in one table with the reason once, exit 1, no
traceback.
"""

import json
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
import redis

from nova_assets.core.resources import RedisCacheResource
from nova_assets_tests.history import add_history, history_instance
from nova_assets_tests.test_health import (
    COMMAND,
    SPECS,
    _fresh_history,
    _health,
    _report_materializations,
)

USERS = (7, 8, 9)


def _keys(cache: RedisCacheResource) -> dict[str, list[str]]:
    """The keys each asset's materialization records: one per window, three users' for the rest."""
    keys = {f"trending_posts_{w}": [cache.key("trending", w)] for w in ("1h", "24h", "7d")}
    keys["suggested_users"] = [cache.key("suggested_users", u) for u in USERS]
    keys["warmed_feeds"] = [cache.key("feed", u) for u in USERS]
    return keys


def _serve(cache: RedisCacheResource, keys: Mapping[str, list[str]], generated: float) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(generated))
    for written in keys.values():
        for key in written:
            value = {"as_of": stamp, "generated_at": stamp, "items": [{"rank": 1}, {"rank": 2}]}
            cache.set_json(key, value, 600)


def _healthy_home(home: Path, cache: RedisCacheResource) -> dict[str, list[str]]:
    keys = _keys(cache)
    with history_instance(home) as instance:
        add_history(instance, _fresh_history(time.time()))
        _report_materializations(instance, keys)
    return keys


def test_every_cache_served_is_ok_with_its_items_age_and_ttl(
    tmp_path, monkeypatch, capsys, redis_cache
):
    keys = _healthy_home(tmp_path / "home", redis_cache)
    _serve(redis_cache, keys, time.time() - 30)
    code, out, err = _health(
        tmp_path / "home", monkeypatch, capsys, "--json", redis_url=redis_cache.url
    )
    assert (code, err) == (0, "")
    for job in json.loads(out)["jobs"]:
        cache = job["cache"]
        assert job["verdict"] == "ok" and cache["state"] == "served", job
        assert (
            cache["keys_checked"]
            == cache["keys_present"]
            == (1 if "trending" in job["job_name"] else 3)
        )
        assert cache["items"] == 2 * cache["keys_present"]
        assert 29 <= cache["generated_at_age_sec"] < 120
        assert 500 < cache["ttl_left_sec"] <= 600
        assert cache["error"] is None


def _flush(raw: redis.Redis, keys: Mapping[str, list[str]]) -> None:
    raw.delete(*(key for written in keys.values() for key in written))


def _one_feed_gone(raw: redis.Redis, keys: Mapping[str, list[str]]) -> None:
    raw.delete(keys["warmed_feeds"][1])


def _no_ttl(raw: redis.Redis, keys: Mapping[str, list[str]]) -> None:
    raw.persist(keys["suggested_users"][0])


def _off_contract(raw: redis.Redis, keys: Mapping[str, list[str]]) -> None:
    raw.set(keys["trending_posts_24h"][0], b"not json", ex=600)


@pytest.mark.parametrize(
    ("damage", "verdicts"),
    [
        (_flush, {spec.name: "cache missing" for spec in SPECS}),
        (_one_feed_gone, {"cache_warmer": "cache missing"}),
        (_no_ttl, {"suggested_users": "cache no ttl"}),
        (_off_contract, {"trending_24h": "cache unreadable"}),
    ],
)
def test_a_cache_readers_do_not_get_is_not_ok(
    damage, verdicts, tmp_path, monkeypatch, capsys, redis_cache, raw_redis
):
    keys = _healthy_home(tmp_path / "home", redis_cache)
    _serve(redis_cache, keys, time.time())
    damage(raw_redis, keys)
    code, out, err = _health(
        tmp_path / "home", monkeypatch, capsys, "--json", redis_url=redis_cache.url
    )
    assert (code, err) == (1, "")
    jobs = {job["job_name"]: job for job in json.loads(out)["jobs"]}
    assert {name: job["verdict"] for name, job in jobs.items()} == {
        spec.name: verdicts.get(spec.name, "ok") for spec in SPECS
    }
    if damage is _one_feed_gone:
        assert (
            jobs["cache_warmer"]["cache"]["keys_present"],
            jobs["cache_warmer"]["cache"]["keys_checked"],
        ) == (2, 3)


def test_redis_down_is_said_per_cache_in_one_table_without_a_traceback(tmp_path, redis_cache):
    _healthy_home(tmp_path / "home", redis_cache)
    env = os.environ | {
        "DAGSTER_HOME": str(tmp_path / "home"),
        "REDIS_URL": "redis://127.0.0.1:1/0",
    }
    done = subprocess.run([COMMAND, "health"], env=env, capture_output=True, text=True, check=False)
    assert (done.returncode, done.stderr) == (1, "")
    lines = done.stdout.splitlines()
    header = lines[0].split()
    assert header[:2] == ["job", "verdict"] and "cache" in header
    for spec, line in zip(SPECS, lines[1:6], strict=True):
        assert line.startswith(f"{spec.name} ") and " cache unreachable " in line, line
        assert line.split()[-4] == "unreachable"
    assert lines[6].startswith("redis: redis://127.0.0.1:1/0 did not answer: ConnectionError")
    assert lines[-1] == "overall: cache unreachable"
