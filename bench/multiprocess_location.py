"""The code location with a process per step: Dagster's multiprocess executor.

The baseline of `bench/tick_to_fresh.py`, and how every job ran before the in-process executor.
"""

import dagster as dg

from nova_assets.core.settings import load_settings
from nova_assets.definitions import build_definitions

defs = build_definitions(load_settings(), executor=dg.multiprocess_executor)
