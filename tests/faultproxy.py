"""A fault-injecting HTTP reverse proxy for tests: a real SCIM server behind a seeded schedule of failures.

    proxy = FaultProxy(server.base_url, rate=0.2, seed=7).start()
    ...point the engine at proxy.base_url...
    proxy.stats.faults   # Counter({'429': 12, 'reset': 9, ...})
    proxy.stop()

or, in a test, the ``fault_proxy`` fixture (a factory; every proxy it makes is
stopped after the test)::

    from tests.faultproxy import fault_proxy  # noqa: F401 - a fixture, found by name

    def test_x(fault_proxy, scim_server):
        proxy = fault_proxy(scim_server.base_url, rate=0.2, seed=1)

It listens on a free port of 127.0.0.1 and forwards each request to the
upstream's origin, path and query unchanged. Standard library only
(``http.server`` in a background thread, ``http.client`` to the upstream), so
it serves sync and async tests alike, whatever their event loop.

Faults, by name (the keys of ``stats.faults``):

========================  =====================================================================
``429``                   429 with ``Retry-After: 0``, ``1`` or an HTTP-date one second ahead
``503``                   503 with a SCIM Error body, no ``Retry-After``
``502``                   502 with an HTML body, as a load balancer answers
``reset``                 the connection is reset (RST) without an answer
``timeout``               no answer for ``delay`` seconds (set it beyond the client's
                          timeout), then the connection is reset
``invalid_json``          GET only: 200 with the upstream's body cut in half
``412``                   PUT/PATCH/DELETE with ``If-Match`` only: 412, as if someone else
                          had changed the resource (with ``bump_on_412`` the resource's
                          version really moves upstream, its data unchanged)
``lost_response``         not in the default set: POST/PUT/PATCH/DELETE are forwarded and
                          applied upstream, then the connection is reset (a create whose
                          answer was lost)
========================  =====================================================================

Every fault except ``lost_response`` (and the safe GET of ``invalid_json``) is
injected *before* forwarding: the upstream never applies a request whose
answer was faked.

The schedule: for each eligible request, in arrival order, one draw of
``random.Random(seed)`` decides whether it fails (probability ``rate``) and a
second which fault, among the enabled kinds that apply to that request
(``kinds`` maps names to weights). With one client the schedule is
reproducible; with concurrent clients, which request gets which fault
depends on the order they arrive in.

Faithfulness: request headers (``Authorization`` included) and bodies are
forwarded as received, except hop-by-hop headers (RFC 9110 §7.6.1), and the
client's ``Host`` is kept, so a server that builds URLs from ``Host`` (as
scim2-server does) writes the *proxy's* address into ``Location`` and
``meta.location``. ``Location`` and ``Content-Location`` headers that still
name the upstream's origin are rewritten to the proxy's; bodies are never
rewritten. Status, reason, ``ETag`` and every other response header are
passed through; the body is re-framed with ``Content-Length``. The proxy
speaks HTTP/1.1 with keep-alive to its clients, whatever the upstream speaks.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest

DEFAULT_KINDS = ("429", "503", "502", "reset", "timeout", "invalid_json", "412")
ALL_KINDS = (*DEFAULT_KINDS, "lost_response")

_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_CONDITIONAL_WRITES = frozenset({"PUT", "PATCH", "DELETE"})
# RFC 9110 §7.6.1: meaningful for one connection only, never forwarded.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
     "te", "trailer", "transfer-encoding", "upgrade"}
)  # fmt: skip
_SCIM_ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"


def _applies(kind: str, method: str, headers: Mapping[str, str]) -> bool:
    """Whether a fault kind makes sense for a request."""
    if kind == "invalid_json":
        return method == "GET"
    if kind == "412":
        return method in _CONDITIONAL_WRITES and "if-match" in headers
    if kind == "lost_response":
        return method in _WRITES
    return True


@dataclass(frozen=True, slots=True)
class Event:
    """One request the proxy received and what it did with it."""

    seq: int
    method: str
    path: str
    fault: str | None  # None: forwarded untouched
    status: int | None  # the status the client got; None for a reset
    forwarded: bool
    retry_after: str | None = None


@dataclass(slots=True)
class ProxyStats:
    """Counters since the proxy started (or since :meth:`FaultProxy.reset_stats`)."""

    requests: int = 0  # received from clients
    forwarded: int = 0  # reached the upstream (includes invalid_json GETs and lost responses)
    faults: Counter[str] = field(default_factory=Counter)  # injected, by kind
    race_writes: int = 0  # PUTs the proxy itself sent upstream to bump a version (bump_on_412)
    upstream_errors: int = 0  # the upstream could not be reached: answered 502, not counted as a fault

    @property
    def injected(self) -> int:
        """Every fault injected, whatever its kind."""
        return sum(self.faults.values())

    def copy(self) -> ProxyStats:
        return ProxyStats(self.requests, self.forwarded, Counter(self.faults), self.race_writes, self.upstream_errors)


class FaultProxy:
    """A reverse proxy on 127.0.0.1 in front of ``upstream`` that fails some requests on purpose.

    ``upstream``: the upstream URL; only its scheme (http), host and port are
    used, and :attr:`base_url` keeps its path (``http://127.0.0.1:P/v2``).
    ``rate``: probability that an eligible request gets a fault (0 = transparent).
    ``seed``: seeds ``random.Random``, the only source of randomness.
    ``kinds``: fault names, or names mapped to weights; default :data:`DEFAULT_KINDS`, equal weights.
    ``delay``: seconds a ``timeout`` fault holds the request before resetting it.
    ``bump_on_412``: before a ``412`` answer, change the resource upstream and change it back
    (GET, then two PUTs of ``nickName``, with the client's own credentials; counted in
    ``stats.race_writes``), so its version really moves and a client retrying with its old
    ``If-Match`` gets a real 412.
    ``applies_to``: ``(method, path_with_query) -> bool``; requests it refuses are always forwarded untouched
    and take no draw from the schedule (e.g. keep ``/ServiceProviderConfig`` clean).
    ``answer``: ``(method, path_with_query, body) -> status | None``: requests it gives a status
    for are answered with that status and a SCIM Error body, never forwarded, whatever the
    schedule (a record whose writes always fail); they take no draw and count in
    ``stats.faults`` under ``"answer"``.
    ``max_faults``: stop injecting after this many faults.
    ``upstream_timeout``: seconds to wait for the upstream.
    """

    def __init__(
        self,
        upstream: str,
        *,
        rate: float = 0.0,
        seed: int = 0,
        kinds: Iterable[str] | Mapping[str, float] = DEFAULT_KINDS,
        delay: float = 1.0,
        bump_on_412: bool = True,
        applies_to: Callable[[str, str], bool] | None = None,
        answer: Callable[[str, str, bytes | None], int | None] | None = None,
        max_faults: int | None = None,
        upstream_timeout: float = 30.0,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http:// URL, not {upstream!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.upstream_origin = f"http://{parts.netloc}"
        self.path_prefix = parts.path.rstrip("/")
        self.delay = delay
        self.bump_on_412 = bump_on_412
        self.applies_to = applies_to
        self.answer = answer
        self.max_faults = max_faults
        self.upstream_timeout = upstream_timeout
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._rate = 0.0
        self._weights: dict[str, float] = {}
        self.configure(rate=rate, kinds=kinds)
        self._stats = ProxyStats()
        self._events: list[Event] = []
        self._seq = 0
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------

    def start(self) -> FaultProxy:
        """Listen on a free port of 127.0.0.1 and serve in a daemon thread."""
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="faultproxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop every open client connection (delayed requests end at once)."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        server.drop_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return int(self._server.server_address[1])

    @property
    def origin(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The upstream URL with the proxy's origin: what a client is configured with."""
        return self.origin + self.path_prefix

    # -- schedule and counters -----------------------------------------------

    def configure(self, *, rate: float | None = None, kinds: Iterable[str] | Mapping[str, float] | None = None) -> None:
        """Change the fault rate or kinds while running (the random sequence goes on)."""
        with self._lock:
            if rate is not None:
                if not 0.0 <= rate <= 1.0:
                    raise ValueError(f"rate must be within [0, 1], not {rate}")
                self._rate = rate
            if kinds is not None:
                weights = dict(kinds) if isinstance(kinds, Mapping) else dict.fromkeys(kinds, 1.0)
                unknown = set(weights) - set(ALL_KINDS)
                if unknown:
                    raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(ALL_KINDS)}")
                self._weights = {k: float(w) for k, w in weights.items() if w > 0}

    @property
    def stats(self) -> ProxyStats:
        """A snapshot of the counters."""
        with self._lock:
            return self._stats.copy()

    @property
    def events(self) -> list[Event]:
        """Every request received, in arrival order (a copy)."""
        with self._lock:
            return list(self._events)

    def reset_stats(self) -> None:
        """Zero the counters and forget the events (the schedule goes on)."""
        with self._lock:
            self._stats = ProxyStats()
            self._events = []

    def _draw(self, method: str, path: str, headers: Mapping[str, str]) -> tuple[int, str | None]:
        with self._lock:
            self._seq += 1
            self._stats.requests += 1
            seq = self._seq
            if self.applies_to is not None and not self.applies_to(method, path):
                return seq, None
            if self._rate <= 0 or not self._weights:
                return seq, None
            if self.max_faults is not None and self._stats.injected >= self.max_faults:
                return seq, None
            if self._rng.random() >= self._rate:
                return seq, None
            eligible = [k for k in self._weights if _applies(k, method, headers)]
            if not eligible:
                return seq, None
            kind = self._rng.choices(eligible, weights=[self._weights[k] for k in eligible])[0]
            self._stats.faults[kind] += 1
            return seq, kind

    def _retry_after(self) -> str:
        with self._lock:
            form = self._rng.randrange(3)
        if form == 2:
            return email.utils.formatdate(time.time() + 1, usegmt=True)
        return str(form)

    def _note(self, event: Event, *, forwarded: int = 0, race_writes: int = 0, upstream_error: bool = False) -> None:
        with self._lock:
            self._events.append(event)
            self._stats.forwarded += forwarded
            self._stats.race_writes += race_writes
            self._stats.upstream_errors += upstream_error

    # -- upstream ------------------------------------------------------------

    def forward(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes | None
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Send one request upstream as received; return status, reason, headers, body."""
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=self.upstream_timeout)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            names = {name.lower() for name, _ in headers}
            if "host" not in names:
                conn.putheader("Host", f"{self.upstream_host}:{self.upstream_port}")
            for name, value in headers:
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            data = response.read()
            return response.status, response.reason, response.getheaders(), data
        finally:
            conn.close()

    def _bump_version(self, path: str, headers: list[tuple[str, str]]) -> int:
        """Change the resource at ``path`` upstream and change it back: same data, a new version."""
        plain = [(k, v) for k, v in headers if k.lower() not in ("if-match", "if-none-match", "content-type")]
        status, _, _, body = self.forward("GET", path, plain, None)
        if status != 200:
            return 0
        try:
            resource = json.loads(body)
        except ValueError:
            return 0
        original = {k: v for k, v in resource.items() if k != "meta"}
        marker = "faultproxy-race"
        changed = {**original, "nickName": marker if original.get("nickName") != marker else marker + "-2"}
        json_headers = [*plain, ("Content-Type", "application/scim+json")]
        writes = 0
        for version in (changed, original):
            self.forward("PUT", path, json_headers, json.dumps(version).encode())
            writes += 1
        return writes

    def rewrite_location(self, value: str) -> str:
        if value.startswith(self.upstream_origin):
            return self.origin + value[len(self.upstream_origin) :]
        return value


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], proxy: FaultProxy) -> None:
        self.proxy = proxy
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def track(self, sock: socket.socket, *, open_: bool) -> None:
        with self._connections_lock:
            if open_:
                self._connections.add(sock)
            else:
                self._connections.discard(sock)

    def drop_connections(self) -> None:
        with self._connections_lock:
            connections, self._connections = list(self._connections), set()
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    # An idle keep-alive connection is closed after this long.
    timeout = 60

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self.connection, open_=True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        self.server.track(self.connection, open_=False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def _handle(self) -> None:
        proxy = self.server.proxy
        method = self.command
        body = self._read_body()
        if body is None and method in _WRITES:
            body = b""
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"content-length"}]
        lowered = {k.lower(): v for k, v in headers}
        forced = proxy.answer(method, self.path, body) if proxy.answer is not None else None
        if forced is not None:
            with proxy._lock:
                proxy._seq += 1
                proxy._stats.requests += 1
                proxy._stats.faults["answer"] += 1
                proxy._events.append(Event(proxy._seq, method, self.path, "answer", forced, False))
            self._answer_error(forced, f"Refused (answered {forced} by faultproxy)")
            return
        seq, fault = proxy._draw(method, self.path, lowered)

        # Every request is counted before its client sees the outcome, so stats read after a
        # call returns (or fails) already include it.
        def note(status: int | None, forwarded: bool, **extra: Any) -> None:
            event = Event(seq, method, self.path, fault, status, forwarded, extra.pop("retry_after", None))
            proxy._note(event, forwarded=int(forwarded), **extra)

        if fault == "429":
            retry_after = proxy._retry_after()
            note(429, False, retry_after=retry_after)
            self._answer_error(429, "Too many requests (injected by faultproxy)", {"Retry-After": retry_after})
        elif fault == "503":
            note(503, False)
            self._answer_error(503, "Service unavailable (injected by faultproxy)")
        elif fault == "502":
            note(502, False)
            page = b"<html><body><h1>502 Bad Gateway</h1></body></html>\n"
            self._answer(502, "Bad Gateway", [("Content-Type", "text/html")], page)
        elif fault == "reset":
            note(None, False)
            self._reset()
        elif fault == "timeout":
            note(None, False)
            proxy._stopping.wait(proxy.delay)
            self._reset()
        elif fault == "412":
            writes = proxy._bump_version(self.path, headers) if proxy.bump_on_412 else 0
            note(412, False, race_writes=writes)
            self._answer_error(412, "Failed to update: the resource has changed on the server (injected by faultproxy)")
        else:
            try:
                status, reason, upstream_headers, data = proxy.forward(method, self.path, headers, body)
            except OSError as exc:
                note(502, False, upstream_error=True)
                text = f"faultproxy: upstream unreachable: {exc}\n".encode()
                self._answer(502, "Bad Gateway", [("Content-Type", "text/plain")], text)
                return
            if fault == "lost_response":
                note(None, True)
                self._reset()
                return
            if fault == "invalid_json":
                status, reason = 200, "OK"
                data = data[: len(data) // 2] or b'{"schemas": ['
            out = [
                (k, proxy.rewrite_location(v) if k.lower() in ("location", "content-location") else v)
                for k, v in upstream_headers
                if k.lower() not in _HOP_BY_HOP | {"content-length"}
            ]
            note(status, True)
            self._answer(status, reason, out, data)

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = self.headers.get("Content-Length")
        if length is None:
            return None
        return self.rfile.read(int(length))

    def _answer(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response_only(status, reason)
        names = {k.lower() for k, _ in headers}
        if "date" not in names:
            self.send_header("Date", self.date_time_string())
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        # Headers and body in one send: no Nagle / delayed-ACK stall between them.
        self._headers_buffer.append(b"\r\n")
        if self.command != "HEAD":
            self._headers_buffer.append(body)
        self.flush_headers()

    def _answer_error(self, status: int, detail: str, extra: dict[str, str] | None = None) -> None:
        body = json.dumps({"schemas": [_SCIM_ERROR], "status": str(status), "detail": detail}).encode()
        headers = [("Content-Type", "application/scim+json"), *(extra or {}).items()]
        self._answer(status, http.HTTPStatus(status).phrase, headers, body)

    def _reset(self) -> None:
        """Close the connection with a TCP reset, nothing answered."""
        self.close_connection = True
        sock = self.connection
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        # The socket's file descriptor closes with its last reader: close both now.
        self.rfile.close()
        sock.close()


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    """A factory: ``fault_proxy(upstream_url, **options)`` starts a :class:`FaultProxy`, stopped after the test."""
    proxies: list[FaultProxy] = []

    def make(upstream: str, **options: Any) -> FaultProxy:
        proxy = FaultProxy(upstream, **options).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()
