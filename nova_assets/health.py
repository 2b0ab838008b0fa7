"""`nova-assets health`: are the caches healthy? One verdict per job, from its runs and from Redis.

The old system's `GET /health/jobs`, as a command a probe or a cron check can run. It reads the
Dagster instance (`DAGSTER_HOME`, default `<NOVA_HOME>/dagster`) without writing to it
(`nova_assets/internals/readonly_instance.py`), and what Redis serves for each cache
(`nova_assets/served.py`); never the Pushgateway, so it answers while the gateway is down. For
each job, the first that applies:

- `never run`: no run of the job (or of its asset, §5) has finished yet;
- `failing`: its last three or more runs failed (the same rule as `job_health`);
- `late`: its last success is older than two intervals (when the asset's freshness warns);
- `cache missing`, `cache unreadable`, `cache no ttl`, `cache unreachable`: the runs are fine but
  readers do not get the cache (keys gone, a value off the contract, a key without its TTL, or
  Redis not answering);
- `ok` otherwise.

Exit code 0 when every job is `ok`, 1 otherwise (Redis not answering included: the caches are not
served), 2 when the instance cannot be read, with one line on stderr saying why.
"""

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg

from nova_assets.core.jobs import JobSpec, active_run, counts_for_tag, job_specs
from nova_assets.core.settings import Settings
from nova_assets.core.text_table import text_table
from nova_assets.defs.dlq.writing import DELIVERED_TAG, DELIVERED_VALUE
from nova_assets.defs.metrics.recount import PENDING_WINDOW, UNHEALTHY_AFTER_FAILURES
from nova_assets.internals.readonly_instance import UnreadableInstance, read_instance
from nova_assets.served import NOT_SERVED, UNKNOWN, UNREACHABLE, Served, served_caches

LATE_AFTER_INTERVALS = 2
"""A job is late once its last success is this many intervals old (the freshness warn window)."""

OK, LATE, FAILING, NEVER_RUN = "ok", "late", "failing", "never run"


@dataclass(frozen=True)
class JobHealth:
    job_name: str
    asset: str
    verdict: str
    interval_sec: int
    last_success: str | None
    last_success_age_sec: float | None
    consecutive_failures: int
    in_progress: dict[str, Any] | None
    """The run materializing the job's asset now: its id, status and seconds since it began."""
    dlq_pending: int
    dlq_delivered_last_hour: int
    freshness: str
    """The asset's freshness state as the instance last recorded it (PASS, WARN, FAIL, UNKNOWN)."""
    cache: Served
    """What Redis serves for the job's cache (`nova_assets/served.py`)."""


def _verdict(finished: bool, streak: int, age: float | None, interval_sec: int, cache: str) -> str:
    if not finished:
        return NEVER_RUN
    if streak >= UNHEALTHY_AFTER_FAILURES:
        return FAILING
    if age is None or age > LATE_AFTER_INTERVALS * interval_sec:
        return LATE
    if cache in NOT_SERVED:
        return f"cache {cache}"
    return OK


def _delivered_since(instance: dg.DagsterInstance, job: str, since: datetime) -> int:
    delivered = {DELIVERED_TAG: DELIVERED_VALUE}
    return sum(
        instance.get_runs_count(
            dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE], updated_after=since, **selection)
        )
        for selection in (
            {"job_name": job, "tags": delivered},
            {"tags": {**delivered, counts_for_tag(job): "true"}},
        )
    )


@dataclass(frozen=True)
class _Recent:
    """What health reads of a job's runs: bounded windows, never a count of all of history."""

    finished: bool
    last_success_timestamp: float | None
    consecutive_failures: int
    dlq_pending: int


def _recent(instance: dg.DagsterInstance, job_name: str) -> _Recent:
    """The newest finished run and success, the failures since, the last day's pending failures.

    Each is a query of at most a few rows or an indexed count over a bounded span (the failure
    streak, the last day), so the answer takes as long on a year of history as on a day's.
    """
    counted = {counts_for_tag(job_name): "true"}

    def newest(statuses: list[dg.DagsterRunStatus]) -> dg.RunRecord | None:
        records = [
            *instance.get_run_records(dg.RunsFilter(job_name=job_name, statuses=statuses), limit=1),
            *instance.get_run_records(dg.RunsFilter(tags=counted, statuses=statuses), limit=1),
        ]
        return max(records, key=lambda r: r.create_timestamp, default=None)

    def count(tags: dict[str, str] | None = None, **filters: Any) -> int:
        own = dg.RunsFilter(job_name=job_name, tags=tags or {}, **filters)
        other = dg.RunsFilter(tags={**counted, **(tags or {})}, **filters)
        return instance.get_runs_count(own) + instance.get_runs_count(other)

    failure = [dg.DagsterRunStatus.FAILURE]
    last = newest([dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE])
    success = newest([dg.DagsterRunStatus.SUCCESS])
    streak = count(
        statuses=failure, **({"created_after": success.create_timestamp} if success else {})
    )
    day = {"updated_after": datetime.now(UTC) - PENDING_WINDOW}
    pending = count(statuses=failure, **day) - count(
        {DELIVERED_TAG: DELIVERED_VALUE}, statuses=failure, **day
    )
    return _Recent(
        finished=last is not None,
        last_success_timestamp=success.end_time if success else None,
        consecutive_failures=streak,
        dlq_pending=pending,
    )


