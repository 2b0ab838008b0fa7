"""The retention's ledger: what deleted runs counted for, and the runs being deleted.

The metrics count a job's runs from the instance's history (docs/design.md §7). Once runs are
deleted, a recount of what is left would be lower than what Prometheus has already scraped, so
the retention adds each deleted run to per-job totals here first, and the recount adds them back
(`retired_totals`). The ledger lives in the instance's own key-value store, one value written in
one statement, so it is exactly as durable as the runs it stands for.

`pending` holds the ids of the page being deleted: written with the totals before the first
deletion and cleared after the last, so a prune cut short finishes those runs (already counted)
instead of counting them again.
"""

import json
from collections import Counter
from dataclasses import dataclass, field

import dagster as dg

from nova_assets.internals.history_store import read_value, write_value

LEDGER_KEY = "nova/retention/ledger"
KINDS = ("success", "failure", "dlq")
"""What a deleted run may have counted for: a success, a failure, a delivered DLQ message."""

Retired = Counter[tuple[str, str]]
"""(job name, kind) → runs deleted."""


@dataclass
class Ledger:
    totals: Retired = field(default_factory=Counter)
    pending: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, instance: dg.DagsterInstance) -> "Ledger":
        raw = read_value(instance, LEDGER_KEY)
        if not raw:
            return cls()
        stored = json.loads(raw)
        totals: Retired = Counter()
        for job, counts in stored.get("totals", {}).items():
            for kind in KINDS:
                if counts.get(kind):
                    totals[(job, kind)] = int(counts[kind])
        return cls(totals, [str(run_id) for run_id in stored.get("pending", [])])

    def _save(self, instance: dg.DagsterInstance) -> None:
        totals: dict[str, dict[str, int]] = {}
        for (job, kind), count in sorted(self.totals.items()):
            totals.setdefault(job, {})[kind] = count
        write_value(instance, LEDGER_KEY, json.dumps({"totals": totals, "pending": self.pending}))

    def record(self, instance: dg.DagsterInstance, retired: Retired, run_ids: list[str]) -> None:
        """Add `retired` to the totals and name the runs about to be deleted, in one write."""
        self.totals.update(retired)
        self.pending = list(run_ids)
        self._save(instance)

    def settle(self, instance: dg.DagsterInstance) -> None:
        """The pending runs are gone."""
        self.pending = []
        self._save(instance)


def retired_totals(instance: dg.DagsterInstance, job_name: str) -> dict[str, int]:
    """One job's deleted successes, failures and delivered DLQ messages."""
    totals = Ledger.load(instance).totals
    return {kind: totals.get((job_name, kind), 0) for kind in KINDS}
