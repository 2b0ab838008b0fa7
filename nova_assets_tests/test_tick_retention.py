"""Both instance files keep sensor and schedule ticks under Dagster's `retention:` settings.

Six sensors every 15 s tick about 35,000 times a day. Without a retention Dagster keeps every
tick but skipped sensor ticks (7 days) forever; with it, what a year leaves is a few days' worth.
"""

from pathlib import Path

import dagster as dg
import pytest
import yaml

from nova_assets.local.instance import write_instance

ROOT = Path(__file__).parents[1]

SENSOR_DAYS = {"skipped": 1, "success": 7, "started": 7, "failure": 30}
SCHEDULE_DAYS = {"skipped": 7, "success": 7, "started": 7, "failure": 30}
"""Days each kind of tick is kept; every kind Dagster knows is named (one left out is kept
forever, Dagster's default for all but skipped sensor ticks)."""


def _local(home: Path) -> dg.DagsterInstance:
    write_instance(home, 5)
    return dg.DagsterInstance.from_config(str(home))


def _production(home: Path) -> dg.DagsterInstance:
    config = yaml.safe_load((ROOT / "deploy" / "dagster.yaml").read_text())
    # Local storage in place of PostgreSQL, to load the rest of the file as it is.
    config["storage"] = {"sqlite": {"base_dir": str(home / "storage")}}
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return dg.DagsterInstance.from_config(str(home))


@pytest.mark.parametrize("make", [_local, _production], ids=["local", "production"])
def test_every_kind_of_tick_is_purged_after_a_bounded_number_of_days(make, tmp_path, monkeypatch):
    monkeypatch.setenv("MAX_CONCURRENT_JOBS", "5")
    instance = make(tmp_path / "home")
    try:
        retention = instance.get_settings("retention")
    finally:
        instance.dispose()
    assert retention["sensor"]["purge_after_days"] == SENSOR_DAYS
    assert retention["schedule"]["purge_after_days"] == SCHEDULE_DAYS
