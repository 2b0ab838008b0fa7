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
    """Events in the event log's table: every event on PostgreSQL and in the local instance's one
    database; with a database per run, only the status and asset events its index lists."""
    files: int
    """Files under the instance's folder (on SQLite its databases, and storage/)."""
    file_bytes: int
    disk_bytes: int
    """What the folder takes on disk, as `du` counts it (blocks of its files and folders)."""
    database_bytes: int | None
    """The PostgreSQL database's size; None when the instance stores in files."""

    def as_json(self) -> str:
        return json.dumps(asdict(self))

    def as_text(self) -> str:
        lines = [
            f"runs       {self.runs:,}",
            f"events     {self.indexed_events:,} (indexed)",
            f"files      {self.files:,} ({self.file_bytes / 2**20:,.1f} MiB; "
            f"{self.disk_bytes / 2**20:,.1f} MiB on disk)",
        ]
        if self.database_bytes is not None:
            lines.append(f"database   {self.database_bytes / 2**20:,.1f} MiB (PostgreSQL)")
        return "\n".join(lines)


def footprint_of(instance: dg.DagsterInstance, home: Path | None = None) -> Footprint:
    """The footprint of `instance`, whose folder is `home` (default: the instance's own)."""
    folder = home or Path(instance.root_directory)
    entries = [folder, *folder.rglob("*")]
    files = [p for p in entries if p.is_file()]
    return Footprint(
        runs=instance.get_runs_count(),
        indexed_events=event_count(instance),
        files=len(files),
        file_bytes=sum(p.stat().st_size for p in files),
        disk_bytes=sum(p.lstat().st_blocks * 512 for p in entries),
        database_bytes=database_bytes(instance),
    )
