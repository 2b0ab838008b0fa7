"""A suggestions run leaves no step output under `storage/`, for 2,000 users as for 50,000.

Its shards pass between steps as ranges of user ids, not lists of them, and the last step removes
what the steps handed on through Dagster's default IO manager once the values are written.
"""

from datetime import timedelta
from pathlib import Path

import dagster as dg

from nova_assets_tests.factories import ago, insert_edges, insert_events
from nova_assets_tests.test_suggestions import AS_OF, FOLLOWED_AT, ch, materialize  # noqa: F401


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def _run(ch, redis_cache, home: Path, users: int) -> tuple[dict[str, int], int]:  # noqa: F811
    """The files one run left under its storage folder, and how many users it served."""
    when = ago(AS_OF, hours=1)
    insert_events(
        ch, [(when - timedelta(seconds=u % 3600), u, 1, "view") for u in range(1, users + 1)]
    )
    insert_edges(ch, "follows", [(u, u % 97 + 1, 0, FOLLOWED_AT) for u in range(1, 200)])
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        result = materialize(ch, redis_cache, instance=instance)
        [materialization] = result.asset_materializations_for_node("compute_suggested_users")
        served = materialization.metadata["users_served"].value
        return _files(home / "storage" / result.run_id), served


def test_a_runs_footprint_does_not_grow_with_the_users(ch, redis_cache, tmp_path):  # noqa: F811
    small, served_small = _run(ch, redis_cache, tmp_path / "small", 2_000)
    large, served_large = _run(ch, redis_cache, tmp_path / "large", 50_000)
    assert (served_small, served_large) == (2_000, 50_000)
    # No step output is left; the run's logs (its progress lines) are the retention's to remove.
    outputs = [name for name in [*small, *large] if not name.startswith("compute_logs/")]
    assert outputs == [], (small, large)
    assert len(small) == len(large)
