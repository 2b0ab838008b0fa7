"""Hostile configuration: whatever the environment holds, the load fails cleanly and hides secrets.

Hypothesis feeds arbitrary text (non-ASCII, control characters, huge numbers, URL-shaped junk) to
every variable, one at a time and several at once: `Settings.from_env` either loads or raises
`SettingsError` naming exactly the bad variables, never any other exception. Generated passwords,
full of the characters that end a URL's authority (`/ ? # @ :`), never appear in an error or in
`redact_url`'s output. A scheme counts in any case: each of them, however written, is judged as
its lower-case self; an embedded engine's URL with a host and a server's URL without one are
refused, whatever surrounds them. Last, the real code location, loaded as the UI loads it, shows
no secret on its resources page.
"""

import json
import re
import string

import dagster as dg
import pytest
from dagster_graphql.test.utils import (
    define_out_of_process_context,
    execute_dagster_graphql,
    infer_repository_selector,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from nova_assets import definitions
from nova_assets.core.settings import Settings, SettingsError
from nova_assets.core.urls import redact_url
from nova_assets.defs.resources import build_resources

VARIABLES = (
    "NOVA_HOME",
    "CLICKHOUSE_URL",
    "REDIS_URL",
    "KAFKA_BROKERS",
    "KAFKA_SASL_PASSWORD",
    "DLQ_TOPIC",
    "PUSHGATEWAY_URL",
    "TRENDING_INTERVAL_SEC",
    "SUGGESTION_INTERVAL_SEC",
    "MAX_CONCURRENT_JOBS",
    "REDIS_KEY_PREFIX",
    "SUGGESTION_TTL_SEC",
    "SUGGESTION_SHARD_USERS",
    "FEED_TTL_SEC",
    "ALERT_WEBHOOK_URL",
    "DAGSTER_UI_URL",
    "SENSOR_BUDGET_SEC",
    "RUN_RETENTION_DAYS",
)
TTL_RULE_PARTNERS = {
    "SUGGESTION_TTL_SEC": "SUGGESTION_INTERVAL_SEC",
    "SUGGESTION_INTERVAL_SEC": "SUGGESTION_TTL_SEC",
}
"""Variables judged together (a TTL covers two of its job's intervals), each with the other."""
URL_SCHEMES = {
    "CLICKHOUSE_URL": "https",
    "REDIS_URL": "redis",
    "PUSHGATEWAY_URL": "http",
    "ALERT_WEBHOOK_URL": "https",
    "DAGSTER_UI_URL": "http",
}
QUICK = settings(max_examples=200, deadline=None)

DIGITS_OF_OTHER_SCRIPTS = "".join(
    chr(c) for block in (0x0660, 0x06F0, 0x0966, 0xFF10) for c in range(block, block + 10)
)
"""Arabic-Indic, Persian, Devanagari and fullwidth digits: `\\d` and int() take them all."""

# Anything an environment variable may hold, weighted towards what breaks parsers: digits of
# every script, numbers past int()'s limits, URL-shaped text with junk after the scheme.
values = st.one_of(
    st.text(),
    st.text(alphabet=string.digits + DIGITS_OF_OTHER_SCRIPTS, max_size=30),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.integers(min_value=4300, max_value=6000).map(lambda n: "9" * n),
    st.builds(
        lambda scheme, body: f"{scheme}://{body}",
        st.sampled_from(["http", "https", "redis", "unix", "chdb", "ftp"]),
        st.text(),
    ),
)

# Passwords made of every printable ASCII character but space, so `/ ? # @ : %` all turn up,
# framed by markers so that a password is never text an error would hold anyway.
PASSWORD_CHARS = string.ascii_letters + string.digits + string.punctuation
passwords = st.text(alphabet=PASSWORD_CHARS, min_size=8).map(lambda p: f"Pw{p}Zq")
users = st.text(alphabet=PASSWORD_CHARS, max_size=12)
hosts = st.sampled_from(["cache.internal", "127.0.0.1", "[::1]"])
ports = st.integers(min_value=1, max_value=65535)
paths = st.sampled_from(["", "/", "/0", "/db"])


def named_variables(error: SettingsError) -> list[str]:
    """The variables an error names, one per line (values are repr'd, so none fakes a line)."""
    return re.findall(r"^  - ([A-Z_]+)=", str(error), re.MULTILINE)


@QUICK
@given(st.sampled_from(VARIABLES), values)
def test_any_text_in_one_variable_loads_or_names_that_variable(variable, value):
    try:
        Settings.from_env({variable: value})
    except SettingsError as exc:
        assert named_variables(exc) == [variable]


@QUICK
@given(st.dictionaries(st.sampled_from(VARIABLES), values, min_size=2))
def test_any_text_in_several_variables_names_only_bad_ones(environ):
    try:
        Settings.from_env(environ)
    except SettingsError as exc:
        named = named_variables(exc)
        assert named and set(named) <= set(environ)
        assert len(named) == len(set(named))
        # Each named variable is bad on its own too, or with the other half of its TTL rule:
        # no error is blamed on a neighbour.
        for variable in named:
            partner = TTL_RULE_PARTNERS.get(variable)
            alone = {name: environ[name] for name in (variable, partner) if name in environ}
            with pytest.raises(SettingsError):
                Settings.from_env(alone)


@QUICK
@given(hosts, ports, paths, users, passwords, st.sampled_from(sorted(URL_SCHEMES)))
def test_a_generated_password_never_shows_in_an_error(host, port, path, user, password, variable):
    for scheme in (URL_SCHEMES[variable], "gopher"):  # the second one is always refused
        url = f"{scheme}://{user}:{password}@{host}:{port}{path}"
        try:
            Settings.from_env({variable: url})
        except SettingsError as exc:
            assert named_variables(exc) == [variable]
            assert password not in str(exc)
        else:
            assert scheme != "gopher"


@QUICK
@given(hosts, ports, paths, users, passwords, st.booleans())
def test_redact_url_shows_nothing_of_the_user_info(host, port, path, user, password, secret_path):
    url = f"redis://{user}:{password}@{host}:{port}{path}"
    shown = redact_url(url, secret_path=secret_path)
    assert password not in shown
    # All but the user info, or scheme://host:port alone; or, when the user info starts with
    # `/`, a URL without an authority (`redis:///…@…`), of which nothing after `://` shows.
    kept = f"redis://***@{host}:{port}"
    assert shown in {kept + path, kept + ("/…" if path else ""), "redis://…"}


@QUICK
@given(st.text())
def test_redact_url_never_raises_and_never_shows_text_before_the_last_at(url):
    shown = redact_url(url)
    if "@" in url:
        hidden = url.split("://", 1)[-1].rpartition("@")[0]
        assert len(hidden) < 4 or hidden not in shown


def any_case(scheme: str) -> st.SearchStrategy[str]:
    """`scheme` with each letter in either case."""
    return st.tuples(*(st.sampled_from([c.lower(), c.upper()]) for c in scheme)).map("".join)


# The URLs of the case property: accepted and refused forms alike, for each scheme we take.
CASE_URLS = {
    "chdb": ("CLICKHOUSE_URL", ["chdb:///srv/nova", "chdb://h:1/", "chdb:rel", "chdb:///"]),
    "http": ("CLICKHOUSE_URL", ["http://u:Pw1@ch:8123/", "http:///db", "http://ch:0/"]),
    "https": ("PUSHGATEWAY_URL", ["https://gw:9091", "https://u:Pw1@:9091", "https:"]),
    "redis": ("REDIS_URL", ["redis://127.0.0.1:6379/0", "redis://"]),
    "rediss": ("REDIS_URL", ["rediss://:Pw1@cache:6380/0"]),
    "unix": ("REDIS_URL", ["unix:///run/redis.sock?db=0", "unix:"]),
}


def verdict(variable: str, url: str) -> tuple[str | None, bool | None]:
    """What the settings make of `url`: the error, or None and whether it is the embedded engine.

    The second part is None for every variable but CLICKHOUSE_URL.
    """
    try:
        loaded = Settings.from_env({variable: url})
    except SettingsError as exc:
        return str(exc), None
    return None, loaded.embedded_clickhouse if variable == "CLICKHOUSE_URL" else None


@QUICK
@given(st.data(), st.sampled_from(sorted(CASE_URLS)))
def test_a_scheme_in_any_case_is_judged_as_its_lower_case_self(data, scheme):
    variable, urls = CASE_URLS[scheme]
    url = data.draw(st.sampled_from(urls))
    written = data.draw(any_case(scheme)) + url[len(scheme) :]
    assert verdict(variable, written) == verdict(variable, url)


# What may stand between `scheme://` and the path: anything that does not start with `/` (which
# would begin the path itself), user info with a password or not.
authorities = st.one_of(
    st.builds(lambda h, p: f"{h}:{p}", hosts, ports),
    hosts,
    st.sampled_from(["memory", ":memory:", "localhost", ":8123", "?", "#x"]),
    st.text(alphabet=PASSWORD_CHARS.replace("/", ""), min_size=1),
)
user_infos = st.one_of(
    st.none(), st.tuples(users.filter(lambda user: not user.startswith("/")), passwords)
)


@QUICK
@given(any_case("chdb"), authorities, user_infos, st.sampled_from(["", "/", "/srv/nova", "/db?x"]))
def test_an_embedded_url_with_a_host_is_refused(scheme, authority, user_info, path):
    userinfo = f"{user_info[0]}:{user_info[1]}@" if user_info else ""
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"CLICKHOUSE_URL": f"{scheme}://{userinfo}{authority}{path}"})
    assert named_variables(caught.value) == ["CLICKHOUSE_URL"]
    if user_info:
        assert user_info[1] not in str(caught.value)


