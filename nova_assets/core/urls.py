"""URLs of the configuration: cut them without trusting them, judge them, show them safely.

A URL may carry a password, so it is cut at fixed characters (`_anatomy`) before anything else
reads it: `url_problem` says what is wrong with one in words that never quote its user info,
and `redact_url` makes one safe to print or log. `is_embedded` answers, for the whole package,
whether a CLICKHOUSE_URL names the in-process engine rather than a server, and `embedded_path`
which directory that engine opens: both read the URL the way `url_problem` judged it, so the
directory used is exactly the one validated.

Schemes are compared without regard to case (`CHDB:///srv/nova` is the embedded engine,
`HTTPS://…` a server), as RFC 3986 §3.1 has it.
"""

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

# `scheme:` then, when present, `//` and an authority. Nothing else of a URL is parsed before it
# is shown, so what an error shows never depends on how a library splits odd input.
_URL_PATTERN = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(//)?(.*)", re.DOTALL)
_HOST_PATTERN = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]")
_PORT_PATTERN = re.compile(r"[0-9]{1,5}")
_PRINTABLE_ASCII = re.compile(r"[!-~]*")
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")
"""A control character, which no URL or path of the configuration may hold."""
_AUTHORITY_ENDS = "/?#"
_LOCAL_SCHEMES = ("chdb", "unix")
"""Schemes naming a path on this machine (`chdb:///srv/nova/clickhouse`), not a server."""
EMBEDDED_SCHEME = "chdb"
EMBEDDED_FORM = "chdb:///absolute/path (three slashes: no host)"
"""The one accepted form of an embedded engine's URL."""


def scheme_of(url: str) -> str | None:
    """The URL's scheme in lower case (`CHDB:///x` → `chdb`); None for text that is no URL."""
    match = _URL_PATTERN.fullmatch(url)
    return match.group(1).lower() if match else None


def is_embedded(url: str) -> bool:
    """Whether the ClickHouse `url` is the in-process chdb engine rather than a server."""
    return scheme_of(url) == EMBEDDED_SCHEME


def embedded_path(url: str) -> str:
    """The directory the embedded engine opens for `url`: its path exactly as written.

    Only `chdb:///absolute/path` is taken, and nothing of it is decoded or cut (a `%20` stays
    `%20`, as in the URL built from NOVA_HOME), so the directory is the one `url_problem` judged.
    Raises `ValueError`, in words that never quote the URL, for anything else: a server URL, a
    host (`chdb://127.0.0.1:8765/`, which a URL reader takes for a relative folder named after
    it), a relative path, a query or fragment, no path at all.
    """
    anatomy = _anatomy(url)
    if anatomy is None or anatomy.scheme != EMBEDDED_SCHEME:
        raise ValueError(f"not an embedded engine's URL; expected {EMBEDDED_FORM}")
    problem = _embedded_problem(anatomy, url)
    if problem is not None:
        raise ValueError(f"{problem}; expected {EMBEDDED_FORM}")
    return anatomy.rest


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
        odd = "@" in anatomy.rest or secret_path or bool(CONTROL_CHARACTER.search(anatomy.rest))
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


def url_problem(raw: str, schemes: tuple[str, ...], accepted: str) -> str | None:
    """What is wrong with `raw` as a URL of `schemes`, in words that never quote a secret.

    `accepted` (the accepted form, with an example) ends every answer; `None` means no problem.
    The checks run on `_anatomy`'s fixed cuts, then `urlsplit` (what the clients use) must agree,
    so a URL accepted here is split the same way by every library that reads it.
    """
    anatomy = _anatomy(raw)
    if anatomy is None or anatomy.scheme not in schemes:
        return accepted
    if anatomy.scheme == EMBEDDED_SCHEME:
        problem = _embedded_problem(anatomy, raw)
        return None if problem is None else f"{problem}; {accepted}"
    local = anatomy.scheme in _LOCAL_SCHEMES
    if not anatomy.has_authority:
        if not local:
            return f"the URL has no host; {accepted}"
        if CONTROL_CHARACTER.search(raw):
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


def _embedded_problem(anatomy: _UrlAnatomy, raw: str) -> str | None:
    """What keeps an embedded engine's URL from naming one absolute directory, or None.

    A host is refused by name: `chdb://127.0.0.1:8765/` is no server address for chdb, and URL
    readers take the host for the directory (a relative one, in the working directory).
    """
    if anatomy.has_authority:
        return (
            "the embedded engine (chdb) opens a directory on this machine and takes no host "
            "(for a ClickHouse server use http:// or https://)"
        )
    if anatomy.separator != "://":
        return "the embedded engine's directory must be an absolute path after chdb://"
    if CONTROL_CHARACTER.search(raw):
        return "the path holds a control character"
    if "?" in anatomy.rest or "#" in anatomy.rest:
        return "the path holds '?' or '#', where a URL reader would end it"
    if not anatomy.rest.strip("/"):
        return "the URL has no path"
    return None
