"""`nova-assets health`: are the caches healthy? One verdict per job, read from the instance.

The old system's `GET /health/jobs`, as a command a probe or a cron check can run. It reads the
Dagster instance (`DAGSTER_HOME`) alone, never the Pushgateway, so it answers while the gateway
is down. For each job:

- `never run`: no run of the job (or of its asset, §5) has finished yet;
- `failing`: its last three or more runs failed (the same rule as `job_health`);
- `late`: its last success is older than two intervals (when the asset's freshness warns);
- `ok` otherwise.

Exit code 0 when every job is `ok`, 1 otherwise, 2 when the instance cannot be read.
"""

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg

from nova_assets.core.jobs import JobSpec, active_run, counts_for_tag
from nova_assets.core.text_table import text_table
from nova_assets.defs.dlq.writing import DELIVERED_TAG, DELIVERED_VALUE
from nova_assets.defs.metrics.recount import UNHEALTHY_AFTER_FAILURES, compute_job_metrics

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


def _verdict(finished: int, streak: int, age: float | None, interval_sec: int) -> str:
    if finished == 0:
        return NEVER_RUN
    if streak >= UNHEALTHY_AFTER_FAILURES:
        return FAILING
    if age is None or age > LATE_AFTER_INTERVALS * interval_sec:
        return LATE
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


def job_health(instance: dg.DagsterInstance, spec: JobSpec, now: float) -> JobHealth:
    """One job's health from the instance's records."""
    metrics = compute_job_metrics(instance, spec.name)
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
            metrics.successes + metrics.failures,
            metrics.consecutive_failures,
            age,
            spec.interval_sec,
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
    )


def report(instance: dg.DagsterInstance, specs: Sequence[JobSpec]) -> list[JobHealth]:
    now = time.time()
    return [job_health(instance, spec, now) for spec in specs]


def overall(jobs: Sequence[JobHealth]) -> str:
    """`ok` when every job is, else the worst verdict: failing, then late, then never run."""
    for verdict in (FAILING, LATE, NEVER_RUN):
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
        )
        for job in jobs
    ]
    return f"{text_table(header, rows)}\noverall: {overall(jobs)}"
