"""Configuration: read the environment once, validate it, and say exactly what is wrong.

Every variable of docs/design.md §8 is parsed here into a frozen `Settings`. A bad value raises
`SettingsError`, whose message names each offending variable, the value as given (a URL through
`redact_url`: its user info as `***`, and only `scheme://host` when anything about it is odd) and
the accepted form, numbers with their range; the code location then fails to load with that message
instead of failing later inside a run.
"""

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

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
SHARD_USERS_RANGE = (100, 1_000_000)
"""`SUGGESTION_SHARD_USERS`: users one suggestions step ranks while it holds the ClickHouse slot."""

_SHOWN_MAX_CHARS = 80
"""A value echoed in an error is cut to this length: enough to recognise it, never a flood."""

# `scheme:` then, when present, `//` and an authority. Nothing else of a URL is parsed before it
# is shown, so what an error shows never depends on how a library splits odd input.
_URL_PATTERN = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(//)?(.*)", re.DOTALL)
_HOST_PATTERN = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]")
_PORT_PATTERN = re.compile(r"[0-9]{1,5}")
_PRINTABLE_ASCII = re.compile(r"[!-~]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_AUTHORITY_ENDS = "/?#"
_LOCAL_SCHEMES = ("chdb", "unix")
"""Schemes naming a path on this machine (`chdb:///srv/nova/clickhouse`), not a server."""


@dataclass(frozen=True)
class _UrlAnatomy:
    """A URL cut at fixed characters, the way the secret in it can be kept out of sight.

    The user info is everything between `://` and the LAST `@` of the whole text: whatever a
    password contains (`/`, `#`, `?`, `@`), it lies before that `@`, so it is never taken for the
    host or the path and never shown. A URL without an authority (`chdb:///path`, `unix:path`)
    is all `rest`.
    """

    scheme: str
    separator: str
    """`://` before an authority or an absolute path, else `:`."""
    has_authority: bool
    userinfo: str | None
    host: str
    port: str | None
    rest: str
    """The path, query and fragment, as written."""

    @property
    def clean_host(self) -> bool:
        return self.host == "" or bool(_HOST_PATTERN.fullmatch(self.host))

    @property
    def clean_port(self) -> bool:
        return self.port is None or self.port == "" or _valid_port(self.port)

    @property
    def unescaped_in_userinfo(self) -> list[str]:
        """Characters that end the authority, found before its last `@`: they need %-escapes."""
        return [c for c in _AUTHORITY_ENDS if c in (self.userinfo or "")]


def _anatomy(url: str) -> _UrlAnatomy | None:
    match = _URL_PATTERN.fullmatch(url)
    if match is None:
        return None
    scheme, slashes, text = match.groups()
    scheme = scheme.lower()
    if not slashes or text.startswith("/"):  # `scheme:path` or `scheme:///path`: no authority
        return _UrlAnatomy(scheme, ":" + (slashes or ""), False, None, "", None, text)
    userinfo, at, after = text.rpartition("@")
    ends = [i for i in (after.find(c) for c in _AUTHORITY_ENDS) if i >= 0]
    cut = min(ends, default=len(after))
    hostport, rest = after[:cut], after[cut:]
    host, port = hostport, None
    if hostport.startswith("["):  # [IPv6]:port; text after `]` that is no `:port` stays odd
        bracketed, close, after_close = hostport.partition("]")
        if close and (after_close == "" or after_close.startswith(":")):
            host, port = bracketed + close, after_close[1:] if after_close else None
    elif ":" in hostport:
        host, _, port = hostport.partition(":")
    return _UrlAnatomy(scheme, "://", True, userinfo if at else None, host, port, rest)


def _valid_port(text: str) -> bool:
    return bool(_PORT_PATTERN.fullmatch(text)) and 0 < int(text) < 65536


def redact_url(url: str, *, secret_path: bool = False) -> str:
    """`url` made safe to print or log: user info never shows, odd parts are left out.

    A clean URL keeps everything but its user info (`https://***@host:8443/db`) and the values of
    its query (`?…`). Anything odd (a `/`, `?` or `#` before the last `@`, a host or port that is
    no host or port, spaces, control or non-ASCII characters) shows only `scheme://host`, with the
    port if it is a port. `secret_path` (webhooks, whose path is a token) shows `scheme://host`
    only, always. A URL without a host (`chdb:///srv/nova`) shows its path unless the path holds
    an `@` or a control character; text that is no `scheme:` URL shows only if it holds no `@`.
    """
    anatomy = _anatomy(url)
    if anatomy is None:
        return "(not a URL; not shown)" if "@" in url or secret_path else url
    prefix = anatomy.scheme + anatomy.separator
    if not anatomy.has_authority:
        odd = "@" in anatomy.rest or secret_path or bool(_CONTROL.search(anatomy.rest))
        shown = anatomy.rest.partition("?")[0].partition("#")[0]
        return f"{prefix}…" if odd else prefix + shown + ("?…" if shown != anatomy.rest else "")
    odd = (
        bool(anatomy.unescaped_in_userinfo)
        or not anatomy.clean_host
        or not anatomy.clean_port
        or not _PRINTABLE_ASCII.fullmatch(url)
    )
    shown = prefix + ("***@" if anatomy.userinfo is not None else "")
    shown += anatomy.host if anatomy.clean_host else "(host not shown)"
    if anatomy.port and anatomy.clean_port:
        shown += f":{anatomy.port}"
    if odd or secret_path:
        return shown + ("/…" if anatomy.rest else "")
    path = anatomy.rest.partition("?")[0].partition("#")[0]
    return shown + path + ("?…" if path != anatomy.rest else "")


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

    @property
    def embedded_clickhouse(self) -> bool:
        """True when ClickHouse is the in-process chdb engine rather than a server."""
        return self.clickhouse_url.startswith("chdb:")

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

    def _get(self, name: str, default: str) -> str:
        value = self.env.get(name)
        return default if value is None or value.strip() == "" else value.strip()

    def _fail(self, name: str, shown: str, accepted: str) -> None:
        if len(shown) > _SHOWN_MAX_CHARS:
            shown = f"{shown[:_SHOWN_MAX_CHARS]}… ({len(shown)} characters)"
        self.errors.append(f"{name}={shown!r} is invalid: {accepted}")

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
        """A URL with one of `schemes`; `secret_path` for URLs whose path is a token (webhooks).

        The checks run on `_anatomy`'s fixed cuts, then `urlsplit` (what the clients use) must
        agree, so a URL accepted here is split the same way by every library that reads it.
        """
        value = self.env.get(name)
        raw = self._get(name, default)
        shown = redact_url(raw, secret_path=secret_path)
        accepted = f"expected a URL with scheme {' or '.join(schemes)}, e.g. {example}"
        problem = _url_problem(raw, schemes, accepted)
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
        if _CONTROL.search(raw) or "?" in raw or "#" in raw:
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
            "chdb:///srv/nova/clickhouse or https://user:password@host:8443/",
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
            trending_interval_sec=self._interval("TRENDING_INTERVAL_SEC", 60),
            suggestion_interval_sec=self._interval("SUGGESTION_INTERVAL_SEC", 600),
            max_concurrent_jobs=self._int("MAX_CONCURRENT_JOBS", 5, MAX_CONCURRENT_JOBS_RANGE),
            redis_key_prefix=prefix,
            cache_healing=healing != "off",
            suggestion_ttl_sec=self._int("SUGGESTION_TTL_SEC", 86400, TTL_RANGE_SEC),
            suggestion_shard_users=self._int("SUGGESTION_SHARD_USERS", 20_000, SHARD_USERS_RANGE),
            feed_ttl_sec=self._int("FEED_TTL_SEC", 120, TTL_RANGE_SEC),
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


def _url_problem(raw: str, schemes: tuple[str, ...], accepted: str) -> str | None:
    """What is wrong with `raw` as a URL of `schemes`, in words that never quote a secret."""
    anatomy = _anatomy(raw)
    if anatomy is None or anatomy.scheme not in schemes:
        return accepted
    local = anatomy.scheme in _LOCAL_SCHEMES
    if not anatomy.has_authority:
        if not local:
            return f"the URL has no host; {accepted}"
        if _CONTROL.search(raw):
            return f"the path holds a control character; {accepted}"
        if not anatomy.rest.partition("?")[0].strip("/"):
            return f"the URL has no path; {accepted}"
        return None  # a path on this machine: any character but a control one
    if not _PRINTABLE_ASCII.fullmatch(raw):
        return (
            "the URL holds a space, a control or a non-ASCII character; percent-encode it "
            f"(a space is %20); {accepted}"
        )
    if unescaped := anatomy.unescaped_in_userinfo:
        listed = " and ".join(f"'{c}'" for c in unescaped)
        codes = " and ".join(f"%{ord(c):02X}" for c in unescaped)
        return (
            f"the user name or password (before the last '@') contains {listed}; "
            f"percent-encode {'them' if len(unescaped) > 1 else 'it'} as {codes} (an '@' in the "
            f"path or query is %40); {accepted}"
        )
    if not anatomy.clean_host:
        return f"the host is no host name, IPv4 or [IPv6] address; {accepted}"
    if not anatomy.clean_port:
        return f"the port must be a number from 1 to 65535; {accepted}"
    if not anatomy.host:
        return f"the URL has no {'path' if local else 'host'}; {accepted}"
    try:  # the clients split with urlsplit: it must see the same host and port
        parts = urlsplit(raw)
        agrees = (parts.hostname or "") == anatomy.host.strip("[]").lower() and (
            parts.port == (int(anatomy.port) if anatomy.port else None)
        )
    except ValueError:
        agrees = False
    if not agrees:
        return f"the URL cannot be split unambiguously; percent-encode its user info; {accepted}"
    return None


def kafka_setting_name(variable: str) -> str:
    """Map a pass-through variable to its librdkafka name: KAFKA_SASL_USERNAME is sasl.username."""
    return variable.removeprefix("KAFKA_").lower().replace("_", ".")
