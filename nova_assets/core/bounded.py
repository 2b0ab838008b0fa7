"""A wait that ends at a deadline whatever the call does: a sensor's Redis round trip, its push.

A client's own timeouts bound each socket operation, and its retries multiply them: a Redis that
accepts connections and never answers holds a pipeline for (retries + 1) times the socket
timeout, and an HTTP server that drips its answer holds a request for as long as it drips. A
sensor evaluation has a budget (docs/design.md §10), so `call_within` runs the call on a thread
of its own and waits at most the seconds given. When they pass, the evaluation goes on with
`WaitExceeded`; the thread is left to end when the client's own timeout fires (a daemon thread,
so it never holds the process up), and what it returns then is dropped.
"""

import queue
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitExceeded(TimeoutError):
    """The call did not return within the seconds it was given."""


def call_within(seconds: float, call: Callable[[], T], what: str) -> T:
    """`call()`'s result, or its exception, if it comes within `seconds`; else `WaitExceeded`.

    With no time left (`seconds` <= 0) the call is not started at all.
    """
    if seconds <= 0:
        raise WaitExceeded(f"{what}: no time left in this evaluation")
    outcome: queue.Queue[tuple[bool, object]] = queue.Queue(maxsize=1)

    def run() -> None:
        try:
            outcome.put((True, call()))
        except BaseException as exc:
            outcome.put((False, exc))

    threading.Thread(target=run, name=f"bounded: {what}", daemon=True).start()
    try:
        ok, value = outcome.get(timeout=seconds)
    except queue.Empty:
        raise WaitExceeded(f"{what}: no answer within {seconds:.1f} s") from None
    if not ok:
        assert isinstance(value, BaseException)
        raise value
    return value  # type: ignore[return-value]
