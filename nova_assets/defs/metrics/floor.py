"""What the Pushgateway already holds: the floor a rebuilt count must not go below.

A lost or unreadable cursor is rebuilt from run history. Runs deleted since they were counted
are not in it: those the run retention deleted are in its ledger (`defs/retention/ledger.py`)
and the rebuild starts from them; those deleted by hand in the UI are in no record but the
counters Prometheus has already scraped. So before a rebuilt count is pushed for the first time,
the gateway's `job_runs_total` and `job_dlq_messages_total` samples are read, and each total is
raised to at least its sample (docs/design.md §7): a counter never goes down.
"""

import urllib.request
from urllib.parse import unquote, urlsplit, urlunsplit

from prometheus_client.parser import text_string_to_metric_families

from nova_assets.core.bounded import call_within
from nova_assets.core.outbound import basic_auth

Floors = dict[tuple[str, str], float]
"""(job name, "success" | "failure" | "dlq") → the gateway's sample."""


def parse_floors(text: str, grouping: str) -> Floors:
    """The counters of one grouping (`job` label) in the gateway's /metrics text."""
    floors: Floors = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if labels.get("job") != grouping or "job_name" not in labels:
                continue
            if sample.name == "job_runs_total" and labels.get("status") in ("success", "failure"):
                floors[(labels["job_name"], labels["status"])] = sample.value
            elif sample.name == "job_dlq_messages_total":
                floors[(labels["job_name"], "dlq")] = sample.value
    return floors


def read_floors(gateway: str, grouping: str, seconds: float) -> Floors:
    """The gateway's counters of `grouping`, read within `seconds` (raises when it cannot be)."""
    parts = urlsplit(gateway)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    url = urlunsplit(parts._replace(netloc=hostport, path=parts.path.rstrip("/") + "/metrics"))
    request = urllib.request.Request(url)
    if at:
        user, _, password = userinfo.partition(":")
        request.add_header(*basic_auth(unquote(user), unquote(password)))

    def fetch() -> str:
        with urllib.request.urlopen(request, timeout=seconds) as response:
            return response.read().decode("utf-8", errors="replace")

    return parse_floors(call_within(seconds, fetch, "reading the Pushgateway"), grouping)
