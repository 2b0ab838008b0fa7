"""What every cache family shares (docs/design.md §3, §5): `as_of`, times, step policies, faults."""

import functools
import inspect
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from typing import ParamSpec, TypeVar

import dagster as dg
from redis.exceptions import AuthenticationError, AuthorizationError, ResponseError

STEP_RETRY_POLICY = dg.RetryPolicy(max_retries=5, delay=1, backoff=dg.Backoff.EXPONENTIAL)
"""Transient faults retry after 1, 3, 7, 15, 31 s (Dagster's exponential backoff)."""


def freshness_policy(refresh_sec: int) -> dg.FreshnessPolicy:
    """Freshness sized to an asset's schedule: warn after two intervals, fail after three."""
    return dg.FreshnessPolicy.time_window(
        fail_window=timedelta(seconds=3 * refresh_sec),
        warn_window=timedelta(seconds=2 * refresh_sec),
    )


class ConfigurationError(ValueError):
    """Run configuration that cannot work (an unparseable `as_of`, one out of range).

    Retrying cannot help: `fail_fast_on_permanent_faults` turns it into a failure without retries.
    """


AS_OF_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
"""The earliest accepted `as_of`; the latest is one day after now (`AS_OF_LEAD`)."""
AS_OF_LEAD = timedelta(days=1)
"""How far past now an `as_of` may lie: clock skew and time zones, not a different day."""


def parse_utc(value: str) -> datetime:
    """Parse an ISO-8601 time with an explicit UTC offset (`Z` or `+00:00`) to an aware datetime.

    The instant must lie in [2000-01-01T00:00:00Z, now + 1 day]; anything else (year 1, 9999, a
    typo of the century) is a `ConfigurationError` saying so.
    """
    example = "e.g. 2026-11-28T12:00:00Z"
    shown = repr(value if len(value) <= 80 else f"{value[:80]}…")
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigurationError(f"as_of {shown} is not an ISO-8601 time; {example}") from None
    if parsed.tzinfo is None:
        raise ConfigurationError(f"as_of {shown} has no time zone; give UTC, {example}")
    latest = datetime.now(UTC) + AS_OF_LEAD
    # Aware datetimes compare without converting, so year 1 or 9999 with an offset cannot
    # overflow here; astimezone below only ever sees an instant inside the range.
    if not AS_OF_EARLIEST <= parsed <= latest:
        raise ConfigurationError(
            f"as_of {shown} is outside [{AS_OF_EARLIEST:%Y-%m-%dT%H:%M:%SZ}, now + 1 day = "
            f"{latest:%Y-%m-%dT%H:%M:%SZ}]; give an instant in that range, {example}"
        )
    return to_millis_precision(parsed.astimezone(UTC))


def to_millis_precision(moment: datetime) -> datetime:
    """Truncate to the milliseconds ClickHouse's DateTime64(3) keeps, so both sides agree."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def iso_z(moment: datetime) -> str:
    """ISO-8601 UTC with milliseconds and a trailing `Z`, as the cache values carry times."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def epoch_ms(moment: datetime) -> int:
    """Milliseconds since the epoch: how instants are bound into ClickHouse queries."""
    return round(moment.timestamp() * 1000)


class AsOfConfig(dg.Config):
    """Run config shared by every asset: the instant the ranking is computed as of."""

    as_of: str | None = None
    """ISO-8601 UTC instant, e.g. 2026-11-28T12:00:00Z; default: the run's start."""

    def resolve(self, context: dg.AssetExecutionContext) -> datetime:
        """The configured `as_of`, else the start of this run.

        Parsed here, inside the asset, so a bad value is a permanent fault (no retries) with a
        message saying what to give instead.
        """
        if self.as_of is not None:
            return parse_utc(self.as_of)
        record = context.instance.get_run_record_by_id(context.run_id)
        started = record.start_time if record is not None else None
        moment = datetime.fromtimestamp(started, UTC) if started else datetime.now(UTC)
        return to_millis_precision(moment)


P = ParamSpec("P")
R = TypeVar("R")


class DataContractError(ValueError):
    """Data that breaks the design's contract (a NaN score, say): retrying cannot help."""


