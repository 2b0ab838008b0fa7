"""Jobs for the retention tests: runs that leave what real runs leave on a local instance.

`pair_job`'s asset is a graph whose first op returns a value the second reads, so the run writes a
step output under `storage/<run_id>/` through Dagster's default IO manager (as the suggestions'
shards did), beside its compute logs and its event database; `broken_job` fails at once. Loaded
by `dagster job execute -m`.
"""

import dagster as dg


@dg.op
def numbers(context: dg.OpExecutionContext) -> list[int]:
    context.log.info("numbers computed")
    return list(range(1000))


@dg.op
def total(numbers: list[int]) -> int:
    return sum(numbers)


@dg.graph_asset
def pair() -> int:
    return total(numbers())


@dg.asset
def broken() -> None:
    raise dg.Failure("broken on purpose")


pair_job = dg.define_asset_job("pair_job", selection=[pair])
broken_job = dg.define_asset_job("broken_job", selection=[broken])
defs = dg.Definitions(assets=[pair, broken], jobs=[pair_job, broken_job])
