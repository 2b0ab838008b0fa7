"""Contract tests for `nova_assets.internals.history_store`: what it needs of Dagster's storage."""

import inspect

import dagster as dg

from nova_assets.internals.history_store import (
    delete_events,
    event_bytes,
    event_files,
    read_value,
    reclaim,
    write_value,
)
from nova_assets.local.instance import write_instance
from nova_assets_tests.conftest import postgres_home
from nova_assets_tests.layouts import write_per_run_instance


def test_the_run_storage_keeps_values_by_key_and_overwrites_them(tmp_path):
    write_instance(tmp_path, 5)
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert read_value(instance, "nova/test") is None
        write_value(instance, "nova/test", "one")
        write_value(instance, "nova/test", "two")
        assert read_value(instance, "nova/test") == "two"
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert read_value(instance, "nova/test") == "two"


def test_the_sqlite_event_log_names_the_file_of_a_run(tmp_path):
    write_per_run_instance(tmp_path)
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        storage = instance.event_log_storage
        assert list(inspect.signature(storage.path_for_shard).parameters) == ["run_id"]
        run = dg.DagsterRun(job_name="a_job", run_id="0" * 8 + "-0000-0000-0000-" + "0" * 12)
        instance.add_run(run)
        instance.report_engine_event("hello", run)
        files = event_files(instance, run.run_id)
    assert files == [tmp_path / "history" / "runs" / f"{run.run_id}.db"]


def test_the_single_event_database_measures_a_run_and_gives_its_pages_back(tmp_path):
    write_instance(tmp_path, 5)
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        run = instance.add_run(dg.DagsterRun(job_name="a_job"))
        for _ in range(100):
            instance.report_engine_event("x" * 1000, run)
        assert event_files(instance, run.run_id) == []
        assert 100_000 < event_bytes(instance, run.run_id) < 200_000
        instance.delete_run(run.run_id)
        assert event_bytes(instance, run.run_id) == 0
        assert reclaim(instance) > 100_000
        assert reclaim(instance) == 0  # nothing left to give back


def _types(instance: dg.DagsterInstance, run_id: str) -> list[str | None]:
    return [
        e.dagster_event.event_type_value if e.dagster_event else None
        for e in instance.all_logs(run_id)
    ]


def test_a_run_s_events_of_some_types_and_its_log_lines_are_deleted_the_rest_stay(
    tmp_path, postgres_url
):
    engine = dg.DagsterEventType.ENGINE_EVENT.value
    layouts = {
        "single": lambda home: write_instance(home, 5),
        "per_run": write_per_run_instance,
        "postgres": lambda home: postgres_home(home, postgres_url),
    }
    for layout, write in layouts.items():
        home = tmp_path / layout
        write(home)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            run = instance.add_run(dg.DagsterRun(job_name="a_job"))
            other = instance.add_run(dg.DagsterRun(job_name="a_job"))
            for target in (run, other):
                instance.report_engine_event("x" * 1000, target)
                instance.report_run_failed(target)
            instance.handle_new_event(
                dg.EventLogEntry(
                    error_info=None,
                    level="INFO",
                    user_message="a line",
                    run_id=run.run_id,
                    timestamp=0.0,
                )
            )
            failed = dg.DagsterEventType.RUN_FAILURE.value
            assert _types(instance, run.run_id) == [engine, failed, None]
            dry = delete_events(instance, run.run_id, {engine}, dry_run=True)
            assert _types(instance, run.run_id) == [engine, failed, None]
            assert delete_events(instance, run.run_id, {engine}) == dry > 1000
            assert _types(instance, run.run_id) == [failed], layout
            assert _types(instance, other.run_id) == [engine, failed], layout
            assert delete_events(instance, run.run_id, {engine}) == 0
