"""The one place that touches Dagster's private modules (`dagster._…`), and why each is needed.

Dagster does not promise these names from one release to the next. Every use sits in this
folder, the only part of `nova_assets` that names a `dagster._` module, and
`nova_assets_tests/test_internals.py` checks each symbol (it exists, with the signature and the
attributes used here): after a Dagster upgrade, those tests say what moved.

- `pool_wait`: the in-process executor's wait loop, two fixes applied by every process that
  loads the code location (production included), each guarded: if its class or method moved,
  the location loads and one warning says that fix is off.
  - `InstanceConcurrencyContext` (`dagster._core.execution.plan.instance_concurrency_context`):
    its `interval_to_next_pending_claim_check()` is replaced, reading the instance's
    `_pending_claims` and `_pending_timeouts`, so a step waiting for a pool slot sleeps rather
    than spins.
  - `ActiveExecution` (`dagster._core.execution.plan.active`): `sleep_til_ready` and
    `get_next_step` are wrapped so a termination ends a wait for a slot or a retry at once and
    no step starts after it. The wrappers read the run through `_instance_concurrency_context`
    (its `_instance` and `_run_id`) and let a just-claimed slot go with its `free_step`.
- `slot_storage`: the local instance's event log. `dagster._core.storage.event_log.
  ConsolidatedSqliteEventLogStorage` subclassed (its constructor, `_base_dir`, `_init_db`,
  `get_db_path`, `watch`, `end_watch`, `dispose`) so every run's events go into one database that
  gives deleted runs' pages back, watched by `SqlPollingEventWatcher`
  (`dagster._core.storage.event_log.polling_event_watcher`); it and `SqliteEventLogStorage` (for
  homes written with a database per run) get the same slot locks around `claim_concurrency_slot`,
  `free_concurrency_slot_for_step` and `free_concurrency_slots_for_run`, reading the claim
  status's `is_claimed`, `enqueued_timestamp` and `with_sleep_interval`, so SQLite hands a pool
  slot to one process at a time and a waiting step asks again sooner. Named only by the local
  instance config.
- `run_launcher`: what the local run launcher needs besides the public `dg.DefaultRunLauncher`:
  `dagster._core.launcher.LaunchRunContext` (the argument of `launch_run`),
  `dagster._grpc.types.ExecuteRunArgs` (the argument of `dagster api execute_run`),
  `dagster._cli.api.api_cli` (that command, run inside the forked worker),
  `DefaultRunLauncher._run_ids` (the runs its `join` waits for), and the names of Dagster's
  run-execution modules the fork server imports ahead. Named only by the local instance config.

- `history_store`: the run storage's key-value store (`get_cursor_values`, `set_cursor_values`)
  for the retention's ledger and cursor, a run's event file on SQLite (`path_for_shard`), the
  event log's table (`SqlEventLogStorageTable`: a run's bytes, the deletion of a successful run's
  detail events through `run_connection`, and the count for `history size`), and the local event
  log's `reclaim_space`. Checked by
  `nova_assets_tests/test_internals_history.py`.
- `storage_identity`: the run storage's id (`get_run_storage_id`), which names an instance's
  suggestion graphs.
- `readonly_storage`, `readonly_instance`, `readonly_postgres`: the instance opened read-only for
  the CLI (`health`, `history`, `dlq replay`), never loaded by the code location. Checked by
  `nova_assets_tests/test_internals_health.py`.

Not fenced, because they are how every custom run launcher reaches its instance:
`RunLauncher._instance` and `has_instance`.
"""
