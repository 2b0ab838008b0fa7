"""The plumbing every cache asset shares: how it is declared, timed and judged.

A cache family's module holds what is its own (the SQL, the ranking, the checks' logic); this
module gives each of them the same shape: one op on the `clickhouse` pool with the production
retry policy, the engine let go with the slot, permanent faults failing at once, a freshness
policy sized to the schedule, checks declared with the asset, and a `MaterializeResult` whose
check results carry their metadata.
"""

import functools
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import dagster as dg

from nova_assets.core.contract import (
    STEP_RETRY_POLICY,
    fail_fast_on_permanent_faults,
    freshness_policy,
)
from nova_assets.core.resources import CLICKHOUSE_POOL, releases_engine

CACHE_KINDS = {"clickhouse", "redis"}

HEALING_KEYS = "healing_keys"
"""Materialization metadata: the cache keys (a sample of them) `cache_healer` watches."""
HEALING_SAMPLE = 20
"""How many of a materialization's keys it names for the healer."""
REASON_TAG = "nova/reason"
"""On a run launched outside its schedule for a reason (`cache_missing`, `cache_expiring`)."""


def asset_pool(asset_name: str, *, embedded: bool) -> str:
    """The Dagster pool an asset's step takes a slot of (docs/design.md §5).

    The embedded engine admits one process at a time, so there every step shares the one-slot
    `clickhouse` pool. A server admits many: each asset then has a pool of its own, which the
    instance limits to one slot, so two runs never materialize one asset at once, however they
    were launched (a schedule, the UI's Materialize button, the CLI, a replay).
    """
    return CLICKHOUSE_POOL if embedded else f"{CLICKHOUSE_POOL}/{asset_name}"


Verdicts = Mapping[str, tuple[bool, Mapping[str, Any]]]
"""Each check's outcome by name: (passed, metadata shown with it)."""


def cache_asset(
    *,
    name: str,
    group: str,
    description: str,
    refresh_sec: int,
    checks: Mapping[str, str],
    metadata: Mapping[str, Any],
    op_name: str | None = None,
    retry_policy: dg.RetryPolicy = STEP_RETRY_POLICY,
    pool: str = CLICKHOUSE_POOL,
) -> Callable[[Callable[..., dg.MaterializeResult]], dg.AssetsDefinition]:
    """Declare a cache asset around its compute function.

    Args:
        name: The asset key.
        group: The family's asset group.
        description: What the asset holds (the UI shows it).
        refresh_sec: The schedule's interval; freshness warns after two, fails after three.
        checks: Check name → description; the function returns a result for each.
        metadata: Definition metadata (cache key pattern, TTL).
        op_name: The op's name where it must differ from the asset's (run config goes under it).
        retry_policy: The step's retry policy (tests shorten it).
        pool: The step's pool (`asset_pool`).
    """
    spec = cache_asset_spec(
        name=name, group=group, description=description, refresh_sec=refresh_sec, metadata=metadata
    )

    def decorate(compute: Callable[..., dg.MaterializeResult]) -> dg.AssetsDefinition:
        return dg.multi_asset(
            name=op_name or name,
            specs=[spec],
            pool=pool,
            retry_policy=retry_policy,
            check_specs=check_specs(spec.key, checks),
        )(releases_engine(_says_why(fail_fast_on_permanent_faults(compute))))

    return decorate


def cache_asset_spec(
    *, name: str, group: str, description: str, refresh_sec: int, metadata: Mapping[str, Any]
) -> dg.AssetSpec:
    """A cache asset's spec: its group, kinds, description, metadata and freshness policy."""
    return dg.AssetSpec(
        dg.AssetKey(name),
        group_name=group,
        kinds=CACHE_KINDS,
        description=description,
        metadata=dict(metadata),
        freshness_policy=freshness_policy(refresh_sec),
    )


def asset_out(spec: dg.AssetSpec) -> dg.AssetOut:
    """The same asset as an output of a graph-backed asset.

    The graph keeps neither the group nor the freshness policy of its outputs: pass the group to
    the graph and set the policy on its specs (`map_asset_specs`).
    """
    return dg.AssetOut(
        key=spec.key,
        kinds=set(spec.kinds),
        description=spec.description,
        metadata=dict(spec.metadata),
    )


def check_specs(key: dg.AssetKey, checks: Mapping[str, str]) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec(check, asset=key, description=text) for check, text in checks.items()]


def with_reason(
    context: dg.OpExecutionContext, result: dg.MaterializeResult
) -> dg.MaterializeResult:
    """The materialization of a run tagged with a reason (`nova/reason`), recording it."""
    reason = context.run.tags.get(REASON_TAG)
    if reason is None:
        return result
    return dg.MaterializeResult(
        metadata={**(result.metadata or {}), "reason": reason},
        check_results=result.check_results,
    )


def _says_why(compute: Callable[..., dg.MaterializeResult]) -> Callable[..., dg.MaterializeResult]:
    """A run tagged with a reason (`nova/reason`) records it in its materialization."""

    @functools.wraps(compute)
    def materialize(context: dg.AssetExecutionContext, *args, **kwargs) -> dg.MaterializeResult:
        return with_reason(context, compute(context, *args, **kwargs))

    return materialize


class Stopwatch:
    """Milliseconds spent in named phases of a materialization, for its metadata."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.ms[f"{name}_ms"] = round((time.perf_counter() - started) * 1000, 1)


def cache_result(
    metadata: Mapping[str, Any],
    verdicts: Verdicts,
    *,
    keys: Sequence[str],
    warn: Collection[str] = (),
) -> dg.MaterializeResult:
    """The materialization: its metadata and one result per check (those in `warn` WARN).

    `keys` are the cache keys the run wrote (or a sample): the first `HEALING_SAMPLE` of them are
    recorded for `cache_healer`, which refills the cache when they go missing.
    """
    return dg.MaterializeResult(
        metadata={
            **metadata,
            HEALING_KEYS: dg.MetadataValue.json(list(keys[:HEALING_SAMPLE])),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=name,
                passed=passed,
                metadata=dict(meta),
                severity=dg.AssetCheckSeverity.WARN
                if name in warn
                else dg.AssetCheckSeverity.ERROR,
            )
            for name, (passed, meta) in verdicts.items()
        ],
    )
