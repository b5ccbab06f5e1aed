"""A SCIM 2.0 server that deviates from RFC 7643/7644 in the ways real SaaS targets do, one switch each.

    server = start_deviant_server({"filter_ignored", "no_put"})
    ...point the engine at server.base_url with server.token...
    server.dump()      # {"Users": [...], "Groups": [...]}: what is really stored
    server.requests    # every request received, as (method, path, query)
    server.stop()

It is scim2-server's WSGI application (in memory, bearer token), served in
this process on a free port of 127.0.0.1, behind a middleware that rewrites
requests and answers. With no deviation switched on the middleware only
records requests: the server is scim2-server, RFC-conformant.

Deviations, by name (each one is a class of behaviour seen on real targets):

==============================  ======================================================================
``filter_ignored``              list queries (GET /Users, /Groups, POST /.search) answer every
                                resource, whatever the ``filter``
``group_members_not_returned``  Group resources never carry ``members`` in any answer
                                (GET, list, search, write answers)
``member_removal_ignored``      a PATCH ``remove`` with path ``members[value eq "…"]`` is dropped:
                                answered 200 with the group unchanged. The value-list form
                                (``path: members``, ``value: [{"value": …}]``, as Entra ID sends it)
                                removes those members
``no_put``                      every PUT is answered 405
``patch_501``                   a PATCH with a ``members[value eq …]`` path is answered 501; the
                                value-list form works
``count_rejected``              any request with a ``count`` query parameter is answered 500
``members_by_username``         group members are listed (answers and ``dump()``) with ``value`` =
                                the user's current ``userName``; a member added by userName or by id
                                is linked to the user; a group created without members is refused
                                400 ``invalidValue``; a removal naming a user id matches no member
                                and does nothing (200)
``extension_unsupported``       /ResourceTypes lists no schema extension, /Schemas no enterprise
                                schema, and a write carrying the enterprise extension is refused
                                400 ``invalidValue``
``attribute_dropped``           a User write is answered 201/200 but ``title`` is not stored
``immutable_username``          a PUT or PATCH that changes ``userName`` is answered
                                ``rename_status`` (400 by default; some targets send 500) with
                                ``scimType: mutability``
==============================  ======================================================================

``member_removal_ignored``, ``patch_501`` and ``members_by_username`` accept
the value-list removal form (scim2-server itself refuses it: RFC 7644
§3.5.2.2 defines no value on a multi-valued ``remove``), because targets that
lack the filter form offer that one.
"""

from __future__ import annotations

import io
import json
import re
import secrets
import threading
from http import HTTPStatus
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode
from wsgiref.simple_server import WSGIRequestHandler, make_server

from scim2_models import ScimProvider
from scim2_server.memory import InMemoryStorage
from scim2_server.service import ScimService
from scim2_server.testserver.application import BEARER_TOKEN_SCHEME, BearerTokenApplication
from scim2_server.testserver.cli import ThreadingWSGIServer
from scim2_server.utils import (
    load_default_resource_types,
    load_default_schemas,
    load_default_service_provider_config,
)

DEVIATIONS = frozenset(
    {
        "filter_ignored",
        "group_members_not_returned",
        "member_removal_ignored",
        "no_put",
        "patch_501",
        "count_rejected",
        "members_by_username",
        "extension_unsupported",
        "attribute_dropped",
        "immutable_username",
    }
)
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
ERROR_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:Error"
PREFIX = "/v2"
# members[value eq "…"], the filter-path form of a member removal (RFC 7644 §3.5.2.2).
MEMBER_FILTER = re.compile(r'^\s*members\s*\[\s*value\s+eq\s+"((?:[^"\\]|\\.)*)"\s*\]\s*$', re.IGNORECASE)
LIST_FORM = frozenset({"member_removal_ignored", "patch_501", "members_by_username"})

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass
class _Request:
    method: str
    endpoint: str  # "Users", "Groups", "ResourceTypes", ".search", "" for the root
    resource_id: str | None
    query: list[tuple[str, str]]
    body: Any  # parsed JSON, or None


