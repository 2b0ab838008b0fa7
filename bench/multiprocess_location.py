"""The code location with a process per step: Dagster's multiprocess executor.

The baseline of `bench/tick_to_fresh.py`, and how every job ran before the in-process executor.
"""

import dagster as dg

from nova_assets import definitions as location

defs = location.rebind(location.defs, executor=dg.multiprocess_executor)
