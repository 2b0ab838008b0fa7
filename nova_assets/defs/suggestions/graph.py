"""The run's follow graph in ClickHouse: built once per run, copied into each shard's session.

`build_graph` resolves the live edges into tables of the run's own in WORK_DATABASE (the
expensive part, once per run); `drop_graph` removes them at the run's end, and
`drop_finished_graphs` the ones that runs which never got there left behind.

Several Dagster instances may share one ClickHouse (staging and production, blue and green), and
none knows the others' runs. So a graph is named after its instance as well as its run
(`graph_id_for`): its id is OWNER_DIGITS hex digits of the instance's storage id, then the rest
of the run id's. An instance drops its own graphs unless their run is in flight; another
instance's, or one from before graphs were named so, only once FOREIGN_GRAPH_AGE_S old, far
beyond any run's maximum runtime.

`SessionGraph` copies
the graph into Join tables of a ClickHouse session and ranks from them; when the session is lost
(a balancer that sends a new connection to another server, a server restart, a session expired),
its tables are gone and the ranking query says so (`UNKNOWN_TABLE` naming them,
`SESSION_NOT_FOUND`, `SESSION_IS_LOCKED`), so it copies the graph into a new session and ranks the
chunk again, which gives the same lists. Only after MAX_SESSION_LOSSES losses in a row does it
give up, with a transient fault that the step's retry policy retries.
"""

import hashlib
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import dagster as dg

from nova_assets.core.contract import clickhouse_error_code
from nova_assets.core.jobs import SUGGESTIONS_ASSET
from nova_assets.core.resources import (
    UNKNOWN_TABLE,
    ClickHouseResource,
    names_in_error,
    session_tables_lost,
)
from nova_assets.defs.suggestions.ranking import TOP_SUGGESTIONS, UserSuggestions, rank_users
from nova_assets.defs.suggestions.sql import (
    DROP_COUNTS_SQL,
    GRAPH_ID_PATTERN,
    GRAPH_PARTS,
    GRAPH_PREFIX,
    SESSION_TABLES,
    WORK_DATABASE,
    build_statements,
    graph_size_sql,
    graph_table,
    load_statements,
    most_followed_statement,
)
from nova_assets.internals.storage_identity import storage_id

