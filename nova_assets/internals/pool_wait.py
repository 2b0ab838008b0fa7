"""The in-process executor's waits: asleep while a step waits, and over at once on termination.

Dagster's in-process executor (every run of ours locally, and every job but suggestions on a
server) loops on "is a step ready?" and sleeps between passes for as long as
`ActiveExecution.sleep_interval()` says: until the earliest pending pool-slot claim is due, or
until a step waiting to retry may start (up to 31 s with our retry policy, docs/design.md §5).
Two fixes to that loop, both applied when the code location loads (`fix_pool_wait`):

**A waiting step sleeps** (docs/design.md §5). In the installed Dagster
`InstanceConcurrencyContext.interval_to_next_pending_claim_check()` returns `min(0, time until
the next claim)`: never more than 0, so the loop never sleeps while a step waits for a slot. The
claim itself is still retried only when due (Dagster's schedule: after 1 s, then 10 % longer
each time, up to 15 s; the local storage asks for 0.2 s); in between, the run's process would
spin one core, through hundreds of thousands of passes a run. That method is replaced with the
time until the earliest pending claim is due, never less than 0, after a probe shows the
installed method still spins (a fixed Dagster is left alone).

**Termination ends any wait and starts nothing more** (docs/design.md §5, Termination). A
termination request marks the run CANCELING and sends its worker SIGINT. While the worker
executes a run, Dagster only records that signal (`capture_interrupts`) and raises it as
`DagsterExecutionInterruptedError` inside a step's own code; the in-process loop never looks at
it. A run whose step waited for a slot or a retry therefore slept on, and its step then started
once more (and, being interrupted on entry, was retried if the step allows it; Dagster issue
15026). `ActiveExecution` is amended in two places:
- `sleep_til_ready` sleeps inside Dagster's public `raise_execution_interrupts()`: an interrupt
  that arrives while the loop sleeps, or arrived since its last pass, raises at once.
- `get_next_step`, once it has picked a step and before the step starts: an interrupt that
  arrived meanwhile, or a run whose termination was requested (CANCELING or CANCELED: a step
  of this run already stopped by an interrupt, or a signal that never came), stops the loop; the
  slot the step just took is let go first, so the next run's step need not wait for run
  monitoring to free it.
The interrupt then ends the execution as Dagster ends any interrupted run: pending slot claims
are withdrawn, resources torn down, and the run ends CANCELED when its termination was
requested (FAILURE, "interrupted unexpectedly", when it was not). Dagster's multiprocess
executor checks for interrupts on every pass of its own loop and is left as it is.

The classes are private to Dagster: if one moves or loses a method, that fix logs one warning
that it is off and the code location loads as usual.
"""

import functools
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import dagster as dg

_PROBE_WAIT_S = 60.0
_AMENDED = "_stops_on_termination"
"""Marks `ActiveExecution`'s methods as amended here, so a second load leaves them alone."""
TERMINATED = (dg.DagsterRunStatus.CANCELING, dg.DagsterRunStatus.CANCELED)


def concurrency_context_class() -> type:
    """Dagster's `InstanceConcurrencyContext`, imported when asked for (it is private)."""
    from dagster._core.execution.plan.instance_concurrency_context import (
        InstanceConcurrencyContext,
    )

    return InstanceConcurrencyContext


def active_execution_class() -> type:
    """Dagster's `ActiveExecution` (the executor's plan state), imported when asked for."""
    from dagster._core.execution.plan.active import ActiveExecution

    return ActiveExecution


# -- a waiting step sleeps ------------------------------------------------------------------------


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
    """Make waiting steps sleep between claims, and every wait end on termination.

    Returns whether the sleeping fix is (now) in place; the termination fix is applied either
    way (`stop_on_termination`). Never raises: where Dagster's internals are not the ones a fix
    was written for, it logs one warning and leaves Dagster as it is.
    """
    stop_on_termination()
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


# -- termination ends any wait and starts nothing more --------------------------------------------


def termination_requested(execution: Any) -> bool:
    """Whether the run `execution` executes has been asked to terminate (CANCELING, CANCELED).

    Read from the instance, through the run's concurrency context (the in-process executor
    always gives one); False where the execution has none.
    """
    context = getattr(execution, "_instance_concurrency_context", None)
    if context is None:
        return False
    run = context._instance.get_run_by_id(context._run_id)  # noqa: SLF001
    return run is not None and run.status in TERMINATED


def interruptible_sleep(sleep_til_ready: Callable[[Any], None]) -> Callable[[Any], None]:
    """`sleep_til_ready` that an interrupt ends at once, also one received since the last pass."""

    @functools.wraps(sleep_til_ready)
    def sleep_til_ready_or_interrupted(self: Any) -> None:
        with dg.raise_execution_interrupts():
            sleep_til_ready(self)

    setattr(sleep_til_ready_or_interrupted, _AMENDED, True)
    return sleep_til_ready_or_interrupted


def no_step_after_termination(get_next_step: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`get_next_step` that raises, with the step's slot let go, once the run is to stop."""

    @functools.wraps(get_next_step)
    def next_step_unless_terminated(self: Any) -> Any:
        # Picking the step may claim its slot: a signal arriving meanwhile is only recorded.
        step = get_next_step(self)
        if step is None:
            return None
        try:
            with dg.raise_execution_interrupts():
                pass  # raises if an interrupt was recorded since the last pass
            if termination_requested(self):
                raise dg.DagsterExecutionInterruptedError(
                    f"Step {step.key} not started: the run's termination was requested."
                )
        except dg.DagsterExecutionInterruptedError:
            context = getattr(self, "_instance_concurrency_context", None)
            if context is not None:
                context.free_step(step.key)
            raise
        return step

    setattr(next_step_unless_terminated, _AMENDED, True)
    return next_step_unless_terminated


def stop_on_termination() -> bool:
    """Amend the in-process executor's loop as the module says; True if it is (now) amended.

    Never raises: where `ActiveExecution` or its methods moved, it logs one warning and leaves
    Dagster as it is (a terminated run then stops when its wait ends).
    """
    try:
        execution_class = active_execution_class()
        sleep_til_ready = execution_class.sleep_til_ready
        get_next_step = execution_class.get_next_step
    except (ImportError, AttributeError) as error:
        dg.get_dagster_logger().warning(
            "The termination fix is off: Dagster's ActiveExecution.sleep_til_ready or "
            f"get_next_step is not where it was ({error}). A run terminated while its step waits "
            "for a pool slot or a retry stops only when the wait ends; see nova_assets/"
            "internals/pool_wait.py and the contract tests in nova_assets_tests/test_internals.py."
        )
        return False
    if not getattr(sleep_til_ready, _AMENDED, False):
        execution_class.sleep_til_ready = interruptible_sleep(sleep_til_ready)
    if not getattr(get_next_step, _AMENDED, False):
        execution_class.get_next_step = no_step_after_termination(get_next_step)
    return True
