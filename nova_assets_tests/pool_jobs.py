"""Jobs for the pool and termination tests, shaped as the project's steps are.

Loaded by path or module in run worker processes, so they read what they need from the
environment. Their steps run in the run's own process (the in-process executor), take the
`clickhouse` pool's slot, carry the production retry policy and treat an interrupt as the
project's assets do (`fail_fast_on_permanent_faults`).
"""

import os
import time

import dagster as dg

from nova_assets.core.contract import STEP_RETRY_POLICY, fail_fast_on_permanent_faults
from nova_assets.core.resources import CLICKHOUSE_POOL, ClickHouseResource


@dg.asset(pool=CLICKHOUSE_POOL)
def holds_the_engine(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    # `started` is taken before the engine opens: without the pool both steps start at once and
    # their spans overlap. With it, the second step may still wait a moment here, for chdb
    # releases the data directory a little after the first process closes it.
    clickhouse = ClickHouseResource(url=os.environ["NOVA_TEST_CLICKHOUSE_URL"], engine_wait_s=10)
    try:
        started = time.time()
        clickhouse.query_rows("SELECT count() FROM system.one")
        time.sleep(1.5)
        return dg.MaterializeResult(metadata={"started": started, "ended": time.time()})
    finally:
        clickhouse.close()


engine_job = dg.define_asset_job("engine_job", selection=[holds_the_engine])
defs = dg.Definitions(assets=[holds_the_engine], jobs=[engine_job], executor=dg.in_process_executor)


def engine_job_def() -> dg.JobDefinition:
    return defs.get_job_def("engine_job")


# -- termination ---------------------------------------------------------------------------------


@dg.op(pool=CLICKHOUSE_POOL, retry_policy=STEP_RETRY_POLICY)
@fail_fast_on_permanent_faults
def takes_the_slot() -> None:
    """A step that needs the slot and, once it has it, does nothing more."""


@dg.job(executor_def=dg.in_process_executor)
def waits_for_the_slot() -> None:
    takes_the_slot()


LONGEST_BACKOFF_S = 31
"""The production policy's longest wait, before a step's fifth retry (1, 3, 7, 15, 31 s)."""


@dg.op(pool=CLICKHOUSE_POOL, retry_policy=dg.RetryPolicy(max_retries=1, delay=LONGEST_BACKOFF_S))
@fail_fast_on_permanent_faults
def meets_a_transient_fault() -> None:
    """A step that meets a transient fault, then waits the production policy's longest backoff."""
    raise ConnectionRefusedError("the cache refused the connection")


@dg.job(executor_def=dg.in_process_executor)
def keeps_retrying() -> None:
    meets_a_transient_fault()


BATCH_S = 0.05
"""How long each batch of a shard takes."""


@dg.op(out=dg.DynamicOut(int))
def plan_shards():
    """Two shards, as the suggestions run plans its shards."""
    for index in range(2):
        yield dg.DynamicOutput(index, mapping_key=f"shard_{index}")


@dg.op(pool=CLICKHOUSE_POOL, retry_policy=STEP_RETRY_POLICY)
@fail_fast_on_permanent_faults
def write_shard(shard: int) -> int:
    """A shard written batch after batch, for far longer than any test waits."""
    for _ in range(100_000):
        time.sleep(BATCH_S)
    return shard


@dg.job(executor_def=dg.in_process_executor)
def sharded() -> None:
    plan_shards().map(write_shard)
