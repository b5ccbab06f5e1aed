"""A real OAuth 2.0 token endpoint over HTTP, and a SCIM resource that only accepts its tokens.

Client credentials grant (RFC 6749 §4.4) with ``client_secret_basic`` or
``client_secret_post`` (§2.3.1). Runs ``http.server`` in a thread on a free
port of 127.0.0.1, so the client under test does real HTTP.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

CLIENT_ID = "provisioner"
CLIENT_SECRET = "s3cr3t:with&odd=chars"


@dataclass
class TokenRequest:
    """What the token endpoint received: how the client authenticated, and the form."""

    method: str  # "client_secret_basic" or "client_secret_post"
    form: dict[str, str]


@dataclass
class TokenServer:
    """State shared with the handler threads; read it from the test."""

    url: str = ""
    expires_in: int | None = 3600
    # Seconds a token request takes: long enough for concurrent callers to pile up behind it.
    delay: float = 0.05
    token_requests: list[TokenRequest] = field(default_factory=list)
    # Tokens the SCIM resource saw, in order (None: no bearer token).
    presented: list[str | None] = field(default_factory=list)
    valid: set[str] = field(default_factory=set)
    # Canned answers for the next token requests: (status, json body, headers).
    canned: list[tuple[int, dict[str, Any], dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def token_url(self) -> str:
        return f"{self.url}/oauth/token"

    @property
    def scim_url(self) -> str:
        return f"{self.url}/scim/v2"

    def revoke_all(self) -> None:
        """The target forgets every token it issued: the next SCIM call gets a 401."""
        with self.lock:
            self.valid.clear()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        pass

    def do_POST(self) -> None:
        state = self.server.state
        if self.path != "/oauth/token":
            return self._reply(404, {"error": "not_found"})
        length = int(self.headers.get("Content-Length") or 0)
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode(), keep_blank_values=True).items()}
        time.sleep(state.delay)
        header = self.headers.get("Authorization", "")
        if header.startswith("Basic "):
            method = "client_secret_basic"
            client_id, _, secret = base64.b64decode(header[6:]).decode().partition(":")
        else:
            method = "client_secret_post"
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        with state.lock:
            state.token_requests.append(TokenRequest(method, form))
            number = len(state.token_requests)
            canned = state.canned.pop(0) if state.canned else None
        if canned is not None:
            status, body, headers = canned
            return self._reply(status, body, headers)
        if (client_id, secret) != (CLIENT_ID, CLIENT_SECRET):
            # Like some real servers, this one echoes what it was sent: the client must not repeat it.
            description = f"client {client_id!r} with secret {secret!r} is unknown"
            return self._reply(401, {"error": "invalid_client", "error_description": description})
        if form.get("grant_type") != "client_credentials":
            return self._reply(400, {"error": "unsupported_grant_type"})
        token = f"tok-{number}"
        with state.lock:
            state.valid.add(token)
        body: dict[str, Any] = {"access_token": token, "token_type": "Bearer"}
        if state.expires_in is not None:
            body["expires_in"] = state.expires_in
        if "scope" in form:
            body["scope"] = form["scope"]
        self._reply(200, body, {"Cache-Control": "no-store"})

    def do_GET(self) -> None:
        state = self.server.state
        prefix = "/scim/v2/Users/"
        if not self.path.startswith(prefix):
            return self._reply(404, {"detail": "no such endpoint"})
        header = self.headers.get("Authorization", "")
        token = header[7:] if header.startswith("Bearer ") else None
        with state.lock:
            state.presented.append(token)
            accepted = token in state.valid
        if not accepted:
            error = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"], "status": "401", "detail": "bad token"}
            return self._reply(401, error, {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        user_id = self.path[len(prefix) :]
        self._reply(200, {"id": user_id, "userName": f"user{user_id}"}, {"Content-Type": "application/scim+json"})

    def _reply(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        content = json.dumps(body).encode()
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: TokenServer


@contextmanager
def serve_tokens(**settings: Any) -> Iterator[TokenServer]:
    """Start the token server on a free port; stop it on exit."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.state = TokenServer(url=f"http://127.0.0.1:{server.server_address[1]}", **settings)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.01}, name="token-server", daemon=True
    )
    thread.start()
    try:
        yield server.state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
