"""A job for the pool tests: its step holds the embedded ClickHouse engine for a moment.

Loaded by path in run worker processes, so it reads the engine location from the environment.
Its step runs in the run's own process (the in-process executor), as the project's jobs do.
"""

import os
import time

import dagster as dg

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
