"""Redis Cluster: the same caches as on one Redis, through a failover and a slot migration.

A local cluster of three primaries and three replicas (the stack's `--with-redis-cluster`, on
ports of this module's own) serves every test here. `REDIS_URL` names one node and nothing else
changes: the resource sees the cluster and routes each key to its primary.
"""

import os
import signal
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import orjson
import pytest
import redis
import trustme

from nova_assets.core.contract import iso_z, permanent_reason
from nova_assets.core.jobs import windows
from nova_assets.core.resources import RedisCacheResource
from nova_assets.defs.feeds.assets import build_warmed_feeds_asset
from nova_assets.defs.suggestions.assets import DEFAULT_TTL_SEC, build_suggested_users_asset
from nova_assets.defs.trending.assets import build_trending_asset
from nova_assets.local import seed
from nova_assets.local.stack import REDIS_CLUSTER_BUS_OFFSET, free_port_range
from nova_assets_tests.conftest import REDIS_URL, RedisCluster
from nova_assets_tests.factories import reset

AS_OF = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
SPEC = seed.SeedSpec(
    seed=11, users=3_000, posts=6_000, events=60_000, follows_per_user=20, as_of=AS_OF
)
FEED_TTL = 120
WINDOWS = {w.name: w for w in windows()}


@pytest.fixture(scope="module")
def seeded(clickhouse):
    reset(clickhouse)
    seed.generate(clickhouse, SPEC)
    return clickhouse


@pytest.fixture
def cluster_cache(redis_cluster: RedisCluster) -> Iterator[RedisCacheResource]:
    """A cache resource on the cluster, its keys under a prefix of the test's own."""
    resource = RedisCacheResource(url=redis_cluster.url, key_prefix=f"t{uuid.uuid4().hex[:8]}:")
    yield resource
    resource.close()


@pytest.fixture(scope="module")
def reference(seeded) -> dict[str, tuple[dict, int]]:
    """What the five assets serve on one Redis, on the same data: every key, value and TTL."""
    single = RedisCacheResource(url=REDIS_URL, key_prefix=f"ref{uuid.uuid4().hex[:8]}:")
    materialize(cache_assets(), seeded, single)
    found = served(single)
    single.client().delete(*(single.key_prefix + key for key in found))
    single.close()
    return found


def cache_assets() -> list[dg.AssetsDefinition]:
    """The three families' five assets, as the code location builds them."""
    return [
        *(build_trending_asset(window) for window in WINDOWS.values()),
        build_suggested_users_asset(chunk_users=500),
        build_warmed_feeds_asset(FEED_TTL),
    ]


def materialize(assets, clickhouse, redis_cache) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        assets,
        resources={"clickhouse": clickhouse, "redis_cache": redis_cache},
        run_config={
            "ops": {a.node_def.name: {"config": {"as_of": iso_z(AS_OF)}} for a in assets},
        },
    )


def served(redis_cache: RedisCacheResource, keys=None) -> dict[str, tuple[dict | None, int]]:
    """Keys under the resource's prefix, unprefixed: value without `generated_at`, and TTL.

    Without `keys`, every key a SCAN finds (on a cluster the scan visits every primary; during
    a slot migration a key may move between two nodes' scans, so name the keys then). Scores
    are rounded to 9 decimals: the engine sums in parallel, so two runs on the same data may
    differ in a float's last bits.
    """
    client = redis_cache.client()
    if keys is None:
        pattern = redis_cache.key_prefix + "*"
        keys = sorted(
            k.decode().removeprefix(redis_cache.key_prefix) for k in client.scan_iter(match=pattern)
        )
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.get(redis_cache.key_prefix + key)
        pipe.ttl(redis_cache.key_prefix + key)
    replies = pipe.execute()
    found = {}
    for key, raw, ttl in zip(keys, replies[::2], replies[1::2], strict=True):
        value = None if raw is None else orjson.loads(raw)
        if value is not None:
            value.pop("generated_at")
            for item in value["items"]:
                if "score" in item:
                    item["score"] = round(item["score"], 9)
        found[key] = (value, ttl)
    return found


def assert_whole_with_ttl(found: dict[str, tuple[dict, int]]) -> None:
    for key, (value, ttl) in found.items():
        assert isinstance(value["items"], list), key
        assert 0 < ttl <= ttl_of(key), (key, ttl)


def ttl_of(key: str) -> int:
    if key.startswith("trending:"):
        return WINDOWS[key.split(":")[1]].ttl_sec
    return FEED_TTL if key.startswith("feed:") else DEFAULT_TTL_SEC