@dataclass
class _Response:
    status: int
    headers: list[tuple[str, str]]
    body: Any = None  # parsed JSON, or None for no body


def _error(status: int, detail: str, scim_type: str | None = None) -> _Response:
    body: dict[str, Any] = {"schemas": [ERROR_SCHEMA], "status": str(status), "detail": detail}
    if scim_type:
        body["scimType"] = scim_type
    return _Response(status, [("Content-Type", "application/scim+json")], body)


def _filter_path(value: str) -> str:
    return f"members[value eq {json.dumps(value)}]"


@dataclass
class DeviantServer:
    """A running deviant server.

    ``base_url``, ``token``, ``requests`` (each received request as (method, path, query));
    ``dump()``, ``request_count()``, ``clear()``, ``stop()``.
    """

    deviations: frozenset[str]
    token: str
    rename_status: int
    storage: InMemoryStorage
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    port: int = 0
    _httpd: ThreadingWSGIServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base_url(self) -> str:
        """The SCIM base URL: ``http://127.0.0.1:PORT/v2``."""
        return f"http://127.0.0.1:{self.port}{PREFIX}"

    def dump(self) -> dict[str, list[dict[str, Any]]]:
        """What the server really stores, read from its storage: ``{"Users": [...], "Groups": [...]}``.

        Each resource is its full SCIM JSON (``members`` included, whatever the
        deviations make the server answer).
        """
        result: dict[str, list[dict[str, Any]]] = {"Users": [], "Groups": []}
        for resource in self.storage.resources:
            data = resource.model_dump()
            kind = (data.get("meta") or {}).get("resourceType")
            result["Users" if kind == "User" else "Groups"].append(data)
        if "members_by_username" in self.deviations:
            names = {str(u["id"]): str(u.get("userName")) for u in result["Users"]}
            for group in result["Groups"]:
                _list_by_username(group, names)
        return result

    def user_names(self) -> dict[str, str]:
        """Each stored user's id and userName."""
        users = [r.model_dump() for r in self.storage.resources]
        return {
            str(u["id"]): str(u.get("userName")) for u in users if (u.get("meta") or {}).get("resourceType") == "User"
        }

    def clear(self) -> None:
        """Delete every resource and forget the recorded requests."""
        with self.storage.lock:
            self.storage.resources = []
        self.reset_requests()

    def reset_requests(self) -> None:
        """Forget the recorded requests (to count those of one step)."""
        with self._lock:
            self.requests.clear()

    def request_count(self) -> int:
        """How many requests the server received since it started or was last cleared."""
        with self._lock:
            return len(self.requests)

    def record(self, method: str, path: str, query: str) -> None:
        with self._lock:
            self.requests.append((method, path, query))

    def stop(self) -> None:
        """Stop serving and close the socket (the data goes with it)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> DeviantServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Tests read requests from ``server.requests``, not from stderr."""