@QUICK
@given(
    st.sampled_from(["CLICKHOUSE_URL", "PUSHGATEWAY_URL", "ALERT_WEBHOOK_URL", "DAGSTER_UI_URL"]),
    st.one_of(any_case("http"), any_case("https")),
    st.sampled_from(
        ["{scheme}:{path}", "{scheme}://{userinfo}{path}", "{scheme}://{userinfo}:8123{path}"]
    ),
    user_infos,
    st.sampled_from(["", "/", "/db", "/path/to"]),
)
def test_a_server_url_without_a_host_is_refused(variable, scheme, form, user_info, path):
    userinfo = f"{user_info[0]}:{user_info[1]}@" if user_info else ""
    url = form.format(scheme=scheme, userinfo=userinfo, path=path)
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({variable: url})
    assert named_variables(caught.value) == [variable]
    if user_info:
        assert user_info[1] not in str(caught.value)


SECRETS = {
    "REDIS_URL": ("redis://:r3dis-Secret@127.0.0.1:6379/0", "r3dis-Secret"),
    "PUSHGATEWAY_URL": ("http://metrics:pushg4te-Secret@127.0.0.1:9091", "pushg4te-Secret"),
    "ALERT_WEBHOOK_URL": ("https://hooks.example/T0/B0/w3bhook-Secret", "w3bhook-Secret"),
    "CLICKHOUSE_URL": ("https://admin:cl1ckhouse-Secret@clickhouse.invalid:8443/", "cl1ckhouse"),
}
RESOURCES_QUERY = """
query Resources($selector: RepositorySelector!) {
  allTopLevelResourceDetailsOrError(repositorySelector: $selector) {
    __typename
    ... on ResourceDetailsList {
      results {
        name
        description
        configFields { name description defaultValueAsJson }
        configuredValues { key value type }
      }
    }
    ... on PythonError { message }
  }
}
"""