# ClickHouse error codes that no retry can fix: the schema, the query or the credentials are
# wrong, not the network.
PERMANENT_CLICKHOUSE_CODES = {
    16: "NO_SUCH_COLUMN_IN_TABLE",
    43: "ILLEGAL_TYPE_OF_ARGUMENT",
    47: "UNKNOWN_IDENTIFIER",
    53: "TYPE_MISMATCH",
    60: "UNKNOWN_TABLE",
    62: "SYNTAX_ERROR",
    164: "READONLY",
    81: "UNKNOWN_DATABASE",
    192: "UNKNOWN_USER",
    193: "WRONG_PASSWORD",
    497: "ACCESS_DENIED",
    516: "AUTHENTICATION_FAILED",
}
_CLICKHOUSE_CODE = re.compile(r"Code: (\d+)\.")


def clickhouse_error_code(exc: BaseException) -> int | None:
    """The ClickHouse error code in an exception's message (`Code: 60.` → 60), if any."""
    match = _CLICKHOUSE_CODE.search(str(exc))
    return int(match.group(1)) if match else None


CLUSTER_SELECT_REFUSED = "SELECT is not allowed in cluster mode"
"""What a Redis Cluster node answers to a connection for a database other than 0."""


def permanent_reason(exc: BaseException) -> str | None:
    """Why `exc` is permanent (fails at once, no retries), or None for a transient fault."""
    # Imported here, as the ClickHouse resource does: only a step that failed needs it.
    from clickhouse_connect.driver.exceptions import ClickHouseError

    if isinstance(exc, ConfigurationError):
        return f"the run configuration is invalid: {exc}"
    if isinstance(exc, DataContractError):
        return f"the data breaks the contract: {exc}"
    if isinstance(exc, ClickHouseError):
        code = clickhouse_error_code(exc)
        if code in PERMANENT_CLICKHOUSE_CODES:
            name = PERMANENT_CLICKHOUSE_CODES[code]
            return (
                f"ClickHouse rejected the query ({name}); fix the schema, the query or the "
                "credentials in CLICKHOUSE_URL"
            )
    # Subclasses of redis' ConnectionError, but a wrong password stays wrong however often tried.
    if isinstance(exc, AuthenticationError | AuthorizationError):
        return "Redis refused the credentials; fix the user or password in REDIS_URL"
    if isinstance(exc, ResponseError) and CLUSTER_SELECT_REFUSED in str(exc):
        return (
            "REDIS_URL names a database other than 0, and a Redis Cluster has only database 0; "
            "end REDIS_URL in /0"
        )
    return None


def within(
    step: Callable[P, R], scope: Callable[[tuple, dict], AbstractContextManager]
) -> Callable[P, R]:
    """`step` run inside `scope(args, kwargs)`; a generator step's events are yielded inside it."""
    if inspect.isgeneratorfunction(step):

        @functools.wraps(step)
        def scoped_events(*args: P.args, **kwargs: P.kwargs) -> R:
            with scope(args, kwargs):
                yield from step(*args, **kwargs)

        return scoped_events  # type: ignore[return-value]

    @functools.wraps(step)
    def scoped(*args: P.args, **kwargs: P.kwargs) -> R:
        with scope(args, kwargs):
            return step(*args, **kwargs)

    return scoped


def fail_fast_on_permanent_faults(compute: Callable[P, R]) -> Callable[P, R]:
    """Decorate an asset's function: permanent faults fail at once, transient ones retry.

    Transient (connection refused, timeouts, Redis out of memory, the embedded engine busy) are
    left to the step's RetryPolicy. Permanent (a missing table or column, a query ClickHouse
    cannot run, credentials ClickHouse or Redis refuse, data breaking the contract) become a
    `dg.Failure` that allows no retries. Bad configuration never gets this far: it fails the
    code location's load or the run's config. An interrupt (termination) stops the step too.
    """

    @contextmanager
    def judged() -> Iterator[None]:
        try:
            yield
        except (dg.DagsterExecutionInterruptedError, KeyboardInterrupt) as exc:
            # Dagster turns an interrupt inside a step with a RetryPolicy into a retry. Run in
            # the run's own process (the in-process executor), that would start the step again
            # after a termination request; as a failure allowing no retries, the run ends
            # CANCELED when termination was requested, and FAILURE (so the DLQ) when it was not.
            raise dg.Failure(
                description="Interrupted: the run was terminated or its process was signalled.",
                allow_retries=False,
            ) from exc
        except Exception as exc:
            reason = permanent_reason(exc)
            if reason is None:
                raise
            raise dg.Failure(
                description=f"Permanent fault, not retried: {reason}. {type(exc).__name__}: {exc}",
                allow_retries=False,
            ) from exc

    return within(compute, lambda args, kwargs: judged())
