"""The code location with every suggestions ranking query slowed down: the sharing test's.

Each ranking query holds the ClickHouse slot `NOVA_TEST_RANKING_DELAY_S` seconds longer, as a
shard of a much larger graph would; everything else is the project's own code location.
"""

import os
import time
from collections.abc import Mapping
from typing import Any

from nova_assets import definitions as location
from nova_assets.core.resources import ClickHouseResource
from nova_assets.core.settings import load_settings
from nova_assets.defs.suggestions.sql import RANKING_SQL


class SlowRankingClickHouse(ClickHouseResource):
    def query_rows(self, sql: str, parameters: Mapping[str, Any] | None = None) -> list[tuple]:
        if sql == RANKING_SQL:
            time.sleep(float(os.environ.get("NOVA_TEST_RANKING_DELAY_S", "0")))
        return super().query_rows(sql, parameters)


settings = load_settings()
defs = location.rebind(
    location.defs, resources={"clickhouse": SlowRankingClickHouse(url=settings.clickhouse_url)}
)
