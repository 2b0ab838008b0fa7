"""The Redis that serves Nova's read caches: JSON values, always written with their TTL."""

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import orjson
import redis
from pydantic import Field, PrivateAttr
from redis.backoff import ExponentialBackoff, ExponentialWithJitterBackoff
from redis.retry import Retry

from nova_assets.core.contract import CLUSTER_SELECT_REFUSED, DataContractError
from nova_assets.core.resources.base import REDIS_SOCKET_TIMEOUT_S, ClientResource

CLUSTER_RETRIES = 12
"""Attempts of a cluster command across a failover, backing off from 0.1 s to 1 s: about 10 s."""
_CLUSTER_RETRY = Retry(
    ExponentialBackoff(cap=1.0, base=0.1),
    CLUSTER_RETRIES,
    supported_errors=(
        redis.ConnectionError,
        redis.TimeoutError,
        redis.exceptions.ClusterDownError,
        redis.exceptions.SlotNotCoveredError,
    ),
)
T = TypeVar("T")


def json_dumps(value: Mapping[str, Any]) -> bytes:
    """Serialise a cache value: compact UTF-8 JSON, floats at full precision (never rounded).

    orjson writes the shortest text that reads back as the same float, several times faster than
    the standard library; but it writes NaN and infinity as null, so any null hands the value to
    the strict standard encoder, which refuses them.
    """
    text = orjson.dumps(value)
    if b"null" not in text:
        return text
    try:
        strict = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as exc:  # NaN or infinity: JSON has no such number
        raise DataContractError(f"a cache value cannot be written as JSON: {exc}") from exc
    return strict.encode()


