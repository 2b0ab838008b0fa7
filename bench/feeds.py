"""Benchmark of the warmed feeds, side by side with a per-key baseline in the same run.

    .venv/bin/python bench/feeds.py [--keep DIR]

On the demo dataset (`seed.SeedSpec` defaults: 20 000 users, 200 000 posts, 2 million events, a
fixed as_of): the 1000 feeds ranked in ClickHouse (three staging statements and one query; beside
it, the same as one query) and written in pipelines (20 writers), against a target of 1 s; the same
values written with one `SET … EX` round trip per key, with their JSON serialization and without it
(the transport alone); the same for 10 000 users; both writes of the 1000 feeds again through a
proxy that gives loopback a network's round trip (`latency.py`); and one materialization of the
asset, checks included. Keys go to Redis db 15 under a bench prefix and are deleted afterwards.

The measurements run in a child process: the embedded engine admits one data directory per
process, and the caller (bench/run.py) may already have opened another.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
from common import AS_OF, REDIS_URL, timed

from nova_assets.core.contract import epoch_ms, iso_z
from nova_assets.core.jobs import FEEDS_ASSET as ASSET_NAME
from nova_assets.core.resources import ClickHouseResource, RedisCacheResource, json_dumps
from nova_assets.defs.feeds.assets import (
    FEED_TTL_SEC,
    WRITE_BATCH,
    WRITERS,
    build_warmed_feeds_asset,
    feed_value,
    write_feeds,
)
from nova_assets.defs.feeds.ranking import rank_feeds
from nova_assets.defs.feeds.sql import FEEDS_SQL, STAGES, WARMED_USERS, feeds_parameters
from nova_assets.local import seed

ONE_WAY_MS = 0.1
"""Delay the proxy adds each way; with its own forwarding, a round trip of about half a ms."""
KEY_PREFIX = "bench:feeds:"
TARGET_MS = 1000.0
MANY_USERS = 10_000

RANK = "rank the feeds in ClickHouse (three staging statements and one query)"
ONE_QUERY = "baseline rank: one query, the three staged tables as CTEs"
SERIALIZE = "serialize the values to JSON (inside both writes below)"
PIPELINED_WRITE = f"**write: pipelines of {WRITE_BATCH} keys, {WRITERS} writers**"
PER_KEY_WRITE = "baseline write: one SET … EX round trip per key"
PIPELINED_TRANSPORT = f"transport only (pre-serialized): pipelines of {WRITE_BATCH} keys"
PER_KEY_TRANSPORT = "transport only (pre-serialized): one round trip per key"
TOTAL = "**rank + build values + write**"


def one_query_sql() -> str:
    """The ranking as one query, each staged table a CTE that ClickHouse inlines at every use."""
    body = FEEDS_SQL.strip().removeprefix("WITH\n")
    ctes = ",\n".join(f"{table} AS ({select})" for table, select in STAGES)
    return f"WITH\n{ctes},\n{body}"


def _delete_keys(redis_cache: RedisCacheResource) -> None:
    client = redis_cache.client()
    keys = list(client.scan_iter(match=KEY_PREFIX + "*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])


@contextmanager
def _over_a_network() -> Iterator[RedisCacheResource]:
    """The bench's Redis behind `latency.py`, which holds each chunk back ONE_WAY_MS each way."""
    proxy = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("latency.py")),
            "--target",
            "127.0.0.1:6379",
            "--one-way-ms",
            str(ONE_WAY_MS),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    redis_cache = None
    try:
        port = int(proxy.stdout.readline())
        redis_cache = RedisCacheResource(
            url=f"redis://127.0.0.1:{port}/15", key_prefix=KEY_PREFIX, socket_timeout_s=30.0
        )
        yield redis_cache
    finally:
        if redis_cache is not None:
            redis_cache.close()
        proxy.kill()
        proxy.wait()