def test_the_three_families_serve_the_same_keys_on_a_cluster_as_on_one_redis(
    seeded, reference, cluster_cache
):
    assert cluster_cache.cluster
    materialize(cache_assets(), seeded, cluster_cache)

    clustered = served(cluster_cache)
    assert {key.split(":")[0] for key in clustered} == {"trending", "suggested_users", "feed"}
    assert len(clustered) > 1000
    assert clustered.keys() == reference.keys()
    for key, (value, ttl) in clustered.items():
        assert value == reference[key][0], key
    assert_whole_with_ttl(clustered)
    # The keys really are spread: every primary holds some of them.
    pattern = cluster_cache.key_prefix + "*"
    per_primary = {
        node.name: sum(1 for _ in node.redis_connection.scan_iter(match=pattern, count=1000))
        for node in cluster_cache.client().get_primaries()
    }
    assert len(per_primary) == 3 and all(per_primary.values()), per_primary


def test_an_empty_ranking_never_replaces_a_served_one_on_a_cluster(cluster_cache):
    keys = [cluster_cache.key("feed", user) for user in range(40)]
    assert cluster_cache.set_many_json([(k, {"items": [1]}, 60) for k in keys[:20]]) == 20
    # Empty values over served ones are kept out; over missing keys they are written.
    assert cluster_cache.set_many_json([(k, {"items": []}, 60) for k in keys]) == 20
    replies = [cluster_cache.get_json(k) for k in keys]
    assert replies == [{"items": [1]}] * 20 + [{"items": []}] * 20
    ranking = cluster_cache.key("trending", "1h")
    assert cluster_cache.replace_ranking(ranking, {"items": [7]}, 30)
    assert not cluster_cache.replace_ranking(ranking, {"items": []}, 30)
    assert cluster_cache.get_json(ranking) == {"items": [7]}
    assert 0 < cluster_cache.ttl(ranking) <= 30


class KillingPrimary(RedisCacheResource):
    """Kills a Redis process (SIGKILL) as the run is about to write its `kill_at_batch`th batch."""

    victim_pid: int
    kill_at_batch: int = 3

    def set_many_json(self, entries):
        with BATCHES_LOCK:
            BATCHES.append(len(BATCHES) + 1)
            if BATCHES[-1] == self.kill_at_batch:
                os.kill(self.victim_pid, signal.SIGKILL)
        return super().set_many_json(entries)


BATCHES: list[int] = []
BATCHES_LOCK = threading.Lock()


def test_a_primary_killed_mid_run_fails_over_and_the_run_succeeds(seeded, reference, redis_cluster):
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    user = min(int(k.split(":")[1]) for k in reference if k.startswith("suggested_users:"))
    victim_port = redis_cluster.primary_port_of(f"{prefix}suggested_users:{user}")
    BATCHES.clear()
    resource = KillingPrimary(
        url=redis_cluster.url, key_prefix=prefix, victim_pid=redis_cluster.pid_of(victim_port)
    )
    try:
        result = materialize([build_suggested_users_asset(chunk_users=200)], seeded, resource)
        assert result.success
        assert len(BATCHES) > 3
        # The killed node's replica serves its slots now.
        assert redis_cluster.primary_port_of(f"{prefix}suggested_users:{user}") != victim_port
        # Read back through a node that is up (REDIS_URL's node may be the one killed).
        alive = next(port for port in redis_cluster.ports if port != victim_port)
        check = RedisCacheResource(url=f"redis://127.0.0.1:{alive}/0", key_prefix=prefix)
        found = served(check)
        check.close()
        expected = {k: v for k, v in reference.items() if k.startswith("suggested_users:")}
        assert found.keys() == expected.keys()
        assert all(found[k][0] == expected[k][0] for k in found)
        assert_whole_with_ttl(found)
    finally:
        resource.close()
        redis_cluster.restore()


def test_slots_migrated_during_feeds_writes_lose_no_key(
    seeded, reference, redis_cluster, cluster_cache
):
    asset = build_warmed_feeds_asset(FEED_TTL)
    expected = {k: v for k, v in reference.items() if k.startswith("feed:")}
    source, target = redis_cluster.primary_ids()[:2]
    command = [
        "redis-cli", "--cluster", "reshard", f"127.0.0.1:{redis_cluster.ports[0]}",
        "--cluster-from", source, "--cluster-to", target, "--cluster-slots", "3000",
        "--cluster-yes", "--cluster-pipeline", "10",
    ]  # fmt: skip
    reshard = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    overlapped = 0
    try:
        while reshard.poll() is None:
            materialize([asset], seeded, cluster_cache)
            # A write counts when the migration was still going on after it ended.
            overlapped += reshard.poll() is None
            found = served(cluster_cache, keys=list(expected))
            assert all(found[k][0] == expected[k][0] for k in expected)
            assert_whole_with_ttl(found)
    finally:
        _, errors = reshard.communicate(timeout=120)
    assert reshard.returncode == 0, errors
    assert overlapped >= 1, "no feeds write ran during the migration"
    redis_cluster.wait_ok()