class _Deviate:
    """The WSGI middleware: records every request, applies the deviations, forwards the rest."""

    def __init__(self, app: WSGIApp, server: DeviantServer) -> None:
        self.app = app
        self.server = server
        self.on = server.deviations

    # -- WSGI plumbing ------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"].upper()
        path = environ.get("PATH_INFO", "")
        self.server.record(method, path, environ.get("QUERY_STRING", ""))
        length = int(environ.get("CONTENT_LENGTH") or 0)
        raw = environ["wsgi.input"].read(length) if length else b""
        scheme, _, token = (environ.get("HTTP_AUTHORIZATION") or "").partition(" ")
        request = self._parse(method, path, environ.get("QUERY_STRING", ""), raw)
        if request is None or scheme.lower() != "bearer" or token != self.server.token:
            # Not ours to deviate on (unauthenticated, not JSON, outside /v2): scim2-server answers.
            response = self._call(environ, method, path, environ.get("QUERY_STRING", ""), raw)
        else:
            response = self.handle(environ, request)
        data = b"" if response.body is None else json.dumps(response.body).encode()
        headers = [(k, v) for k, v in response.headers if k.lower() != "content-length"]
        if response.body is not None:
            headers.append(("Content-Length", str(len(data))))
        start_response(f"{response.status} {_phrase(response.status)}", headers)
        return [data]

    @staticmethod
    def _parse(method: str, path: str, query: str, raw: bytes) -> _Request | None:
        if not path.startswith(PREFIX):
            return None
        parts = [p for p in path[len(PREFIX) :].split("/") if p]
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            return None
        return _Request(
            method,
            parts[0] if parts else "",
            "/".join(parts[1:]) or None,
            parse_qsl(query, keep_blank_values=True),
            body,
        )

    def _call(self, environ: dict[str, Any], method: str, path: str, query: str, raw: bytes) -> _Response:
        inner = dict(environ)
        inner.update(
            REQUEST_METHOD=method,
            PATH_INFO=path,
            QUERY_STRING=query,
            CONTENT_LENGTH=str(len(raw)),
        )
        inner["wsgi.input"] = io.BytesIO(raw)
        captured: dict[str, Any] = {}

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            captured["status"] = int(status.split()[0])
            captured["headers"] = headers

        chunks = self.app(inner, start)
        try:
            data = b"".join(chunks)
        finally:
            close = getattr(chunks, "close", None)
            if close:
                close()
        body = json.loads(data) if data else None
        return _Response(captured["status"], list(captured["headers"]), body)

    def forward(self, environ: dict[str, Any], request: _Request) -> _Response:
        """Send a (possibly rewritten) request to scim2-server."""
        path = PREFIX + "".join(f"/{p}" for p in (request.endpoint, request.resource_id) if p)
        raw = b"" if request.body is None else json.dumps(request.body).encode()
        if raw:
            environ = dict(environ, CONTENT_TYPE="application/scim+json")
        return self._call(environ, request.method, path, urlencode(request.query), raw)

    def current(self, environ: dict[str, Any], endpoint: str, resource_id: str) -> _Response:
        """The resource as stored, read through scim2-server (members and all)."""
        return self.forward(environ, _Request("GET", endpoint, resource_id, [], None))

    # -- deviations -----------------------------------------------------------------------------

    def handle(self, environ: dict[str, Any], request: _Request) -> _Response:
        on = self.on
        if "count_rejected" in on and any(key.lower() == "count" for key, _ in request.query):
            return _error(500, "internal error")
        if "no_put" in on and request.method == "PUT":
            return _error(405, "PUT is not supported; use PATCH")
        writes = request.method in ("POST", "PUT", "PATCH") and request.endpoint in ("Users", "Groups")
        if writes and not isinstance(request.body, dict):
            return self.forward(environ, request)
        if "patch_501" in on and request.method == "PATCH" and request.endpoint == "Groups":
            if any(MEMBER_FILTER.match(str(op.get("path") or "")) for op in _operations(request.body)):
                return _error(501, "filtered member paths are not implemented")
        if "extension_unsupported" in on and writes and ENTERPRISE.lower() in json.dumps(request.body).lower():
            return _error(400, f"unsupported schema {ENTERPRISE}", "invalidValue")
        if "immutable_username" in on and request.endpoint == "Users" and request.method in ("PUT", "PATCH"):
            refused = self._renames(environ, request)
            if refused is not None:
                return refused
        asked = len(_operations(request.body))
        if "attribute_dropped" in on and writes and request.endpoint == "Users":
            _drop_title(request)
        if request.method == "PATCH" and request.endpoint == "Groups" and "Operations" in request.body:
            if "member_removal_ignored" in on:
                request.body["Operations"] = [op for op in _operations(request.body) if not _is_filtered_removal(op)]
            if on & LIST_FORM:
                request.body["Operations"] = list(_list_removals_as_paths(_operations(request.body)))
        if "members_by_username" in on and writes and request.endpoint == "Groups":
            refused = self._members_by_username(request)
            if refused is not None:
                return refused
        if "filter_ignored" in on:
            _ignore_filter(request)
        if request.method == "PATCH" and asked and not _operations(request.body) and request.resource_id:
            # Everything the request asked was dropped: answer as if it had been done.
            response = self.current(environ, request.endpoint, request.resource_id)
        else:
            response = self.forward(environ, request)
        return self._answer(request, response)

    def _answer(self, request: _Request, response: _Response) -> _Response:
        on = self.on
        if not isinstance(response.body, dict):
            return response
        if "members_by_username" in on:
            names = self.server.user_names()
            for resource in _resources(response.body):
                _list_by_username(resource, names)
        if "group_members_not_returned" in on:
            for resource in _resources(response.body):
                if (resource.get("meta") or {}).get("resourceType") == "Group" or request.endpoint == "Groups":
                    resource.pop("members", None)
        if "extension_unsupported" in on and request.method == "GET":
            if request.endpoint == "ResourceTypes":
                for resource in _resources(response.body):
                    resource.pop("schemaExtensions", None)
            if request.endpoint == "Schemas":
                if request.resource_id and request.resource_id.lower() == ENTERPRISE.lower():
                    return _error(404, f"no schema {ENTERPRISE}", None)
                if isinstance(response.body.get("Resources"), list):
                    kept = [r for r in response.body["Resources"] if str(r.get("id")).lower() != ENTERPRISE.lower()]
                    response.body.update(Resources=kept, totalResults=len(kept), itemsPerPage=len(kept))
        return response

    def _renames(self, environ: dict[str, Any], request: _Request) -> _Response | None:
        if not request.resource_id:
            return None
        stored = self.current(environ, "Users", request.resource_id)
        if stored.status != 200 or not isinstance(stored.body, dict):
            return None
        current = stored.body.get("userName")
        wanted: list[Any] = []
        if request.method == "PUT":
            wanted.append(request.body.get("userName"))
        for op in _operations(request.body):
            path = str(op.get("path") or "")
            if path.lower() == "username":
                wanted.append(op.get("value"))
            elif not path and isinstance(op.get("value"), dict):
                wanted.extend(v for k, v in op["value"].items() if k.lower() == "username")
        if any(value is not None and value != current for value in wanted):
            return _error(self.server.rename_status, "userName is immutable", "mutability")
        return None

    def _members_by_username(self, request: _Request) -> _Response | None:
        """Member values written by userName are stored as the user's id (the target links users, and
        lists them by their current userName); a removal naming anything but a userName does nothing."""
        ids = {name.lower(): user_id for user_id, name in self.server.user_names().items()}

        def linked(members: Any) -> Any:
            if not isinstance(members, list):
                return members
            return [
                dict(m, value=ids.get(str(m.get("value")).lower(), m.get("value"))) if isinstance(m, dict) else m
                for m in members
            ]

        body = request.body
        if request.method in ("POST", "PUT"):
            if request.method == "POST" and not body.get("members"):
                return _error(400, "a group must be created with at least one member", "invalidValue")
            if "members" in body:
                body["members"] = linked(body["members"])
            return None
        kept = []
        for op in _operations(body):
            path = str(op.get("path") or "")
            removal = MEMBER_FILTER.match(path) if str(op.get("op", "")).lower() == "remove" else None
            if removal:
                user_id = ids.get(json.loads(f'"{removal.group(1)}"').lower())
                if user_id is None:
                    continue  # an id, or a name nobody has: no member is listed by it
                op = dict(op, path=_filter_path(user_id))
            elif path.lower() == "members":
                op["value"] = linked(op.get("value"))
            elif not path and isinstance(op.get("value"), dict) and "members" in op["value"]:
                op["value"]["members"] = linked(op["value"]["members"])
            kept.append(op)
        body["Operations"] = kept
        return None


