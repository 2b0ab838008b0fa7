"""The time one sensor evaluation may work (docs/design.md §10).

Dagster gives a sensor evaluation 60 s; one that runs longer is abandoned and its cursor is never
written, so the next tick starts again at the same place and meets the same slow input. Every
sensor of this project therefore works against a `Budget` (`SENSOR_BUDGET_SEC`, 20 s by default):
it checks `exhausted` before each unit of work (a message, a run, a page), writes its cursor
after each, and returns what it did once the budget is spent. Work that waits (a broker poll, an
HTTP request) takes `left()` as its timeout, so no single wait outlasts the budget.
"""

import time
from dataclasses import dataclass, field

from nova_assets.core.settings import load_settings


@dataclass
class Budget:
    """A deadline on the monotonic clock, `seconds` from when it was made."""

    seconds: float
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def for_sensor(cls) -> "Budget":
        """The evaluation budget the settings give (`SENSOR_BUDGET_SEC`)."""
        return cls(float(load_settings().sensor_budget_sec))

    @property
    def deadline(self) -> float:
        return self.started + self.seconds

    def spent(self) -> float:
        """Seconds since the evaluation began."""
        return time.monotonic() - self.started

    def left(self, at_most: float | None = None) -> float:
        """Seconds left, never below zero; capped at `at_most` when given (a wait's own limit)."""
        remaining = max(0.0, self.deadline - time.monotonic())
        return remaining if at_most is None else min(remaining, at_most)

    @property
    def exhausted(self) -> bool:
        return time.monotonic() >= self.deadline
