"""Schedules: every job's tick is skipped with a reason while that job has a run in flight.

A real slow run of a job named like ours runs on a real Dagster instance while the schedule's
tick is evaluated; the tick skips, naming the run, and once the run is over the next tick asks
for a run again. Also: every job has its schedule, at the cadence the settings give.
"""

import threading
import time

import dagster as dg
import pytest

from nova_assets import definitions
from nova_assets.core.jobs import ACTIVE_STATUSES, JOB_TAG, JobSpec
from nova_assets.core.settings import Settings
from nova_assets.defs.schedules import build_schedule


def _slow_job(name: str, started: threading.Event, release: threading.Event) -> dg.JobDefinition:
    @dg.asset(name=f"slow_{name}")
    def slow() -> None:
        started.set()
        release.wait(timeout=30)

    job = dg.define_asset_job(name, selection=[slow], tags={JOB_TAG: name})
    return dg.Definitions(assets=[slow], jobs=[job]).resolve_job_def(name)


def _tick(schedule: dg.ScheduleDefinition, instance: dg.DagsterInstance):
    with dg.build_schedule_context(instance=instance) as context:
        return schedule.evaluate_tick(context)


def test_a_tick_is_skipped_while_its_job_runs_and_fires_when_it_is_done():
    started, release = threading.Event(), threading.Event()
    job = _slow_job("trending_1h", started, release)
    schedule = build_schedule(JobSpec("trending_1h", "slow_trending_1h", "* * * * *"), job)
    other = build_schedule(JobSpec("cache_warmer", "warmed_feeds", "* * * * *"), job)
    with dg.instance_for_test() as instance:
        assert len(_tick(schedule, instance).run_requests) == 1

        runner = threading.Thread(target=lambda: job.execute_in_process(instance=instance))
        runner.start()
        assert started.wait(timeout=30)
        [record] = instance.get_run_records()
        skipped = _tick(schedule, instance)
        # Another job's schedule is not held back by this run.
        assert len(_tick(other, instance).run_requests) == 1
        release.set()
        runner.join()
        time.sleep(0.1)
        assert len(_tick(schedule, instance).run_requests) == 1

    assert skipped.run_requests == []
    assert record.dagster_run.run_id in skipped.skip_message
    assert "skipped, not queued" in skipped.skip_message


@pytest.mark.parametrize(
    "status",
    [
        dg.DagsterRunStatus.NOT_STARTED,
        dg.DagsterRunStatus.STARTING,
        dg.DagsterRunStatus.CANCELING,
    ],
)
def test_a_run_not_yet_finished_skips_the_tick(status):
    job = _slow_job("trending_24h", threading.Event(), threading.Event())
    schedule = build_schedule(JobSpec("trending_24h", "slow_trending_24h", "*/5 * * * *"), job)
    with dg.instance_for_test() as instance:
        instance.add_run(dg.DagsterRun(job_name="trending_24h", status=status))
        result = _tick(schedule, instance)
    assert result.run_requests == []
    assert status.value.lower() in result.skip_message
    # A queued run (waiting on the run coordinator's limits) counts the same way.
    assert dg.DagsterRunStatus.QUEUED in ACTIVE_STATUSES


def test_every_job_has_its_schedule_at_the_configured_cadence():
    repository = definitions.defs.get_repository_def()
    schedules = {s.job_name: s for s in repository.schedule_defs}
    jobs = {j.name for j in repository.get_all_jobs() if not j.name.startswith("__")}
    assert jobs == set(schedules)
    settings = Settings.from_env({})
    expected = {
        "trending_1h": "* * * * *",
        "trending_24h": "*/5 * * * *",
        "trending_7d": "0 * * * *",
    }
    for job_name, cron in expected.items():
        assert schedules[job_name].cron_schedule == cron
        assert schedules[job_name].default_status == dg.DefaultScheduleStatus.RUNNING
    assert settings.trending_cron == "* * * * *"


def test_a_tick_is_skipped_while_a_run_of_another_job_materializes_its_asset():
    """The UI's Materialize button launches Dagster's implicit asset job: still skipped."""
    started, release = threading.Event(), threading.Event()

    @dg.asset(name="trending_posts_1h")
    def slow() -> None:
        started.set()
        release.wait(timeout=30)

    job = _slow_job("trending_1h", threading.Event(), threading.Event())
    schedule = build_schedule(JobSpec("trending_1h", "trending_posts_1h", "* * * * *"), job)
    other = build_schedule(JobSpec("cache_warmer", "warmed_feeds", "* * * * *"), job)
    with dg.instance_for_test() as instance:
        runner = threading.Thread(target=lambda: dg.materialize([slow], instance=instance))
        runner.start()
        assert started.wait(timeout=30)
        [record] = instance.get_run_records()
        skipped = _tick(schedule, instance)
        not_held = _tick(other, instance)
        release.set()
        runner.join()

    assert record.dagster_run.job_name != "trending_1h"
    assert skipped.run_requests == []
    assert record.dagster_run.run_id in skipped.skip_message
    assert len(not_held.run_requests) == 1
