"""Counters never go down: runs deleted by hand, a lost cursor and the run retention together.

On a Pushgateway of the test's own, the real `job_metrics` sensor counts a history; runs are
deleted as the UI's Delete does, the cursor is lost, the retention deletes the old runs and the
cursor is lost again. After every step each `job_runs_total` and `job_dlq_messages_total` sample
is at least what it was before, and with no new run it is exactly what it was.
"""

import time
from itertools import pairwise
from pathlib import Path

import dagster as dg

from nova_assets.core.budget import Budget
from nova_assets.core.jobs import job_specs
from nova_assets.core.resources import JobMetricsResource
from nova_assets.core.settings import Settings
from nova_assets.defs.dlq.writing import DELIVERED_TAG, DELIVERED_VALUE
from nova_assets.defs.metrics.sensor import PUSH_JOB, build_job_metrics_sensor
from nova_assets.defs.retention.ledger import Ledger
from nova_assets.defs.retention.prune import cutoff_for, prune
from nova_assets.local.stack import StackConfig, down, up
from nova_assets_tests.conftest import free_ports
from nova_assets_tests.history import FinishedRun, add_history, history_instance
from nova_assets_tests.test_metrics import sample, scrape

SPECS = job_specs(Settings.from_env({}))
JOBS = [spec.name for spec in SPECS]
DAY = 86_400
COUNTERS = [
    ("job_runs_total", {"status": "success"}),
    ("job_runs_total", {"status": "failure"}),
    ("job_dlq_messages_total", {}),
]


def _history(now: float) -> list[FinishedRun]:
    """Runs of trending_1h and cache_warmer, 20 of them 10 days old and 12 of today.

    Every fourth fails and was delivered to the DLQ.
    """
    runs = []
    for i, start in enumerate(
        [now - 10 * DAY + i * 60 for i in range(20)] + [now - 3600 + i * 60 for i in range(12)]
    ):
        failed = i % 4 == 0
        runs.append(
            FinishedRun(
                job_name=JOBS[0] if i % 2 else "cache_warmer",
                ok=not failed,
                start=start,
                end=start + 2,
                tags={DELIVERED_TAG: DELIVERED_VALUE} if failed else {},
            )
        )
    return runs


def _samples(url: str) -> dict[tuple[str, str, str], float | None]:
    text = scrape(url)
    return {
        (name, job, labels.get("status", "")): sample(text, PUSH_JOB, name, job_name=job, **labels)
        for job in (JOBS[0], "cache_warmer")
        for name, labels in COUNTERS
    }


def test_deletions_a_lost_cursor_and_the_retention_lower_no_counter(tmp_path, service_binaries):
    [port] = free_ports(1)
    config = StackConfig(state_dir=tmp_path / ".nova", pushgateway_port=port)
    url = f"http://127.0.0.1:{port}"
    sensor = build_job_metrics_sensor(SPECS)
    up(config, services=("pushgateway",))
    try:
        with history_instance(Path(tmp_path / "home")) as instance:
            add_history(instance, _history(time.time()))
            metrics = JobMetricsResource(gateway=url)

            def evaluate(cursor: str | None) -> str | None:
                with dg.build_sensor_context(
                    instance=instance, cursor=cursor, resources={"job_metrics": metrics}
                ) as context:
                    sensor.evaluate_tick(context)
                    return context.cursor

            cursor = evaluate(None)
            first = _samples(url)
            assert first[("job_runs_total", "cache_warmer", "failure")] == 8
            assert first[("job_dlq_messages_total", "cache_warmer", "")] == 8
            seen = [first]

            # The UI's Delete on three of today's runs, then a lost cursor.
            for run in instance.get_runs(limit=3):
                instance.delete_run(run.run_id)
            cursor = evaluate("not a cursor")
            seen.append(_samples(url))

            # The retention deletes the 20 old runs, then the cursor is lost again.
            done = prune(instance, JOBS, cutoff_for(7), Budget(20))
            assert done.deleted == 20 and instance.get_runs_count() == 9
            assert sum(Ledger.load(instance).totals.values()) > 20
            cursor = evaluate(cursor)
            seen.append(_samples(url))
            evaluate("{}")
            seen.append(_samples(url))
    finally:
        down(config, services=("pushgateway",))
    for before, after in pairwise(seen):
        for key, value in before.items():
            assert after[key] is not None and after[key] >= value, (key, before, after)
    # Nothing new ran: every count is exactly what was first pushed.
    assert seen[-1] == first