MAX_SESSION_LOSSES = 3
"""Sessions lost in a row (no chunk ranked in between) before the step gives up and retries."""
OWNER_DIGITS = 8
"""Hex digits of a graph's id that name its instance; the other 24 are the run id's last 24 (90
random bits of a UUID4: no two runs' graphs meet)."""
FOREIGN_GRAPH_AGE_S = 86_400
"""How old another instance's graph must be before this one drops it: a day, 24 times the
longest a run may take (`dagster/max_runtime`)."""
_GRAPH_HOLDING_STATUSES = [
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
"""The statuses of a run whose graph may be in use: it began executing and has not ended."""


@dataclass(frozen=True)
class Graph:
    """The sizes of a run's graph, as `build_graph` built it."""

    live_follows: int
    live_blocks: int
    fill_pool_size: int


# -- the graph in storage -----------------------------------------------------------------------


def build_graph(clickhouse: ClickHouseResource, graph_id: str) -> Graph:
    """Build a run's graph tables from the live edges: the expensive part, once per run."""
    ensure_work_database(clickhouse)
    drop_graph(clickhouse, graph_id)
    for statement in build_statements(graph_id):
        clickhouse.command(statement)
    [(follows, blocks, largest_exclusion)] = clickhouse.query_rows(graph_size_sql(graph_id))
    # u itself, F(u) and B(u) may all sit in the list ahead of the fill, with TOP after them.
    pool_size = TOP_SUGGESTIONS + 1 + int(largest_exclusion or 0)
    clickhouse.command(most_followed_statement(graph_id), {"pool_size": pool_size})
    clickhouse.command(DROP_COUNTS_SQL)
    return Graph(int(follows or 0), int(blocks), pool_size)


def ensure_work_database(clickhouse: ClickHouseResource) -> None:
    """Create WORK_DATABASE unless it exists.

    On a server an operator may have created it and granted no `CREATE DATABASE`.
    """
    [(exists,)] = clickhouse.query_rows(
        "SELECT count() FROM system.databases WHERE name = {db:String}", {"db": WORK_DATABASE}
    )
    if not exists:
        clickhouse.command(f"CREATE DATABASE IF NOT EXISTS {WORK_DATABASE}")


def drop_graph(clickhouse: ClickHouseResource, graph_id: str) -> None:
    for part in GRAPH_PARTS:
        clickhouse.command(f"DROP TABLE IF EXISTS {graph_table(graph_id, part)}")


def instance_owner(instance: dg.DagsterInstance) -> str:
    """The OWNER_DIGITS hex digits that name the instance's graphs."""
    return hashlib.sha256(storage_id(instance).encode()).hexdigest()[:OWNER_DIGITS]


def graph_id_for(instance: dg.DagsterInstance, run_id: str, owner: str | None = None) -> str:
    """The id of a run's graph: the instance's owner digits, then the run id's last digits."""
    owner = owner if owner is not None else instance_owner(instance)
    return owner + uuid.UUID(run_id).hex[OWNER_DIGITS:]


@dataclass(frozen=True)
class StoredGraph:
    """A graph found in WORK_DATABASE, and how long ago its newest table was created."""

    graph_id: str
    age_s: float


def graphs_in_storage(clickhouse: ClickHouseResource) -> list[StoredGraph]:
    """Every run graph in WORK_DATABASE (none if the database does not exist yet)."""
    rows = clickhouse.query_rows(
        "SELECT name, dateDiff('second', metadata_modification_time, now()) FROM system.tables "
        "WHERE database = {db:String} AND startsWith(name, {p:String})",
        {"db": WORK_DATABASE, "p": GRAPH_PREFIX},
    )
    ages: dict[str, float] = {}
    for name, age in rows:
        stem = str(name)[len(GRAPH_PREFIX) :]
        for part in GRAPH_PARTS:
            graph_id = stem.removesuffix(f"_{part}")
            if graph_id != stem and GRAPH_ID_PATTERN.match(graph_id):
                ages[graph_id] = min(ages.get(graph_id, float(age)), float(age))
    return [StoredGraph(graph_id, age) for graph_id, age in sorted(ages.items())]


def drop_finished_graphs(
    clickhouse: ClickHouseResource,
    instance: dg.DagsterInstance,
    keep: str,
    log: Any,
    foreign_after_s: float = FOREIGN_GRAPH_AGE_S,
) -> list[str]:
    """Drop this instance's graphs whose run is not in flight, and other graphs a day old.

    A run that failed or was killed before its last step leaves its graph behind; so does a run
    deleted since. Another instance's graph may belong to a run in flight there, which this
    instance cannot see: it is dropped only once `foreign_after_s` old. Returns the graphs
    dropped.
    """
    owner = instance_owner(instance)
    stored = graphs_in_storage(clickhouse)
    in_flight = set()
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=_GRAPH_HOLDING_STATUSES)):
        try:
            in_flight.add(graph_id_for(instance, record.dagster_run.run_id, owner))
        except ValueError:  # not a UUID: no run of Dagster's, so no graph of ours either
            continue
    dropped = []
    for graph in stored:
        if graph.graph_id == keep or graph.graph_id in in_flight:
            continue
        if graph.graph_id.startswith(owner):
            why = "left by a run of this instance that is no longer in flight"
        elif graph.age_s >= foreign_after_s:
            why = (
                f"of another instance, or from before graphs were named so, {graph.age_s:.0f} s old"
            )
        else:
            continue
        drop_graph(clickhouse, graph.graph_id)
        dropped.append(graph.graph_id)
        log.info(f"{SUGGESTIONS_ASSET}: dropped the graph {graph.graph_id}, {why}.")
    return dropped


# -- the graph in a session ---------------------------------------------------------------------


def _drop_session_tables(clickhouse: ClickHouseResource) -> None:
    for table in SESSION_TABLES:
        clickhouse.command(f"DROP TEMPORARY TABLE IF EXISTS {table}")


