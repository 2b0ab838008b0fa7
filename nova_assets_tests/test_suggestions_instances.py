"""Two Dagster instances on one ClickHouse: each drops only the suggestion graphs it owns.

Staging and production (or blue and green) may share a ClickHouse, and neither knows the other's
runs. A run's graph is named after its instance; here a whole run of a second instance, its plan
step included, happens between the first run's plan and its shards, and the first run's shards
still rank from its graph. An instance still drops its own leftovers (a finished run's, a deleted
run's), keeps its runs in flight, and leaves another instance's graph until it is a day old. The
instance's identity is its storage's id: the same for every process opening the storage.
"""

import uuid
from collections.abc import Callable
from typing import ClassVar

import dagster as dg
import pytest

from nova_assets.core.contract import iso_z
from nova_assets.core.jobs import SUGGESTIONS_ASSET, SUGGESTIONS_OP
from nova_assets.core.resources import ClickHouseResource
from nova_assets.defs.suggestions.assets import build_suggested_users_asset
from nova_assets.defs.suggestions.graph import (
    build_graph,
    drop_finished_graphs,
    drop_graph,
    graph_id_for,
    graphs_in_storage,
    instance_owner,
)
from nova_assets.internals.storage_identity import storage_id
from nova_assets_tests.factories import reset
from nova_assets_tests.test_suggestions import AS_OF, active, follows, served

NO_RETRIES = dg.RetryPolicy(max_retries=0)


class ElsewhereMeanwhile(ClickHouseResource):
    """The real engine; before a shard first copies its run's graph, `meanwhile` runs once."""

    meanwhile: ClassVar[list[Callable[[], None]]] = []

    def command(self, sql, parameters=None):
        if sql.lstrip().startswith("CREATE TEMPORARY TABLE suggested_users_follows\n"):
            while self.meanwhile:
                self.meanwhile.pop()()
        return super().command(sql, parameters)


def _materialize(clickhouse, redis_cache, instance):
    asset = build_suggested_users_asset(retry_policy=NO_RETRIES)
    return dg.materialize(
        [asset],
        resources={"clickhouse": clickhouse, "redis_cache": redis_cache},
        run_config={"ops": {SUGGESTIONS_OP: {"config": {"as_of": iso_z(AS_OF)}}}},
        instance=instance,
        raise_on_error=False,
    )


def _graph(clickhouse) -> None:
    reset(clickhouse)
    follows(clickhouse, (1, 2), (2, 3), (3, 4), (4, 1), (2, 5))
    active(clickhouse, 1, 2, 3, 4, 5)


def _stored(clickhouse) -> set[str]:
    return {graph.graph_id for graph in graphs_in_storage(clickhouse)}


def test_another_instances_plan_between_our_plan_and_our_shards_leaves_our_graph(
    clickhouse, redis_cache
):
    _graph(clickhouse)
    with dg.instance_for_test() as ours, dg.instance_for_test() as theirs:
        assert instance_owner(ours) != instance_owner(theirs)
        elsewhere = []

        def their_run() -> None:
            # Our plan has built our graph; their whole run goes now, its plan step first.
            assert any(g.startswith(instance_owner(ours)) for g in _stored(clickhouse))
            elsewhere.append(_materialize(clickhouse, redis_cache, theirs))

        ElsewhereMeanwhile.meanwhile = [their_run]
        resource = ElsewhereMeanwhile(url=clickhouse.url)
        result = _materialize(resource, redis_cache, ours)

    [theirs_result] = elsewhere
    assert theirs_result.success
    assert result.success, [e.message for e in result.get_step_failure_events()]
    assert served(redis_cache, 1)["items"]
    # Both runs dropped their own graphs at their end.
    assert not any(g.endswith(uuid.UUID(result.run_id).hex[8:]) for g in _stored(clickhouse))
    assert not any(g.endswith(uuid.UUID(theirs_result.run_id).hex[8:]) for g in _stored(clickhouse))


def _run(instance: dg.DagsterInstance, status: dg.DagsterRunStatus) -> str:
    run = instance.add_run(dg.DagsterRun(job_name=SUGGESTIONS_ASSET, status=status))
    return run.run_id


def test_an_instance_drops_its_own_leftovers_and_another_instances_only_when_a_day_old(
    clickhouse,
):
    _graph(clickhouse)
    with dg.instance_for_test() as ours, dg.instance_for_test() as theirs:
        graphs = {
            "finished": graph_id_for(ours, _run(ours, dg.DagsterRunStatus.FAILURE)),
            "deleted": graph_id_for(ours, str(uuid.uuid4())),
            "in_flight": graph_id_for(ours, _run(ours, dg.DagsterRunStatus.STARTED)),
            "current": graph_id_for(ours, _run(ours, dg.DagsterRunStatus.STARTED)),
            # Whether their run is in flight, this instance cannot tell.
            "theirs": graph_id_for(theirs, _run(theirs, dg.DagsterRunStatus.STARTED)),
        }
        for graph_id in graphs.values():
            build_graph(clickhouse, graph_id)
        log = dg.get_dagster_logger()

        dropped = drop_finished_graphs(clickhouse, ours, graphs["current"], log)
        assert set(dropped) == {graphs["finished"], graphs["deleted"]}
        assert {graphs["in_flight"], graphs["current"], graphs["theirs"]} <= _stored(clickhouse)

        # A day later, theirs is taken for abandoned too; ours in flight still is not.
        dropped = drop_finished_graphs(clickhouse, ours, graphs["current"], log, foreign_after_s=0)
        assert graphs["theirs"] in dropped
        assert graphs["in_flight"] not in dropped
    for graph_id in graphs.values():
        drop_graph(clickhouse, graph_id)


@pytest.mark.parametrize("kind", ["sqlite", "ephemeral"])
def test_an_instances_identity_is_its_storages_own(tmp_path, kind):
    """The contract the graph names rely on: SQL run storages keep an id of their own."""
    if kind == "ephemeral":
        first, second = dg.DagsterInstance.ephemeral(), dg.DagsterInstance.ephemeral()
        assert callable(first.run_storage.get_run_storage_id)
        assert storage_id(first) == storage_id(first) != storage_id(second)
        return
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for home in ("a", "b"):
        (tmp_path / home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with (
        dg.DagsterInstance.from_config(str(tmp_path / "a")) as one,
        dg.DagsterInstance.from_config(str(tmp_path / "a")) as same,
        dg.DagsterInstance.from_config(str(tmp_path / "b")) as other,
    ):
        assert callable(one.run_storage.get_run_storage_id)
        assert storage_id(one) == storage_id(same) != storage_id(other)
