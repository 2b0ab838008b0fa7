"""Benchmark of writing suggestions to a three-primary Redis Cluster beside one Redis, same run.

    .venv/bin/python bench/redis_cluster.py [--users 100000]

100,000 users' suggestion values (20 items each, as the asset writes them) go through the
asset's own writer (`write_chunk`: batches of 100 users in pipelines, 10 in flight) to the local
single Redis and to a local cluster of three primaries and three replicas on the same machine
(the stack's `--with-redis-cluster`, started here on free ports and stopped after). Each write
is repeated; the median and the keys per second are printed with the cluster's ratio to the
single Redis. All three primaries share this machine's two cores with the writer, so the figure
is the client's cost of routing by slot, not a cluster's added capacity.
"""

import argparse
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from common import AS_OF, REDIS_URL

from nova_assets.core.resources import RedisCacheResource
from nova_assets.defs.suggestions.assets import DEFAULT_TTL_SEC
from nova_assets.defs.suggestions.ranking import UserSuggestions
from nova_assets.defs.suggestions.shards import WRITERS_IN_FLIGHT, write_chunk
from nova_assets.local import stack

REPEAT = 5


def suggestions(users: int) -> list[UserSuggestions]:
    items = [{"user_id": 1_000_000 + i, "mutuals": 20 - i, "followers": 500 + i} for i in range(20)]
    return [UserSuggestions(user_id=u, items=items, ranked=20) for u in range(1, users + 1)]


def write_all(url: str, values: list[UserSuggestions]) -> list[float]:
    """Seconds per complete write of `values`, REPEAT times, keys deleted after each."""
    resource = RedisCacheResource(url=url, key_prefix=f"bench:{uuid.uuid4().hex[:6]}:")
    client = resource.client()
    seconds = []
    with ThreadPoolExecutor(WRITERS_IN_FLIGHT) as writers:
        for _ in range(REPEAT):
            started = time.perf_counter()
            results = write_chunk(resource, writers, values, AS_OF, DEFAULT_TTL_SEC)
            seconds.append(time.perf_counter() - started)
            assert sum(r.written for r in results) == len(values)
            for key in client.scan_iter(match=resource.key_prefix + "*", count=10_000):
                client.unlink(key)
    resource.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=100_000)
    args = parser.parse_args()
    values = suggestions(args.users)

    with tempfile.TemporaryDirectory() as scratch:
        first = stack.free_port_range(
            stack.REDIS_CLUSTER_NODES, bus_offset=stack.REDIS_CLUSTER_BUS_OFFSET
        )
        config = stack.StackConfig(state_dir=Path(scratch), redis_cluster_port=first)
        stack.up(config, ("redis-cluster",))
        try:
            cluster_url = f"redis://127.0.0.1:{config.redis_cluster_port}/0"
            single = write_all(REDIS_URL, values)
            cluster = write_all(cluster_url, values)
        finally:
            stack.down(config, ("redis-cluster",))

    print(f"\n## Suggestions for {args.users:,} users written to Redis (median of {REPEAT})\n")
    print("| target | seconds | keys/s |")
    print("|---|---:|---:|")
    for name, seconds in (("one Redis", single), ("cluster, three primaries", cluster)):
        median = statistics.median(seconds)
        print(f"| {name} | {median:.2f} | {args.users / median:,.0f} |")
    ratio = statistics.median(cluster) / statistics.median(single)
    print(f"\ncluster / single time: {ratio:.2f}x ({datetime.now(UTC):%H:%M} UTC)")


if __name__ == "__main__":
    main()
