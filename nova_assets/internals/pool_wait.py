"""A step waiting for a pool slot sleeps between its claims instead of spinning (docs/design.md §5).

While a step waits for a pool slot, Dagster's in-process executor loops on "is a step ready?"
and sleeps for `InstanceConcurrencyContext.interval_to_next_pending_claim_check()` between
passes. In the installed Dagster that method returns `min(0, time until the next claim)`: never
more than 0, so the loop never sleeps. The claim itself is still retried only when due (Dagster's
schedule: after 1 s, then 10 % longer each time, up to 15 s; the local storage asks for 0.2 s);
in between, the run's process would spin one core, through hundreds of thousands of passes a
run. On two cores, an every-minute run waiting its turn for the embedded engine would take a core
from the run holding it, and cost its own run up to three CPU-seconds.

`fix_pool_wait` replaces that one method with the time until the earliest pending claim is due,
and never less than 0: each claim is retried when it was due before, and the process sleeps in
between. It probes the method first and leaves a Dagster that already sleeps alone. It is
applied wherever a run's steps may wait for a slot: every process that loads the code location,
as a run's worker does before executing the run. Dagster's multiprocess executor never asks this
method; its loop does not sleep at all, and this does not change it.

The class is private to Dagster: if it moves or loses the method, `fix_pool_wait` logs one
warning that the fix is off and the code location loads as usual (waiting steps then spin).
"""

import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import dagster as dg

_PROBE_WAIT_S = 60.0


def concurrency_context_class() -> type:
    """Dagster's `InstanceConcurrencyContext`, imported when asked for (it is private)."""
    from dagster._core.execution.plan.instance_concurrency_context import (
        InstanceConcurrencyContext,
    )

    return InstanceConcurrencyContext


def interval_to_next_claim(self: Any) -> float:
    """Seconds until the earliest pending claim is due to be tried again, at least 0."""
    pending = self._pending_claims
    if not pending:
        return 0.0
    timeouts = self._pending_timeouts
    # A pending claim without a time is due now, as Dagster's own mapping (a defaultdict) has it.
    return max(0.0, min(timeouts.get(key, 0.0) for key in pending) - time.time())


def spins(method: Callable[[Any], float]) -> bool:
    """Whether `method` returns no wait for a claim due a minute from now (the busy wait)."""
    step = "probe"
    probe = SimpleNamespace(
        _pending_claims={step}, _pending_timeouts={step: time.time() + _PROBE_WAIT_S}
    )
    try:
        return method(probe) < 1.0
    except (AttributeError, TypeError, KeyError):
        # Another Dagster, with other internals: not the method this fix was written for.
        return False


def fix_pool_wait() -> bool:
    """Make waiting steps sleep between claims; True if the fix is (now) in place.

    Never raises: where Dagster's internals are not the ones this fix was written for, it logs
    one warning and leaves Dagster as it is.
    """
    try:
        context_class = concurrency_context_class()
        current = context_class.interval_to_next_pending_claim_check
    except (ImportError, AttributeError) as error:
        dg.get_dagster_logger().warning(
            "The pool-wait fix is off: Dagster's InstanceConcurrencyContext."
            f"interval_to_next_pending_claim_check is not where it was ({error}). Steps waiting "
            "for a pool slot may spin a core while they wait; see nova_assets/internals/"
            "pool_wait.py and the contract tests in nova_assets_tests/test_internals.py."
        )
        return False
    if current is interval_to_next_claim:
        return True
    if not spins(current):
        return False
    context_class.interval_to_next_pending_claim_check = interval_to_next_claim
    return True