def _load_graph(clickhouse: ClickHouseResource, graph_id: str) -> None:
    """Copy a run's graph into Join tables of the resource's current session."""
    _drop_session_tables(clickhouse)
    for statement in load_statements(graph_id):
        clickhouse.command(statement)


def session_lost(exc: BaseException) -> str | None:
    """Why `exc` means the graph's session is gone (its name for the log), or None.

    Beyond the session's own tables, the run's graph missing means the same: it was built on one
    server and asked for on another.
    """
    reason = session_tables_lost(exc, SESSION_TABLES)
    if reason is None and clickhouse_error_code(exc) == UNKNOWN_TABLE:
        # Built on one server, asked for on another: the session's requests reach two servers.
        if any(name.startswith(GRAPH_PREFIX) for name in names_in_error(exc)):
            return "UNKNOWN_TABLE: the run's graph is not on this server"
    return reason


class SessionLostError(RuntimeError):
    """The session holding the graph was lost again and again. Transient: the step is retried."""


T = TypeVar("T")


class SessionGraph:
    """A run's graph in Join tables of the resource's ClickHouse session.

    `rank` ranks a chunk from those tables; when the session turns out to be lost, the graph is
    copied again into a new session and the chunk ranked again.
    """

    def __init__(self, clickhouse: ClickHouseResource, graph_id: str, log: Any = None) -> None:
        self._clickhouse = clickhouse
        self._graph_id = graph_id
        self._log = log
        self._loaded = False
        self.sessions_lost = 0
        """How many times this shard found its session lost and copied the graph again."""

    def load(self) -> None:
        """Copy the graph into the current session (again into a new one if that one is lost)."""
        self._in_session(lambda: None)

    def rank(self, user_ids: Sequence[int]) -> list[UserSuggestions]:
        """`rank_users` from the session's tables, copying them again when the session was lost."""
        return self._in_session(lambda: rank_users(self._clickhouse, user_ids))

    def drop(self) -> None:
        """Drop the session's tables; a lost session has taken them already."""
        self._loaded = False
        try:
            _drop_session_tables(self._clickhouse)
        except Exception as exc:
            if session_lost(exc) is None:
                raise

    def _in_session(self, action: Callable[[], T]) -> T:
        losses = 0
        while True:
            try:
                if not self._loaded:
                    _load_graph(self._clickhouse, self._graph_id)
                    self._loaded = True
                return action()
            except Exception as exc:
                reason = session_lost(exc)
                if reason is None:
                    raise
                losses += 1
                if losses >= MAX_SESSION_LOSSES:
                    raise SessionLostError(
                        f"{SUGGESTIONS_ASSET}: the ClickHouse session holding the follow graph "
                        f"was lost {losses} times in a row ({reason}). The requests of one "
                        "session must reach one server: point CLICKHOUSE_URL at one server or "
                        "replica, or at a balancer that keeps a connection, or the session_id "
                        "parameter, on one server (deploy/README.md)."
                    ) from exc
                self.sessions_lost += 1
                self._loaded = False
                if self._log is not None:
                    self._log.warning(
                        f"{SUGGESTIONS_ASSET}: the ClickHouse session holding the graph was lost "
                        f"({reason}); copying it into a new session and ranking the chunk again."
                    )
                self._clickhouse.renew_session()


@contextmanager
def session_graph(
    clickhouse: ClickHouseResource, graph_id: str, log: Any = None
) -> Iterator[SessionGraph]:
    """A run's graph (`build_graph`) copied into the session for `rank_users`; dropped on exit."""
    graph = SessionGraph(clickhouse, graph_id, log)
    try:
        graph.load()
        yield graph
    finally:
        graph.drop()


@contextmanager
def suggestion_graph(clickhouse: ClickHouseResource, log: Any = None) -> Iterator[SessionGraph]:
    """Build a graph of its own and load it into the session, as a shard would.

    Both are dropped on exit. For rankings outside a run: the tests, the benchmarks.
    """
    graph_id = uuid.uuid4().hex
    try:
        build_graph(clickhouse, graph_id)
        with session_graph(clickhouse, graph_id, log) as graph:
            yield graph
    finally:
        drop_graph(clickhouse, graph_id)