def job_health(
    instance: dg.DagsterInstance, spec: JobSpec, now: float, cache: Served = Served(UNKNOWN)
) -> JobHealth:
    """One job's health from the instance's records and what Redis serves for its cache."""
    metrics = _recent(instance, spec.name)
    last = metrics.last_success_timestamp
    age = now - last if last is not None else None
    active = active_run(instance, spec)
    in_progress = None
    if active is not None:
        began = active.start_time or active.create_timestamp.timestamp()
        in_progress = {
            "run_id": active.dagster_run.run_id,
            "status": active.dagster_run.status.value,
            "for_sec": round(now - began, 1),
        }
    key = dg.AssetKey(spec.asset)
    freshness = instance.get_freshness_state_records([key]).get(key)
    return JobHealth(
        job_name=spec.name,
        asset=spec.asset,
        verdict=_verdict(
            metrics.finished,
            metrics.consecutive_failures,
            age,
            spec.interval_sec,
            cache.state,
        ),
        interval_sec=spec.interval_sec,
        last_success=(
            datetime.fromtimestamp(last, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
            if last is not None
            else None
        ),
        last_success_age_sec=round(age, 1) if age is not None else None,
        consecutive_failures=metrics.consecutive_failures,
        in_progress=in_progress,
        dlq_pending=metrics.dlq_pending,
        dlq_delivered_last_hour=_delivered_since(
            instance, spec.name, datetime.fromtimestamp(now, UTC) - timedelta(hours=1)
        ),
        freshness=freshness.freshness_state.value if freshness else "UNKNOWN",
        cache=cache,
    )


def report(
    instance: dg.DagsterInstance,
    specs: Sequence[JobSpec],
    caches: Mapping[str, Served] | None = None,
) -> list[JobHealth]:
    """Every job's health; `caches` (by job name) is what Redis serves, unknown if not given."""
    now = time.time()
    return [
        job_health(instance, spec, now, (caches or {}).get(spec.name, Served(UNKNOWN)))
        for spec in specs
    ]


def overall(jobs: Sequence[JobHealth]) -> str:
    """`ok` when every job is, else the worst verdict: failing, late, a cache, never run."""
    worst = [FAILING, LATE, *(f"cache {state}" for state in NOT_SERVED), NEVER_RUN]
    for verdict in worst:
        if any(job.verdict == verdict for job in jobs):
            return verdict
    return OK


def as_json(jobs: Sequence[JobHealth]) -> str:
    return json.dumps({"overall": overall(jobs), "jobs": [asdict(job) for job in jobs]}, indent=2)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _cache(served: Served) -> str:
    if served.keys_checked == 0 or served.state == UNREACHABLE:
        return served.state
    return f"{served.state} {served.keys_present}/{served.keys_checked}"


def as_table(jobs: Sequence[JobHealth]) -> str:
    header = (
        "job",
        "verdict",
        "last success",
        "age",
        "interval",
        "failures",
        "in progress",
        "dlq pending",
        "dlq 1h",
        "freshness",
        "cache",
        "items",
        "generated",
        "ttl left",
    )
    rows = [
        (
            job.job_name,
            job.verdict,
            job.last_success or "-",
            _age(job.last_success_age_sec),
            _age(job.interval_sec),
            str(job.consecutive_failures),
            (
                f"{job.in_progress['status'].lower()} {_age(job.in_progress['for_sec'])}"
                if job.in_progress
                else "-"
            ),
            str(job.dlq_pending),
            str(job.dlq_delivered_last_hour),
            job.freshness,
            _cache(job.cache),
            "-" if job.cache.items is None else str(job.cache.items),
            _age(job.cache.generated_at_age_sec),
            _age(job.cache.ttl_left_sec),
        )
        for job in jobs
    ]
    notes = sorted({f"redis: {job.cache.error}" for job in jobs if job.cache.error})
    return "\n".join([text_table(header, rows), *notes, f"overall: {overall(jobs)}"])


HINT = " (DAGSTER_HOME names the instance; make dev's is <NOVA_HOME>/dagster)"


def instance_home(settings: Settings) -> Path:
    """The instance operator tools read: DAGSTER_HOME, else `<NOVA_HOME>/dagster` (make dev's)."""
    return Path(os.environ.get("DAGSTER_HOME") or settings.nova_home / "dagster")


@dataclass(frozen=True)
class Answer:
    """What `nova-assets health` prints, and its exit code."""

    code: int
    """0 when every job is ok, 1 otherwise, 2 when the instance cannot be read."""
    out: str = ""
    """The table or the JSON document, for stdout."""
    error: str | None = None
    """One line for stderr when the instance cannot be read."""


def answer(settings: Settings, *, as_json_output: bool = False) -> Answer:
    """Each job's health, as `nova-assets health` prints it, and the exit code."""
    home = instance_home(settings)
    specs = job_specs(settings)
    try:
        jobs = read_instance(
            home,
            lambda instance: report(
                instance, specs, served_caches(instance, settings.redis_url, specs)
            ),
        )
    except UnreadableInstance as exc:
        return Answer(2, error=f"cannot read the Dagster instance in {home}: {exc}{HINT}")
    except Exception as exc:  # any other fault of the instance is the same answer: unreadable
        reason = " ".join(str(exc).split())[:300]
        return Answer(
            2, error=f"cannot read the Dagster instance in {home}: {type(exc).__name__}: {reason}"
        )
    out = as_json(jobs) if as_json_output else as_table(jobs)
    return Answer(0 if overall(jobs) == OK else 1, out)