def test_credentials_in_the_url_reach_every_node(redis_cluster):
    password = "p@ss/w:rd#1"
    quoted = urllib.parse.quote(password, safe="")
    for port in redis_cluster.ports:
        redis_cluster.node(port).acl_setuser(
            "nova", enabled=True, passwords=[f"+{password}"], keys=["*"], commands=["+@all"]
        )
    url = redis_cluster.url.replace("redis://", f"redis://nova:{quoted}@")
    resource = RedisCacheResource(url=url, key_prefix=f"t{uuid.uuid4().hex[:8]}:")
    wrong = RedisCacheResource(url=url.replace(quoted, "wrong"), key_prefix=resource.key_prefix)
    try:
        keys = [resource.key("feed", user) for user in range(30)]
        assert resource.set_many_json([(k, {"items": [1]}, 60) for k in keys]) == 30
        assert resource.cluster
        assert all(55 <= ttl <= 60 for ttl in resource.ttls(keys))
        with pytest.raises(redis.AuthenticationError) as refused:
            wrong.set_many_json([(keys[0], {"items": [2]}, 60)])
        assert permanent_reason(refused.value) is not None
    finally:
        resource.close()
        wrong.close()
        for port in redis_cluster.ports:
            redis_cluster.node(port).acl_deluser("nova")


@pytest.fixture
def tls_cluster(tmp_path, service_binaries) -> Iterator[tuple[str, Path]]:
    """Three primaries that speak only TLS, client and bus, with a test CA: (url, CA file)."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server.cert_chain_pems[0].write_to_path(str(cert_file))
    server.private_key_pem.write_to_path(str(key_file))
    first = free_port_range(3, bus_offset=REDIS_CLUSTER_BUS_OFFSET)
    tls = ["--tls-cert-file", cert_file, "--tls-key-file", key_file, "--tls-ca-cert-file", ca_file]
    processes = []
    try:
        for port in range(first, first + 3):
            (tmp_path / str(port)).mkdir()
            command = [
                "redis-server", "--port", "0", "--tls-port", port, "--bind", "127.0.0.1",
                "--dir", tmp_path / str(port), "--save", "", "--appendonly", "no",
                "--cluster-enabled", "yes", "--tls-cluster", "yes", "--tls-auth-clients", "no",
                *tls,
            ]  # fmt: skip
            processes.append(subprocess.Popen([str(part) for part in command]))
        nodes = [f"127.0.0.1:{port}" for port in range(first, first + 3)]
        create = ["redis-cli", "--tls", "--cacert", str(ca_file), "--cluster", "create", *nodes]
        for _ in range(100):  # until the three nodes accept connections
            created = subprocess.run(
                [*create, "--cluster-replicas", "0", "--cluster-yes"],
                check=False,
                capture_output=True,
                text=True,
            )
            if created.returncode == 0:
                break
            time.sleep(0.1)
        assert created.returncode == 0, created.stdout + created.stderr
        yield f"rediss://127.0.0.1:{first}/0?ssl_ca_certs={ca_file}", ca_file
    finally:
        for process in processes:
            process.kill()
            process.wait()


def test_a_tls_cluster_is_served_through_rediss(tls_cluster):
    url, _ = tls_cluster
    resource = RedisCacheResource(url=url, key_prefix="tls:")
    try:
        keys = [resource.key("feed", user) for user in range(30)]
        deadline = time.monotonic() + 30
        while True:  # until every node has learned the slot map that redis-cli assigned
            try:
                written = resource.set_many_json([(k, {"items": [1]}, 60) for k in keys])
                break
            except redis.exceptions.ClusterDownError:
                assert time.monotonic() < deadline
                resource.close()
                time.sleep(0.2)
        assert resource.cluster and written == 30
        assert resource.get_json(keys[7]) == {"items": [1]}
        assert len(resource.client().get_primaries()) == 3
    finally:
        resource.close()


def test_a_database_other_than_0_fails_at_once_naming_the_fix(seeded, redis_cluster):
    resource = RedisCacheResource(url=redis_cluster.url.replace("/0", "/15"), key_prefix="db15:")
    asset = build_trending_asset(WINDOWS["1h"])
    result = dg.materialize(
        [asset],
        resources={"clickhouse": seeded, "redis_cache": resource},
        run_config={"ops": {asset.node_def.name: {"config": {"as_of": iso_z(AS_OF)}}}},
        raise_on_error=False,
    )
    assert not result.success
    failure = result.failure_data_for_node(asset.node_def.name)
    assert "end REDIS_URL in /0" in failure.error.message
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert retries == []