def _measure(data_dir: Path) -> list[str]:
    """Child process: seed the demo dataset if needed, measure, return the report's lines."""
    clickhouse = ClickHouseResource(url=f"chdb://{data_dir}")
    redis_cache = RedisCacheResource(url=REDIS_URL, key_prefix=KEY_PREFIX)
    lines = []
    if seed.is_empty(clickhouse):
        summary = seed.generate(clickhouse, seed.SeedSpec(as_of=AS_OF))
        lines.append(f"seeded the demo dataset: {summary.describe()}")
    [(events_24h, active_users)] = clickhouse.query_rows(
        "SELECT count(), uniqExact(user_id) FROM nova.engagement_events "
        "WHERE event_time > fromUnixTimestamp64Milli({start:Int64}, 'UTC') "
        "AND event_time <= fromUnixTimestamp64Milli({end:Int64}, 'UTC')",
        {"start": epoch_ms(AS_OF) - 86_400_000, "end": epoch_ms(AS_OF)},
    )
    lines.append(
        f"as_of {iso_z(AS_OF)}: {events_24h:,} events from {active_users:,} users in the last "
        "24 h; figures are medians of 5 runs (3 for 10 000 users) after a warm-up run."
    )

    def values_for(feeds):
        now = datetime.now(UTC)
        return [feed_value(feed, AS_OF, now) for feed in feeds]

    def end_to_end(users: int) -> int:
        values = values_for(rank_feeds(clickhouse, AS_OF, users))
        return write_feeds(redis_cache, values, FEED_TTL_SEC)

    def per_key(values, target: RedisCacheResource = redis_cache) -> int:
        for value in values:
            target.set_json(target.key("feed", value["user_id"]), value, FEED_TTL_SEC)
        return len(values)

    client = redis_cache.client()

    def transport(raw: list[tuple[str, str]], pipelined: bool) -> None:
        """Pre-serialized values: the network and Redis alone, one thread."""
        if not pipelined:
            for key, text in raw:
                client.set(key, text, ex=FEED_TTL_SEC)
            return
        for start in range(0, len(raw), WRITE_BATCH):
            pipe = client.pipeline(transaction=False)
            for key, text in raw[start : start + WRITE_BATCH]:
                pipe.set(key, text, ex=FEED_TTL_SEC)
            pipe.execute()

    rows: dict[str, dict[int, float]] = {}

    def record(label: str, users: int, ms: float) -> None:
        rows.setdefault(label, {})[users] = ms

    try:
        rtt_ms, _ = timed(lambda: [client.ping() for _ in range(1000)], 3)
        for users, repeat in ((WARMED_USERS, 5), (MANY_USERS, 3)):
            rank_ms, feeds = timed(lambda u=users: rank_feeds(clickhouse, AS_OF, u), repeat)
            record(RANK, users, rank_ms)
            parameters = feeds_parameters(AS_OF, users)
            one_ms, rows_one = timed(
                lambda p=parameters: clickhouse.query_rows(one_query_sql(), p), repeat
            )
            record(ONE_QUERY, users, one_ms)
            if [(int(r[0]), [int(p) for p in r[2]]) for r in rows_one] != [
                (f.user_id, [i["post_id"] for i in f.items]) for f in feeds
            ]:
                raise SystemExit("the one-query baseline ranks other feeds")
            values = values_for(feeds)
            json_ms, texts = timed(lambda v=values: [json_dumps(x) for x in v], repeat)
            record(SERIALIZE, users, json_ms)
            write_ms, _ = timed(lambda v=values: write_feeds(redis_cache, v, FEED_TTL_SEC), repeat)
            record(PIPELINED_WRITE, users, write_ms)
            per_key_ms, _ = timed(lambda v=values: per_key(v), 3)
            record(PER_KEY_WRITE, users, per_key_ms)
            keys = [redis_cache.key("feed", v["user_id"]) for v in values]
            raw = list(zip(keys, texts, strict=True))
            pipe_ms, _ = timed(lambda r=raw: transport(r, pipelined=True), repeat)
            record(PIPELINED_TRANSPORT, users, pipe_ms)
            one_ms, _ = timed(lambda r=raw: transport(r, pipelined=False), 3)
            record(PER_KEY_TRANSPORT, users, one_ms)
            total_ms, written = timed(lambda u=users: end_to_end(u), repeat)
            record(TOTAL, users, total_ms)
            if written != len(feeds):
                raise SystemExit(f"wrote {written} keys for {len(feeds)} feeds")
            sample = values[0]
            served = redis_cache.get_json(redis_cache.key("feed", sample["user_id"]))
            if served is None or served["items"] != json.loads(json_dumps(sample))["items"]:
                raise SystemExit("the served feed differs from the feed computed")
            lengths = [len(v["items"]) for v in values]
            lines.append(
                f"{users:,} feeds: {sum(lengths):,} items ({sum(map(len, texts)) / 1e6:.1f} MB "
                f"of JSON), {lengths.count(0)} empty, median length "
                f"{statistics.median(lengths):.0f}."
            )

        values = values_for(rank_feeds(clickhouse, AS_OF, WARMED_USERS))
        with _over_a_network() as remote:
            remote_client = remote.client()
            network_rtt_ms, _ = timed(lambda: [remote_client.ping() for _ in range(200)], 3)
            network_pipelined_ms, _ = timed(
                lambda: write_feeds(remote, values, FEED_TTL_SEC), repeat=5
            )
            network_per_key_ms, _ = timed(lambda: per_key(values, remote), repeat=3)

        asset = build_warmed_feeds_asset()
        started = time.perf_counter()
        result = dg.materialize(
            [asset],
            resources={"clickhouse": clickhouse, "redis_cache": redis_cache},
            run_config={"ops": {asset.op.name: {"config": {"as_of": iso_z(AS_OF)}}}},
        )
        materialize_ms = (time.perf_counter() - started) * 1000
        metadata = result.asset_materializations_for_node(ASSET_NAME)[0].metadata
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    finally:
        _delete_keys(redis_cache)
        redis_cache.close()
        clickhouse.close()

    lines += ["", f"| step | {WARMED_USERS:,} users (ms) | {MANY_USERS:,} users (ms) |"]
    lines.append("|---|---:|---:|")
    for label, figures in rows.items():
        cells = [f"{figures[u]:.1f}" for u in (WARMED_USERS, MANY_USERS)]
        lines.append(f"| {label} | {' | '.join(cells)} |")

    with_json = rows[PER_KEY_WRITE][WARMED_USERS] / rows[PIPELINED_WRITE][WARMED_USERS]
    alone = rows[PER_KEY_TRANSPORT][WARMED_USERS] / rows[PIPELINED_TRANSPORT][WARMED_USERS]
    over_network = network_per_key_ms / network_pipelined_ms
    total_1k = rows[TOTAL][WARMED_USERS]
    network_rtt = network_rtt_ms / 200
    lines += [
        "",
        f"Writing the {WARMED_USERS:,} feeds (serialization included) through the proxy, a "
        f"{network_rtt:.2f} ms round trip (median PING):",
        "",
        "| write | loopback (ms) | network (ms) |",
        "|---|---:|---:|",
        f"| pipelines of {WRITE_BATCH} keys, {WRITERS} writers | "
        f"{rows[PIPELINED_WRITE][WARMED_USERS]:.1f} | {network_pipelined_ms:.1f} |",
        f"| one SET … EX round trip per key | {rows[PER_KEY_WRITE][WARMED_USERS]:.1f} | "
        f"{network_per_key_ms:.1f} |",
        f"| speed-up | {with_json:.1f}x | {over_network:.1f}x |",
        "",
        f"1000 feeds computed and written in {total_1k:.0f} ms: target ≤ {TARGET_MS:.0f} ms "
        f"{'met' if total_1k <= TARGET_MS else 'MISSED'}.",
        f"Pipelines vs one round trip per key, 1000 keys: {over_network:.1f}x over a "
        f"{network_rtt:.2f} ms round trip; on loopback ({rtt_ms / 1000:.3f} ms) {with_json:.1f}x "
        f"with serialization and {alone:.1f}x for the transport alone, where the client's work "
        "per key, not the wait, is most of the per-key baseline.",
        f"One materialization of {ASSET_NAME} through Dagster, checks included: "
        f"{materialize_ms:.0f} ms (query {metadata['query_ms'].value} ms, write "
        f"{metadata['write_ms'].value} ms); checks passed: {all(checks.values())}.",
    ]
    return lines


def bench_feeds(data_dir: Path) -> list[str]:
    """Markdown lines reporting the warmed feeds benchmark.

    Args:
        data_dir: A chdb data directory of this benchmark's own: seeded with the demo dataset when
            empty, reused as it is otherwise. Released by the caller's engine, if any.
    """
    child = subprocess.run(
        [sys.executable, __file__, "--measure", str(data_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode != 0:
        raise RuntimeError(f"the feeds benchmark failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="seeded data directory to create or reuse")
    parser.add_argument("--measure", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(_measure(args.measure)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.keep or Path(scratch) / "clickhouse"
        print("\n## Warmed feeds\n")
        print("\n".join(bench_feeds(data_dir)))


if __name__ == "__main__":
    main()