def test_the_resources_page_shows_no_secret(monkeypatch):
    for variable, (url, _) in SECRETS.items():
        monkeypatch.setenv(variable, url)
    # The same bindings, built in this process: every secret-bearing URL is an EnvVar.
    resources = build_resources(Settings.from_env())
    for name in ("clickhouse", "redis_cache", "job_metrics", "alerts"):
        assert any(isinstance(value, dg.EnvVar) for value in dict(resources[name]).values()), name
    # The UI's view: the code location loads in a code server, a subprocess that inherits this
    # environment and reads its settings at import, as in a deployment.
    with (
        dg.instance_for_test() as instance,
        define_out_of_process_context(definitions.__file__, "defs", instance) as context,
    ):
        result = execute_dagster_graphql(
            context, RESOURCES_QUERY, {"selector": infer_repository_selector(context)}
        )
    page = result.data["allTopLevelResourceDetailsOrError"]
    assert page["__typename"] == "ResourceDetailsList", page
    configured = {
        resource["name"]: {v["key"]: (v["type"], v["value"]) for v in resource["configuredValues"]}
        for resource in page["results"]
    }
    assert configured["redis_cache"]["url"] == ("ENV_VAR", "REDIS_URL")
    assert configured["job_metrics"]["gateway"] == ("ENV_VAR", "PUSHGATEWAY_URL")
    assert configured["alerts"]["url"] == ("ENV_VAR", "ALERT_WEBHOOK_URL")
    assert configured["clickhouse"]["url"] == ("ENV_VAR", "CLICKHOUSE_URL")
    text = json.dumps(result.data)
    for _, secret in SECRETS.values():
        assert secret not in text
