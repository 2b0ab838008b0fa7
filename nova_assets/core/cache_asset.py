"""The plumbing every cache asset shares: how it is declared, timed and judged.

A cache family's module holds what is its own (the SQL, the ranking, the checks' logic); this
module gives each of them the same shape: one op on the `clickhouse` pool with the production
retry policy, permanent faults failing at once, a freshness policy sized to the schedule, checks
declared with the asset, and a `MaterializeResult` whose check results carry their metadata.
"""

import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import dagster as dg

from nova_assets.core.contract import (
    STEP_RETRY_POLICY,
    fail_fast_on_permanent_faults,
    freshness_policy,
)
from nova_assets.core.resources import CLICKHOUSE_POOL

CACHE_KINDS = {"clickhouse", "redis"}


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
    key = dg.AssetKey(name)
    spec = dg.AssetSpec(
        key,
        group_name=group,
        kinds=CACHE_KINDS,
        description=description,
        metadata=dict(metadata),
        freshness_policy=freshness_policy(refresh_sec),
    )

    def decorate(compute: Callable[..., dg.MaterializeResult]) -> dg.AssetsDefinition:
        return dg.multi_asset(
            name=op_name or name,
            specs=[spec],
            pool=pool,
            retry_policy=retry_policy,
            check_specs=[
                dg.AssetCheckSpec(check, asset=key, description=text)
                for check, text in checks.items()
            ],
        )(fail_fast_on_permanent_faults(compute))

    return decorate


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
    metadata: Mapping[str, Any], verdicts: Verdicts, *, warn: Collection[str] = ()
) -> dg.MaterializeResult:
    """The materialization: its metadata and one result per check (those in `warn` WARN)."""
    return dg.MaterializeResult(
        metadata=dict(metadata),
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
