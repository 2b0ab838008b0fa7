"""Outbound HTTP with one deadline for the whole request: connect, send and the whole answer.

A socket timeout bounds each read, not the request: an endpoint that drips one byte every 2 s
never trips a 5 s timeout and holds the caller for as long as it drips (docs/design.md §10).
urllib, urllib3 and requests all time out per socket operation, so the deadline is enforced
here, at two levels:

- The caller waits for the request on a thread of its own (`call_within`), at most `seconds`,
  whatever the request is doing, name resolution included (which no socket timeout bounds).
- At the deadline the request's socket is shut down, so the thread's read returns at once and
  the thread ends: a dripping endpoint does not keep a thread and a connection per call alive
  for as long as it drips. Every connection the request opens (a redirect's, a proxy's tunnel)
  is registered on opening, before TLS or a tunnel, through a duplicate of its descriptor:
  shutting that down ends the connection whatever wraps it, and the duplicate is ours to close.

Requests go through urllib's opener, so proxies (`HTTPS_PROXY`), redirects and status errors
(`HTTPError` for 4xx/5xx) behave as they did with `urlopen`.
"""

import base64
import http.client
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from nova_assets.core.bounded import WaitExceeded, call_within

ANSWER_MAX_BYTES = 65_536
"""What is read of an answer's body: enough for any webhook's or gateway's reply, never a flood."""
_SCHEMES = ("http", "https")
_SOCKET_GRACE_S = 0.5
"""A socket operation may outlast the deadline by this much: the deadline (its wait and its cut)
ends the request first, so what is logged is the deadline, and the socket's own timeout is only
the last resort for a connection still being opened when the cut came."""

Handler = Callable[..., Callable[[], None]]
"""prometheus_client's request handler: (url, method, timeout, headers, data) → send()."""

__all__ = ["ANSWER_MAX_BYTES", "Handler", "WaitExceeded", "basic_auth", "deadline_handler", "send"]


class _Watch:
    """The sockets of one request, to be shut down together when its deadline passes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._twins: list[socket.socket] = []
        self._cut = False

    def adopt(self, sock: socket.socket) -> socket.socket:
        """Register a just-connected socket (shut at once if the deadline has passed already)."""
        with self._lock:
            if self._cut:
                _shut(sock)
            else:
                # A duplicate descriptor of the same connection: TLS wrapping detaches `sock`
                # itself, and the duplicate cannot be closed and reused under our feet.
                self._twins.append(sock.dup())
        return sock

    def cut(self) -> None:
        """The deadline has passed: end every connection of the request now."""
        with self._lock:
            self._cut = True
            for twin in self._twins:
                _shut(twin)

    def close(self) -> None:
        """The request is over: release the duplicates (the connections close with the request)."""
        with self._lock:
            twins, self._twins = self._twins, []
        for twin in twins:
            twin.close()


def _shut(sock: socket.socket) -> None:
    """Shut both directions: a read blocked on the socket in another thread returns at once."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed or never connected: nothing left to end
        pass


class _Watched:
    """Mixed into an http.client connection: its sockets are registered with the request's watch."""

    def __init__(self, *args: Any, watch: _Watch, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # http.client opens every socket through this attribute (a proxy's included), so each is
        # registered as soon as it is connected, before a tunnel or a TLS handshake.
        opens = self._create_connection
        self._create_connection = lambda *a, **kw: watch.adopt(opens(*a, **kw))


class _WatchedConnection(_Watched, http.client.HTTPConnection):
    pass


class _WatchedTLSConnection(_Watched, http.client.HTTPSConnection):
    pass


_WATCHED: dict[type, type] = {
    http.client.HTTPConnection: _WatchedConnection,
    http.client.HTTPSConnection: _WatchedTLSConnection,
}


class _Opens:
    """Mixed into a urllib handler: its connections are the watched kind, on the request's watch."""

    def __init__(self, watch: _Watch) -> None:
        super().__init__()
        self.watch = watch

    def do_open(self, http_class: Any, req: Any, **http_conn_args: Any) -> Any:
        return super().do_open(  # type: ignore[misc]
            _WATCHED[http_class], req, watch=self.watch, **http_conn_args
        )


class _HTTPHandler(_Opens, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_Opens, urllib.request.HTTPSHandler):
    pass


def send(
    url: str,
    *,
    seconds: float,
    method: str = "POST",
    data: bytes | None = None,
    headers: Sequence[tuple[str, str | bytes]] = (),
) -> int:
    """Send one request and read its whole answer within `seconds`; the answer's status (2xx).

    Raises `WaitExceeded` when the deadline passes first (at once, without connecting, when
    `seconds` <= 0), `urllib.error.HTTPError` for a 4xx/5xx answer, `ValueError` for a URL that
    is not http(s), and whatever urllib raises for a refused connection or a garbled answer.
    An exception's text may quote the URL: callers log it through `failure_reason`.
    """
    if (urlsplit(url).scheme or "").lower() not in _SCHEMES:
        raise ValueError("only http:// and https:// URLs are sent")
    watch = _Watch()

    def exchange() -> int:
        request = urllib.request.Request(url, data=data, method=method)
        for name, value in headers:
            request.add_header(name, value.decode() if isinstance(value, bytes) else value)
        opener = urllib.request.build_opener(_HTTPHandler(watch), _HTTPSHandler(watch))
        try:
            # The request as a whole is bounded by the wait below and the cut that follows it.
            with opener.open(request, timeout=seconds + _SOCKET_GRACE_S) as response:
                response.read(ANSWER_MAX_BYTES)
                return int(response.status)
        except urllib.error.HTTPError as exc:
            exc.close()
            raise
        finally:
            watch.close()

    try:
        return call_within(seconds, exchange, "the whole request")
    except WaitExceeded:
        watch.cut()
        raise


def basic_auth(username: str, password: str) -> tuple[str, str]:
    """The `Authorization` header sending `username` and `password` as HTTP basic auth."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return ("Authorization", f"Basic {token}")


def deadline_handler(credentials: tuple[str, str] | None = None) -> Handler:
    """A prometheus_client push handler whose `timeout` is the deadline of the whole request.

    `credentials` (user, password) go as HTTP basic auth. Raises like `send` on failure, as
    prometheus_client's own handlers do.
    """

    def handler(
        url: str,
        method: str,
        timeout: float | None,
        headers: Sequence[tuple[str, str]],
        data: bytes,
    ) -> Callable[[], None]:
        sent = [*headers, *([basic_auth(*credentials)] if credentials else [])]

        def push() -> None:
            send(url, seconds=timeout or 0.0, method=method, data=data, headers=sent)

        return push

    return handler
