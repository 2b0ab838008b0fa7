"""Configuration: read the environment once, validate it, and say exactly what is wrong.

Every variable of docs/design.md §8 is parsed here into a frozen `Settings`. A bad value raises
`SettingsError`, whose message names each offending variable, the value as given (a URL through
`redact_url`: its user info as `***`, and only `scheme://host` when anything about it is odd) and
the accepted form, numbers with their range; the code location then fails to load with that message
instead of failing later inside a run. How a URL is cut, judged and shown lives in
`nova_assets.core.urls`.

Rules across variables are checked here too: each cache's TTL must outlive two of its job's
intervals (`ttl_problem`), so a key is rewritten before it expires even when one refresh comes late.
"""

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nova_assets.core.urls import CONTROL_CHARACTER, is_embedded, redact_url, url_problem

# Variables that configure the Kafka client itself rather than librdkafka settings.
# The librdkafka settings KAFKA_* variables may carry: security only. Other KAFKA_* variables
# are not ours (Kubernetes injects KAFKA_PORT, KAFKA_SERVICE_HOST, … for a service named kafka)
# and would make librdkafka refuse to build the producer.
_KAFKA_PASSTHROUGH_PREFIXES = ("KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_", "KAFKA_SSL_")
_TOPIC_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_HOST_PORT_PATTERN = re.compile(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})")


class SettingsError(ValueError):
    """One or more configuration variables are invalid; the message lists each of them."""


TTL_RANGE_SEC = (1, 2_592_000)
"""`SUGGESTION_TTL_SEC`, `FEED_TTL_SEC`: one second to 30 days."""
INTERVAL_RANGE_SEC = (60, 86_400)
"""`TRENDING_INTERVAL_SEC`, `SUGGESTION_INTERVAL_SEC`: one minute to a day, on a cron cadence."""
MAX_CONCURRENT_JOBS_RANGE = (1, 100)
"""`MAX_CONCURRENT_JOBS`: runs the instance lets run at once."""
RETENTION_RANGE_DAYS = (0, 3650)
"""`RUN_RETENTION_DAYS`: days finished runs are kept; 0 keeps every run."""
SENSOR_BUDGET_RANGE_SEC = (1, 50)
"""`SENSOR_BUDGET_SEC`: time one sensor evaluation may work, below Dagster's 60 s timeout."""
SHARD_USERS_RANGE = (100, 1_000_000)
"""`SUGGESTION_SHARD_USERS`: users one suggestions step ranks while it holds the ClickHouse slot."""
FEEDS_INTERVAL_SEC = 60
"""cache_warmer's interval: fixed, not a setting; `FEED_TTL_SEC` is judged against it."""
TTL_INTERVALS = 2
"""A cache's TTL covers at least this many of its job's intervals (`ttl_problem` says why)."""

_SHOWN_MAX_CHARS = 80
"""A value echoed in an error is cut to this length: enough to recognise it, never a flood."""


def interval_to_cron(seconds: int) -> str:
    """Map an interval in seconds onto the cron cadence that fires exactly that often.

    Accepted: whole minutes dividing an hour (60 → `* * * * *`, 300 → `*/5 * * * *`), whole hours
    dividing a day (3600 → `0 * * * *`, 7200 → `0 */2 * * *`), and 86400 (daily). Anything else
    has no exact cron cadence and raises `ValueError` rather than being silently rounded.
    """
    if seconds <= 0 or seconds % 60:
        raise ValueError("not a whole number of minutes")
    minutes = seconds // 60
    if minutes < 60 and 60 % minutes == 0:
        return "* * * * *" if minutes == 1 else f"*/{minutes} * * * *"
    if minutes % 60 == 0:
        hours = minutes // 60
        if hours == 24:
            return "0 0 * * *"
        if hours < 24 and 24 % hours == 0:
            return "0 * * * *" if hours == 1 else f"0 */{hours} * * *"
    raise ValueError("no cron cadence fires at exactly that interval")