def _list_by_username(resource: dict[str, Any], names: dict[str, str]) -> None:
    """A group's members as ``members_by_username`` lists them: by the user's current userName."""
    if isinstance(resource.get("members"), list):
        resource["members"] = [
            dict(m, value=names.get(str(m.get("value")), m.get("value"))) if isinstance(m, dict) else m
            for m in resource["members"]
        ]


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _operations(body: Any) -> list[dict[str, Any]]:
    if not isinstance(body, dict) or not isinstance(body.get("Operations"), list):
        return []
    return [op for op in body["Operations"] if isinstance(op, dict)]


def _is_filtered_removal(op: dict[str, Any]) -> bool:
    return str(op.get("op", "")).lower() == "remove" and bool(MEMBER_FILTER.match(str(op.get("path") or "")))


def _list_removals_as_paths(operations: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``remove members [{"value": x}, …]`` becomes one ``members[value eq "x"]`` removal per value."""
    for op in operations:
        value = op.get("value")
        if (
            str(op.get("op", "")).lower() == "remove"
            and str(op.get("path") or "").lower() == "members"
            and isinstance(value, list)
        ):
            for member in value:
                if isinstance(member, dict) and "value" in member:
                    yield {"op": "remove", "path": _filter_path(str(member["value"]))}
        else:
            yield op


def _drop_title(request: _Request) -> None:
    body = request.body
    for key in [k for k in body if k.lower() == "title"]:
        del body[key]
    if request.method == "PATCH":
        kept = []
        for op in _operations(body):
            if str(op.get("path") or "").lower() == "title":
                continue
            if not op.get("path") and isinstance(op.get("value"), dict):
                op["value"] = {k: v for k, v in op["value"].items() if k.lower() != "title"}
            kept.append(op)
        body["Operations"] = kept


def _ignore_filter(request: _Request) -> None:
    if request.method == "GET" and request.endpoint in ("Users", "Groups") and not request.resource_id:
        request.query = [(k, v) for k, v in request.query if k.lower() != "filter"]
    if request.method == "POST" and ".search" in (request.endpoint, request.resource_id):
        if isinstance(request.body, dict):
            request.body.pop("filter", None)


def _resources(body: dict[str, Any]) -> list[dict[str, Any]]:
    if isinstance(body.get("Resources"), list):
        return [r for r in body["Resources"] if isinstance(r, dict)]
    return [body]


def start_deviant_server(
    deviations: Iterable[str] = (), *, rename_status: int = 400, token: str | None = None
) -> DeviantServer:
    """Serve a deviant SCIM server on a free port of 127.0.0.1, in a background thread.

    ``deviations``: names from :data:`DEVIATIONS`; none gives plain scim2-server.
    ``rename_status``: the status of a refused rename under ``immutable_username``.
    Raises ``ValueError`` for an unknown deviation name.
    """
    wanted = frozenset(deviations)
    unknown = wanted - DEVIATIONS
    if unknown:
        raise ValueError(f"unknown deviations: {sorted(unknown)}; known: {sorted(DEVIATIONS)}")
    token = token or secrets.token_urlsafe(24)
    config = load_default_service_provider_config()
    config.authentication_schemes = [*(config.authentication_schemes or []), BEARER_TOKEN_SCHEME]
    provider = ScimProvider.from_discovery(
        load_default_schemas().values(), load_default_resource_types().values(), config=config
    )
    storage = InMemoryStorage()
    app = BearerTokenApplication(
        storage, provider, service=ScimService(provider, secret=secrets.token_urlsafe(32)), bearer_tokens=[token]
    )
    server = DeviantServer(wanted, token, rename_status, storage)
    httpd = make_server("127.0.0.1", 0, _Deviate(app, server), server_class=ThreadingWSGIServer, handler_class=_Quiet)
    server.port = int(httpd.server_port)
    server._httpd = httpd
    # A short poll interval: stop() returns within 50 ms instead of half a second.
    server._thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="deviant-scim", daemon=True
    )
    server._thread.start()
    return server
