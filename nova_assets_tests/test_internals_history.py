"""Contract tests for `nova_assets.internals.history_store`: what it needs of Dagster's storage."""

import inspect

import dagster as dg

from nova_assets.internals.history_store import (
    event_bytes,
    event_files,
    read_value,
    reclaim,
    write_value,
)
from nova_assets.local.instance import write_instance
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
