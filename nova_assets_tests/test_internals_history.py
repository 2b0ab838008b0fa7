"""Contract tests for `nova_assets.internals.history_store`: what it needs of Dagster's storage."""

import inspect

import dagster as dg

from nova_assets.internals.history_store import event_files, read_value, write_value
from nova_assets.local.instance import write_instance


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
    write_instance(tmp_path, 5)
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        storage = instance.event_log_storage
        assert list(inspect.signature(storage.path_for_shard).parameters) == ["run_id"]
        run = dg.DagsterRun(job_name="a_job", run_id="0" * 8 + "-0000-0000-0000-" + "0" * 12)
        instance.add_run(run)
        instance.report_engine_event("hello", run)
        files = event_files(instance, run.run_id)
    assert files == [tmp_path / "history" / "runs" / f"{run.run_id}.db"]
