"""The source schema (docs/design.md §2) and the helpers that create, empty and fingerprint it.

The Nova app owns these tables in production; they are created here only for local use and tests.
"""

from nova_assets.core.resources import ClickHouseResource
from nova_assets.core.sources import (
    BLOCKS,
    DATABASE,
    ENGAGEMENT_EVENTS,
    FOLLOWS,
    POSTS,
    TABLES,
)

CREATE_DATABASE = f"CREATE DATABASE IF NOT EXISTS {DATABASE}"

CREATE_POSTS = f"""
CREATE TABLE IF NOT EXISTS {POSTS}
(
    post_id UInt64,
    author_id UInt64,
    created_at DateTime64(3, 'UTC'),
    is_deleted UInt8,
    updated_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY post_id
"""

# Every ranking reads a window that ends at `as_of` (1 h, 24 h, 72 h, 7 d), and the 1 h trending
# query runs every minute. Leading the key with the event's hour lets the primary index skip all
# but the last hour or two of a day's partition; post_id then user_id inside the hour keep each
# post's events, and a user's repeated events on it, together for the GROUP BY post_id and the
# (user, post, type) dedup, and compress well. A key led by post_id would read whole days for
# the 1 h window.
CREATE_ENGAGEMENT_EVENTS = f"""
CREATE TABLE IF NOT EXISTS {ENGAGEMENT_EVENTS}
(
    event_time DateTime64(3, 'UTC'),
    user_id UInt64,
    post_id UInt64,
    event_type LowCardinality(String)
)
ENGINE = MergeTree
PARTITION BY toDate(event_time)
ORDER BY (toStartOfHour(event_time), post_id, user_id)
"""

CREATE_FOLLOWS = f"""
CREATE TABLE IF NOT EXISTS {FOLLOWS}
(
    follower_id UInt64,
    followee_id UInt64,
    is_deleted UInt8,
    updated_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (follower_id, followee_id)
"""

CREATE_BLOCKS = f"""
CREATE TABLE IF NOT EXISTS {BLOCKS}
(
    blocker_id UInt64,
    blocked_id UInt64,
    is_deleted UInt8,
    updated_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (blocker_id, blocked_id)
"""

SCHEMA = (CREATE_DATABASE, CREATE_POSTS, CREATE_ENGAGEMENT_EVENTS, CREATE_FOLLOWS, CREATE_BLOCKS)


def create_schema(clickhouse: ClickHouseResource) -> None:
    """Create the `nova` database and its four tables if they do not exist."""
    for statement in SCHEMA:
        clickhouse.command(statement)


def is_empty(clickhouse: ClickHouseResource) -> bool:
    """Whether the four tables hold no rows (tables that do not exist count as empty)."""
    names = [table.name for table in TABLES]
    rows = clickhouse.query_rows(
        "SELECT count() FROM system.tables "
        "WHERE database = {database:String} AND name IN {names:Array(String)} "
        "AND total_rows > 0",
        {"database": DATABASE, "names": names},
    )
    return rows[0][0] == 0


def truncate(clickhouse: ClickHouseResource) -> None:
    """Empty the four tables (those that exist)."""
    for table in TABLES:
        clickhouse.command(f"TRUNCATE TABLE IF EXISTS {table}")


def checksums(clickhouse: ClickHouseResource) -> dict[str, tuple[int, int]]:
    """Per table, (row count, order-independent checksum of all rows).

    The checksum is the wrapping sum of each row's hash: unlike XOR it does not cancel out the
    exact duplicate rows the data set contains on purpose.
    """
    result: dict[str, tuple[int, int]] = {}
    for table in TABLES:
        [(count, checksum)] = clickhouse.query_rows(
            f"SELECT count(), sum(cityHash64(*)) FROM {table}"
        )
        result[table] = (int(count), int(checksum))
    return result