def ttl_problem(ttl_sec: int, interval_sec: int) -> str | None:
    """Why a cache's TTL is too short for the interval of the job that rewrites it, or None.

    A run rewrites the keys once per interval, but the next write can come up to an interval late:
    a run that takes long or retries (waits up to 31 s), or a tick skipped because the last run is
    still going. A key whose TTL is shorter expires before it is rewritten, the cache is missing
    until the next run, and `cache_healer`, finding it missing, requests a run at every
    evaluation. So the TTL must cover two intervals (`TTL_INTERVALS`).
    """
    least = TTL_INTERVALS * interval_sec
    if ttl_sec >= least:
        return None
    return (
        f"a cache's TTL must be at least twice its job's interval ({least} s here), or its keys "
        "expire before the next run rewrites them and the cache is missing until then (a run "
        "can come up to an interval late: a long run, its retries, a tick skipped while the last "
        "run still goes)"
    )


@dataclass(frozen=True)
class Settings:
    """Validated configuration of one deployment (docs/design.md §8)."""

    nova_home: Path
    clickhouse_url: str
    redis_url: str
    kafka_brokers: tuple[str, ...]
    kafka_passthrough: tuple[str, ...]
    dlq_topic: str
    pushgateway_url: str
    trending_interval_sec: int
    suggestion_interval_sec: int
    max_concurrent_jobs: int
    redis_key_prefix: str
    suggestion_ttl_sec: int
    feed_ttl_sec: int
    alert_webhook_url: str | None
    dagster_ui_url: str
    cache_healing: bool = True
    """Whether `cache_healer` runs by default (CACHE_HEALING); the UI can turn it on either way."""
    suggestion_shard_users: int = 20_000
    """Users per suggestions shard (SUGGESTION_SHARD_USERS)."""
    run_retention_days: int = 7
    """Days finished runs are kept before the `run_retention` sensor deletes them, 0 for ever
    (RUN_RETENTION_DAYS)."""
    sensor_budget_sec: int = 20
    """Time one sensor evaluation may work before it writes its cursor and returns
    (SENSOR_BUDGET_SEC); the next tick goes on from there."""

    @property
    def embedded_clickhouse(self) -> bool:
        """True when ClickHouse is the in-process chdb engine rather than a server."""
        return is_embedded(self.clickhouse_url)

    @property
    def trending_cron(self) -> str:
        return interval_to_cron(self.trending_interval_sec)

    @property
    def suggestion_cron(self) -> str:
        return interval_to_cron(self.suggestion_interval_sec)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Parse and validate `environ` (default: the process environment), all at once."""
        return _Parser(os.environ if environ is None else environ).parse()


@functools.cache
def load_settings() -> Settings:
    """The process environment's settings, read and validated once per process."""
    return Settings.from_env()


