"""The source tables in ClickHouse and the rules every query reads them by (docs/design.md §2-3).

One home for each rule the rankings share, composed into their SQL:

* the table names (constants, never input);
* the latest-row rule of the versioned tables, with its tie-break: of two rows of one key at the
  same `updated_at`, the deleting row wins for posts and follows (when in doubt, no post and no
  follow) and the blocking row wins for blocks (when in doubt, blocked);
* the half-open window `(start, end]` on a time column, with instants bound as epoch milliseconds;
* an event's age in hours, for the decays;
* the event weights, bound as query parameters.
"""

from typing import Any

DATABASE = "nova"


class Table(str):
    """A source table's full name (it formats as `nova.posts`), with its latest-row rule.

    `version` orders a key's rows; `argMax(column, version)` is the column's latest value. The
    second element breaks a tie of `updated_at`: the greater one wins.
    """

    version: str
    key: tuple[str, ...]

    def __new__(cls, name: str, version: str = "", key: tuple[str, ...] = ()) -> "Table":
        table = super().__new__(cls, f"{DATABASE}.{name}")
        table.version = version
        table.key = key
        return table

    @property
    def name(self) -> str:
        """The table's name inside the database (`posts`)."""
        return self.split(".", 1)[1]

    def latest(self, column: str) -> str:
        """SQL for `column` of the key's latest row, inside a GROUP BY of the key."""
        return f"argMax({column}, {self.version})"

    @property
    def live(self) -> str:
        """SQL predicate (for HAVING): the key's latest row is not deleted."""
        return f"{self.latest('is_deleted')} = 0"

    def live_edges(self, where: str = "") -> str:
        """SQL for the live pairs of an edge table, self-edges dropped; `where` narrows the read.

        For follows and blocks: (a, b) where the pair's latest row is not deleted and a != b.
        """
        a, b = self.key
        narrowed = f" AND ({where})" if where else ""
        return (
            f"SELECT {a}, {b} FROM {self} WHERE {a} != {b}{narrowed} "
            f"GROUP BY {a}, {b} HAVING {self.live}"
        )


POSTS = Table("posts", version="(updated_at, is_deleted)", key=("post_id",))
"""A post's state is its latest row; a deleting row wins a tie."""
ENGAGEMENT_EVENTS = Table("engagement_events")
"""Append-only; duplicates and unknown types are the queries' to handle."""
FOLLOWS = Table("follows", version="(updated_at, is_deleted)", key=("follower_id", "followee_id"))
"""A follow edge's state is its latest row; an unfollow wins a tie."""
BLOCKS = Table("blocks", version="(updated_at, 1 - is_deleted)", key=("blocker_id", "blocked_id"))
"""A block edge's state is its latest row; a block wins a tie (suggest no one across it)."""
TABLES = (POSTS, ENGAGEMENT_EVENTS, FOLLOWS, BLOCKS)


def instant(parameter: str) -> str:
    """SQL for an instant bound as epoch milliseconds under `{parameter:Int64}`."""
    return f"fromUnixTimestamp64Milli({{{parameter}:Int64}}, 'UTC')"


def in_window(column: str, start: str = "start_ms", end: str = "as_of_ms") -> str:
    """SQL predicate: `start < column <= end`, the half-open windows of every ranking."""
    return f"{column} > {instant(start)} AND {column} <= {instant(end)}"


def age_hours(column: str, as_of: str = "as_of_ms") -> str:
    """SQL for `(as_of - column)` in fractional hours."""
    return f"({{{as_of}:Int64}} - toUnixTimestamp64Milli({column})) / 3600000."


EVENT_WEIGHTS: dict[str, float] = {"view": 0.1, "like": 1.0, "comment": 2.0, "share": 3.0}
"""Weight of each known event type; any other type weighs nothing and is ignored."""

EVENT_WEIGHT = "transform(event_type, {types:Array(String)}, {weights:Array(Float64)}, 0.)"
"""SQL for an event's weight, 0 for unknown types; transform() reads the LowCardinality dictionary,
not every row."""


def weight_parameters() -> dict[str, Any]:
    """The event weights as query parameters.

    `types` and `weights` serve `EVENT_WEIGHT`; each type and weight apart (`type_0`,
    `weight_0`, …) serve per-type sums.
    """
    return {
        "types": list(EVENT_WEIGHTS),
        "weights": list(EVENT_WEIGHTS.values()),
        **{f"type_{i}": t for i, t in enumerate(EVENT_WEIGHTS)},
        **{f"weight_{i}": w for i, w in enumerate(EVENT_WEIGHTS.values())},
    }
