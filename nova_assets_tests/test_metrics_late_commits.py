"""On PostgreSQL, a status event that commits after a higher storage id was read is still counted.

PostgreSQL gives an event its storage id when the row is inserted, not when it commits. Here two
transactions are opened by hand on a real PostgreSQL holding a Dagster instance: event A is
inserted (the lower id) and left uncommitted, event B is stored and committed, the metrics count
B, then A commits: the next evaluation counts A, once, and nothing twice. The instance's identity
(what names the suggestion graphs) is the same for every process that opens this storage. The
ids the recheck keeps to count nothing twice are bounded, and none it forgets comes up again.
"""

import json
import time
from datetime import UTC, datetime

import dagster as dg
import sqlalchemy

from nova_assets.core.budget import Budget
from nova_assets.core.jobs import job_specs
from nova_assets.core.settings import Settings
from nova_assets.defs.metrics.reading import COMMIT_WINDOW_S, RECENT_LIMIT, LateCommits, StatusEvent
from nova_assets.defs.metrics.recount import compute_job_metrics
from nova_assets.defs.metrics.state import MetricsState, advance
from nova_assets.internals.storage_identity import storage_id
from nova_assets_tests.conftest import postgres_home
from nova_assets_tests.test_metrics_budget import _started_run

SPECS = job_specs(Settings.from_env({}))


def _success(run: dg.DagsterRun) -> dg.EventLogEntry:
    return dg.EventLogEntry(
        error_info=None,
        level="DEBUG",
        user_message="",
        run_id=run.run_id,
        timestamp=time.time(),
        dagster_event=dg.DagsterEvent(dg.DagsterEventType.RUN_SUCCESS.value, job_name=run.job_name),
    )


def _successes(state: MetricsState) -> dict[str, int]:
    return {name: job.successes for name, job in state.jobs.items()}


def test_an_event_committed_after_a_higher_id_was_read_is_counted_once(tmp_path, postgres_url):
    home = postgres_home(tmp_path / "home", postgres_url)
    engine = sqlalchemy.create_engine(postgres_url)
    with dg.DagsterInstance.from_config(home) as instance:
        early = _started_run(instance, "trending_1h")
        late = _started_run(instance, "cache_warmer")
        a, b = _success(early), _success(late)
        with engine.connect() as held:
            # A takes its storage id now and commits only later, as a slow writer would.
            transaction = held.begin()
            a_id = held.execute(
                sqlalchemy.text(
                    "INSERT INTO event_logs (run_id, event, dagster_event_type, timestamp) "
                    "VALUES (:run_id, :event, :kind, :at) RETURNING id"
                ),
                {
                    "run_id": early.run_id,
                    "event": dg.serialize_value(a),
                    "kind": dg.DagsterEventType.RUN_SUCCESS.value,
                    "at": datetime.fromtimestamp(a.timestamp, UTC).replace(tzinfo=None),
                },
            ).scalar_one()
            instance.handle_new_event(b)  # B takes a higher id and commits first
            [b_record] = instance.fetch_run_status_changes(
                dg.DagsterEventType.RUN_SUCCESS, limit=10
            ).records
            assert b_record.storage_id > a_id

            state = advance(instance, MetricsState(), SPECS, Budget(30))
            assert _successes(state) == {"cache_warmer": 1}
            assert state.position == b_record.storage_id

            transaction.commit()
        # What Dagster does once the event is stored: the run's status and end.
        instance.run_storage.handle_run_event(
            early.run_id, a.get_dagster_event(), datetime.fromtimestamp(a.timestamp, UTC)
        )

        state = advance(instance, MetricsState.parse(state.serialize()), SPECS, Budget(30))
        assert _successes(state) == {"cache_warmer": 1, "trending_1h": 1}
        assert state.jobs["trending_1h"].last_success_timestamp == a.timestamp
        # Evaluated again: nothing is counted twice.
        state = advance(instance, MetricsState.parse(state.serialize()), SPECS, Budget(30))
        assert _successes(state) == {"cache_warmer": 1, "trending_1h": 1}
        for job in ("cache_warmer", "trending_1h"):
            assert compute_job_metrics(instance, job).successes == 1

        # The same storage opened again (another process would): the same identity.
        with dg.DagsterInstance.from_config(home) as again:
            assert storage_id(again) == storage_id(instance)
    engine.dispose()


def test_the_ids_kept_for_the_recheck_are_bounded_and_never_come_up_again():
    late = LateCommits()
    late.begin_pass(1000.0)
    late.finish_pass()
    assert late.horizon == 1000.0 - COMMIT_WINDOW_S
    for event_id in range(RECENT_LIMIT + 50):
        late.remember(StatusEvent(event_id, "success", "run", 1000.0 + event_id))
    late.bound_size()
    assert len(late.recent) <= RECENT_LIMIT
    # Every id forgotten is stamped at or below the horizon: no pass reads it, none counts it again.
    forgotten = set(range(RECENT_LIMIT + 50)) - set(late.recent)
    assert forgotten
    assert all(1000.0 + event_id < late.horizon for event_id in forgotten)
    assert min(late.recent) == max(forgotten) + 1 or not late.recent
    # Through the cursor and back, the same.
    assert LateCommits.from_json(json.loads(json.dumps(late.to_json()))) == late