# Replace a cache value atomically, unless the new ranking is empty and the current one is not.
# One script, so a reader never sees the key missing, partial or without its TTL; and resending it
# after a reconnect (redis-py retries a command whose reply was lost) gives the same result.
_REPLACE_SCRIPT = """
if ARGV[3] == '1' then
  local current = redis.call('GET', KEYS[1])
  if current then
    local ok, decoded = pcall(cjson.decode, current)
    if ok and type(decoded) == 'table' and type(decoded['items']) == 'table'
        and #decoded['items'] > 0 then
      return 0
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""


class RedisCacheResource(ClientResource):
    """The Redis that serves Nova's read caches: JSON values, always written with their TTL.

    `url` may name a single Redis or any node of a Redis Cluster: the resource asks the server
    (`INFO cluster`) and talks to a cluster through redis-py's `RedisCluster`, which routes each
    key to its primary and follows `MOVED`/`ASK` during a failover or a slot migration.
    """

    url: str = Field(description="redis://[:password@]host:port/db")
    key_prefix: str = Field(default="nova:cache:", description="Prefix of every cache key.")
    retries: int = Field(default=3, description="Retries of a command on connection errors.")
    socket_timeout_s: float = Field(
        default=REDIS_SOCKET_TIMEOUT_S, description="Connect and read timeout of every command."
    )

    _replace: Any = PrivateAttr(default=None)

    def client(self) -> "redis.Redis | redis.RedisCluster":
        """The resource's client: timeouts and a jittered exponential retry on connection errors.

        A node that runs in cluster mode gets a `RedisCluster` client built from the same URL, so
        TLS (`rediss://`) and credentials carry over.
        """
        if self._client is None:
            options: dict[str, Any] = {
                "socket_timeout": self.socket_timeout_s,
                "socket_connect_timeout": self.socket_timeout_s,
                "client_name": "nova_assets",
            }
            single = redis.Redis.from_url(
                self.url,
                retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), self.retries),
                retry_on_error=[redis.ConnectionError, redis.TimeoutError],
                health_check_interval=30,
                **options,
            )
            if _runs_in_cluster_mode(single):
                single.close()
                self._client = redis.RedisCluster.from_url(
                    self.url,
                    # redis-py's own attempts re-read the slot map at once; `_call` spaces
                    # further attempts out across a failover.
                    retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), self.retries),
                    **options,
                )
            else:
                self._client = single
            self._replace = self._client.register_script(_REPLACE_SCRIPT)
        return self._client

    @property
    def cluster(self) -> bool:
        """True when the configured Redis is a Redis Cluster (connects on first use)."""
        return isinstance(self.client(), redis.RedisCluster)

    def key(self, *parts: object) -> str:
        """A cache key under the configured prefix, e.g. nova:cache:feed:42 for ("feed", 42)."""
        return self.key_prefix + ":".join(str(p) for p in parts)

    def _call(self, command: Callable[[], T]) -> T:
        """Run `command`; on a cluster, again across a failover or a slot map in flux.

        redis-py's cluster client re-reads the slot map and tries again at once, so all its
        attempts can fall inside the seconds a failover takes. Here each new attempt waits longer
        (0.1 s doubling to 1 s, about ten seconds in all over CLUSTER_RETRIES attempts). Every
        command is absolute (a SET with its TTL, the replace script, a read), so sending one again
        gives the same result.
        """
        if not self.cluster:
            return command()
        return _CLUSTER_RETRY.call_with_retry(command, lambda _: None)

    def set_json(self, key: str, value: Mapping[str, Any], ttl_s: int) -> None:
        """Write one JSON value with its TTL in the same command."""
        text, ttl = json_dumps(value), _positive(ttl_s)
        self._call(lambda: self.client().set(key, text, ex=ttl))

    def set_many_json(self, entries: Iterable[tuple[str, Mapping[str, Any], int]]) -> int:
        """Write many JSON values, each with its TTL, in one pipeline round trip.

        A value whose `items` list is empty goes through the atomic replace script in the same
        pipeline, so it never replaces a non-empty value (docs/design.md §4). Every value is
        absolute, so a pipeline resent after a reconnect rewrites the same data. On a cluster the
        pipeline is split by node and each part sent to its primary.

        Returns:
            How many values were written; the others kept a previous non-empty value.
        """
        prepared = [
            (key, json_dumps(value), _positive(ttl_s), _is_empty_ranking(value))
            for key, value, ttl_s in entries
        ]
        if not prepared:
            return 0
        # SET answers True; the script 1 when it wrote, 0 when it kept the previous value.
        return sum(1 for reply in self._call(lambda: self._send(prepared)) if reply)

    def _send(self, prepared: Sequence[tuple[str, bytes, int, bool]]) -> list[Any]:
        pipe = self.client().pipeline(transaction=False)
        for key, text, ttl, empty in prepared:
            if not empty:
                pipe.set(key, text, ex=ttl)
            elif isinstance(pipe, redis.cluster.ClusterPipeline):
                # A cluster pipeline sends EVALSHA without first loading the script on the node
                # that owns the key; EVAL carries the script, which the server caches by hash.
                pipe.execute_command("EVAL", _REPLACE_SCRIPT, 1, key, text, ttl, "1")
            else:
                self._replace(keys=[key], args=[text, ttl, "1"], client=pipe)
        return pipe.execute()

    def replace_ranking(self, key: str, value: Mapping[str, Any], ttl_s: int) -> bool:
        """Atomically replace a ranking; an empty `items` list never replaces a non-empty one.

        Returns:
            True if the value was written, False if the previous non-empty value was kept.
        """
        self.client()
        args = [json_dumps(value), _positive(ttl_s), "1" if _is_empty_ranking(value) else "0"]
        return bool(self._call(lambda: self._replace(keys=[key], args=args)))

    def get_json(self, key: str) -> dict[str, Any] | None:
        raw = self._call(lambda: self.client().get(key))
        return None if raw is None else json.loads(raw)

    def ttl(self, key: str) -> int:
        """Seconds left on `key`: -1 without a TTL, -2 when missing (Redis semantics)."""
        return int(self._call(lambda: self.client().ttl(key)))

    def ttls(self, keys: Sequence[str]) -> list[int]:
        """`ttl` of every key, in one pipeline round trip; with no key, a PING.

        Either way Redis answers or `redis.RedisError` is raised: a caller learns whether the
        cache can be read even when it has nothing to look up yet.
        """
        if not keys:
            self.client().ping()
            return []

        def read() -> list[Any]:
            pipe = self.client().pipeline(transaction=False)
            for key in keys:
                pipe.ttl(key)
            return pipe.execute()

        return [int(reply) for reply in self._call(read)]


def _runs_in_cluster_mode(client: redis.Redis) -> bool:
    """Whether the server behind `client` is a Redis Cluster node (`INFO cluster`).

    A server that refuses INFO (some managed services rename it) is taken as a single Redis. A
    cluster node refusing the URL's database (`SELECT` is not allowed in cluster mode) raises:
    `permanent_reason` names the fix.
    """
    try:
        return bool(client.info("cluster").get("cluster_enabled"))
    except redis.ResponseError as exc:
        if CLUSTER_SELECT_REFUSED in str(exc):
            raise
        return False


def _is_empty_ranking(value: Mapping[str, Any]) -> bool:
    return "items" in value and not value["items"]


def _positive(ttl_s: int) -> int:
    if ttl_s <= 0:
        raise ValueError(f"a cache TTL must be positive, got {ttl_s}")
    return int(ttl_s)
