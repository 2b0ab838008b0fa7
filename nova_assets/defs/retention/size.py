"""The instance's footprint, for `nova-assets history size`: runs, events, files and bytes."""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import dagster as dg

from nova_assets.internals.history_store import database_bytes, event_count


@dataclass(frozen=True)
class Footprint:
    runs: int
    indexed_events: int
    """Events in the event log's index: on PostgreSQL every event; on SQLite the index lists the
    runs' status and asset events, each run's other events sit in the run's own file."""
    files: int
    """Files under the instance's folder (on SQLite its databases, one per run, and storage/)."""
    file_bytes: int
    database_bytes: int | None
    """The PostgreSQL database's size; None when the instance stores in files."""

    def as_json(self) -> str:
        return json.dumps(asdict(self))

    def as_text(self) -> str:
        lines = [
            f"runs       {self.runs:,}",
            f"events     {self.indexed_events:,} (indexed)",
            f"files      {self.files:,} ({self.file_bytes / 2**20:,.1f} MiB)",
        ]
        if self.database_bytes is not None:
            lines.append(f"database   {self.database_bytes / 2**20:,.1f} MiB (PostgreSQL)")
        return "\n".join(lines)


def footprint_of(instance: dg.DagsterInstance, home: Path | None = None) -> Footprint:
    """The footprint of `instance`, whose folder is `home` (default: the instance's own)."""
    files = [p for p in (home or Path(instance.root_directory)).rglob("*") if p.is_file()]
    return Footprint(
        runs=instance.get_runs_count(),
        indexed_events=event_count(instance),
        files=len(files),
        file_bytes=sum(p.stat().st_size for p in files),
        database_bytes=database_bytes(instance),
    )
