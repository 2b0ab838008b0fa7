"""Which Dagster instance this is, as its storage knows it: the suggestions' graphs carry it.

Dagster's SQL run storages (SQLite, PostgreSQL, the in-memory one of an ephemeral instance) keep
a random id of their own in their `instance_info` table, made on first use
(`SqlRunStorage.get_run_storage_id`, which Dagster's telemetry reads). Every process that opens
the same storage reads the same id; two instances with storages of their own (staging and
production, blue and green) read different ones, whatever their configuration files say. The
method is not part of the abstract `RunStorage`, so it is looked up at run time: a storage
without it gets an id for this process alone (`nova_assets_tests/test_suggestions_instances.py`
checks the SQL storages still have it).
"""

import uuid

import dagster as dg

_PROCESS_ID = uuid.uuid4().hex
"""The identity of an instance whose run storage keeps no id: this process's own."""


def storage_id(instance: dg.DagsterInstance) -> str:
    """The instance's run storage id: the same for every process that opens the storage."""
    get_id = getattr(instance.run_storage, "get_run_storage_id", None)
    return str(get_id()) if callable(get_id) else _PROCESS_ID