class _Parser:
    """Collects every problem before raising, so one failed load reports them all."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.env = environ
        self.errors: list[str] = []
        self.failed: set[str] = set()

    def _get(self, name: str, default: str) -> str:
        value = self.env.get(name)
        return default if value is None or value.strip() == "" else value.strip()

    def _fail(self, name: str, shown: str, accepted: str) -> None:
        if len(shown) > _SHOWN_MAX_CHARS:
            shown = f"{shown[:_SHOWN_MAX_CHARS]}… ({len(shown)} characters)"
        self.failed.add(name)
        self.errors.append(f"{name}={shown!r} is invalid: {accepted}")

    def _ttl_covers(
        self,
        ttl_name: str,
        ttl_sec: int,
        interval_sec: int,
        job: str,
        interval_name: str | None = None,
    ) -> None:
        """Fail when the TTL is too short for its job's interval (`ttl_problem`).

        The line names the TTL when it was set, else the interval (`interval_name`, set by the
        operator while the TTL kept its default): the variable whose change broke the rule. A
        rule whose values already failed on their own is not judged again.
        """
        if {ttl_name, interval_name} & self.failed:
            return
        problem = ttl_problem(ttl_sec, interval_sec)
        if problem is None:
            return
        least = TTL_INTERVALS * interval_sec
        interval = f"{interval_name}={interval_sec}" if interval_name else f"{interval_sec} s"
        if interval_name is None or self._get(ttl_name, ""):
            self._fail(
                ttl_name,
                str(ttl_sec),
                f"{problem}; {job} runs every {interval}, so set {ttl_name} to {least} or more",
            )
        else:
            self._fail(
                interval_name,
                str(interval_sec),
                f"{ttl_name} keeps its default, {ttl_sec}, and {problem}; set {ttl_name} to "
                f"{least} or more, or choose a shorter interval",
            )

    def _int(self, name: str, default: int, bounds: tuple[int, int]) -> int:
        """A whole number of ASCII digits within `bounds`, both ends included."""
        low, high = bounds
        raw = self._get(name, str(default))
        # ASCII digits only (`\d` and int() take Arabic-Indic and other scripts' digits too),
        # and the length checked before int(): thousands of digits are slow or refused outright.
        digits = raw.lstrip("0") or "0"
        if (
            not re.fullmatch(r"[0-9]+", raw)
            or len(digits) > len(str(high))
            or not low <= int(digits) <= high
        ):
            self._fail(name, raw, f"expected a whole number from {low} to {high}, e.g. {default}")
            return default
        return int(digits)

    def _interval(self, name: str, default: int) -> int:
        seconds = self._int(name, default, INTERVAL_RANGE_SEC)
        try:
            interval_to_cron(seconds)
        except ValueError as exc:
            self._fail(
                name,
                str(seconds),
                f"{exc}; use seconds that map onto a cron cadence: 60, 120, 300, 600, 900, "
                "1200, 1800 (minutes dividing an hour), 3600, 7200, 10800, 21600, 43200 "
                "(hours dividing a day) or 86400",
            )
            return default
        return seconds

    def _url(
        self,
        name: str,
        default: str,
        schemes: tuple[str, ...],
        example: str,
        *,
        secret_path: bool = False,
    ) -> str:
        """A URL with one of `schemes`; `secret_path` for URLs whose path is a token (webhooks)."""
        value = self.env.get(name)
        raw = self._get(name, default)
        shown = redact_url(raw, secret_path=secret_path)
        accepted = f"expected a URL with scheme {' or '.join(schemes)}, e.g. {example}"
        problem = url_problem(raw, schemes, accepted)
        if problem is None and value is not None and value.strip() and value != raw:
            # The resource reads the variable itself (dg.EnvVar), spaces and all.
            problem = f"the value has spaces or line breaks around it; remove them; {accepted}"
        if problem is not None:
            self._fail(name, shown, problem)
            return default
        return raw

    def _home(self) -> Path:
        raw = self._get("NOVA_HOME", ".nova")
        accepted = "expected a directory path, e.g. /srv/nova"
        if CONTROL_CHARACTER.search(raw) or "?" in raw or "#" in raw:
            # The embedded engine's default URL is chdb://<NOVA_HOME>/clickhouse, where `?` and
            # `#` would end the path.
            self._fail("NOVA_HOME", raw, f"{accepted}, without '?', '#' or control characters")
            return Path(".nova").resolve()
        try:
            return Path(raw).resolve()
        except (ValueError, OSError):  # a path the system cannot resolve
            self._fail("NOVA_HOME", raw, accepted)
            return Path(".nova").resolve()

    def parse(self) -> Settings:
        home = self._home()
        clickhouse_url = self._url(
            "CLICKHOUSE_URL",
            f"chdb://{home / 'clickhouse'}",
            ("chdb", "http", "https"),
            "chdb:///srv/nova/clickhouse (a path, no host) or https://user:password@host:8443/",
        )
        redis_url = self._url(
            "REDIS_URL",
            "redis://127.0.0.1:6379/0",
            ("redis", "rediss", "unix"),
            "redis://127.0.0.1:6379/0",
        )
        pushgateway_url = self._url(
            "PUSHGATEWAY_URL", "http://127.0.0.1:9091", ("http", "https"), "http://127.0.0.1:9091"
        )

        # Unlike other variables, a KAFKA_BROKERS set but empty is an error, not the default.
        brokers_raw = self.env.get("KAFKA_BROKERS", "127.0.0.1:9092")
        brokers = tuple(b.strip() for b in brokers_raw.split(",") if b.strip())
        if not brokers or not all(_valid_broker(b) for b in brokers):
            self._fail(
                "KAFKA_BROKERS",
                brokers_raw,
                "expected a comma-separated list of host:port, e.g. 127.0.0.1:9092",
            )

        topic = self._get("DLQ_TOPIC", "jobs-dlq")
        if not _TOPIC_PATTERN.fullmatch(topic):
            self._fail("DLQ_TOPIC", topic, "expected 1-249 characters of letters, digits, . _ -")

        healing = self._get("CACHE_HEALING", "on").lower()
        if healing not in ("on", "off"):
            self._fail("CACHE_HEALING", healing, "expected on or off")

        prefix = self._get("REDIS_KEY_PREFIX", "nova:cache:")
        if any(c.isspace() for c in prefix):
            self._fail("REDIS_KEY_PREFIX", prefix, "expected a prefix without spaces")

        trending_interval = self._interval("TRENDING_INTERVAL_SEC", 60)
        suggestion_interval = self._interval("SUGGESTION_INTERVAL_SEC", 600)
        suggestion_ttl = self._int("SUGGESTION_TTL_SEC", 86400, TTL_RANGE_SEC)
        feed_ttl = self._int("FEED_TTL_SEC", 120, TTL_RANGE_SEC)
        # The trending TTLs are ten times their intervals by construction (core/jobs.py), not set.
        self._ttl_covers(
            "SUGGESTION_TTL_SEC",
            suggestion_ttl,
            suggestion_interval,
            "suggested_users",
            "SUGGESTION_INTERVAL_SEC",
        )
        self._ttl_covers("FEED_TTL_SEC", feed_ttl, FEEDS_INTERVAL_SEC, "cache_warmer")

        settings = Settings(
            nova_home=home,
            clickhouse_url=clickhouse_url,
            redis_url=redis_url,
            kafka_brokers=brokers,
            kafka_passthrough=tuple(
                sorted(name for name in self.env if name.startswith(_KAFKA_PASSTHROUGH_PREFIXES))
            ),
            dlq_topic=topic,
            pushgateway_url=pushgateway_url,
            trending_interval_sec=trending_interval,
            suggestion_interval_sec=suggestion_interval,
            max_concurrent_jobs=self._int("MAX_CONCURRENT_JOBS", 5, MAX_CONCURRENT_JOBS_RANGE),
            redis_key_prefix=prefix,
            cache_healing=healing != "off",
            suggestion_ttl_sec=suggestion_ttl,
            suggestion_shard_users=self._int("SUGGESTION_SHARD_USERS", 20_000, SHARD_USERS_RANGE),
            feed_ttl_sec=feed_ttl,
            sensor_budget_sec=self._int("SENSOR_BUDGET_SEC", 20, SENSOR_BUDGET_RANGE_SEC),
            run_retention_days=self._int("RUN_RETENTION_DAYS", 7, RETENTION_RANGE_DAYS),
            alert_webhook_url=(
                self._url(
                    "ALERT_WEBHOOK_URL",
                    "",
                    ("http", "https"),
                    "https://hooks.slack.com/services/…",
                    secret_path=True,
                )
                if self._get("ALERT_WEBHOOK_URL", "")
                else None
            ),
            dagster_ui_url=self._url(
                "DAGSTER_UI_URL",
                "http://127.0.0.1:3000",
                ("http", "https"),
                "http://127.0.0.1:3000",
            ),
        )
        if self.errors:
            raise SettingsError(
                "nova_assets configuration is invalid:\n  - " + "\n  - ".join(self.errors)
            )
        return settings


def _valid_broker(broker: str) -> bool:
    match = _HOST_PORT_PATTERN.fullmatch(broker)
    return bool(match) and 0 < int(match.group(2)) < 65536


def kafka_setting_name(variable: str) -> str:
    """Map a pass-through variable to its librdkafka name: KAFKA_SASL_USERNAME is sasl.username."""
    return variable.removeprefix("KAFKA_").lower().replace("_", ".")
