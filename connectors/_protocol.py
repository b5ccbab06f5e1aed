"""SCIM 2.0 protocol steps without I/O: prepare a request, check a response.

The client in ``_client.py`` does the sending; everything here is pure so that
it can be tested on plain values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from urllib.parse import quote, urlsplit

import orjson

from connectors._errors import (
    InvalidResponse,
    PermanentError,
    RequestInfo,
    error_class_for,
)

SCHEMA_PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
SCHEMA_LIST_RESPONSE = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
SCHEMA_ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"

# RFC 7644 §3.1: application/scim+json; plain JSON is accepted from servers.
CONTENT_TYPE = "application/scim+json"


@dataclass(frozen=True, slots=True)
class ScimRequest:
    """One SCIM call, ready to send: ``path`` is relative to the target's base URL."""

    method: str
    path: str
    body: Any = None
    params: dict[str, str | int] | None = None
    if_match: str | None = None
    # Whether the caller needs the resource back (create must learn the new id).
    needs_resource: bool = False
    # Whether a JSON array is a valid answer (discovery endpoints of some targets): it is
    # handed on as ``{"Resources": [...]}``.
    accept_array: bool = False
    # The id the answer must carry (a GET by id): another resource's answer is not data.
    resource_id: str | None = None
    # Whether to resend after a failure that may have come after the server applied the
    # request (no answer, a garbled answer). False for creates: the caller looks first.
    retry_ambiguous: bool = True

    def info(self, base_url: str) -> RequestInfo:
        """What to record about this request; no headers, so no credentials."""
        return RequestInfo(self.method, f"{base_url.rstrip('/')}/{self.path}", self.body)


@dataclass(frozen=True, slots=True)
class ScimResult:
    """A successful answer: the resource (when one came back), its ETag and location."""

    status: int
    resource: dict[str, Any] | None = None
    etag: str | None = None
    location: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str | None:
        """The resource id, from the body or else from the Location header."""
        if self.resource and self.resource.get("id"):
            return str(self.resource["id"])
        if self.location:
            return urlsplit(self.location).path.rstrip("/").rsplit("/", 1)[-1] or None
        return None

    @property
    def version(self) -> str | None:
        """The ETag header, else ``meta.version`` of the body (RFC 7644 §3.14)."""
        if self.etag:
            return self.etag
        meta = (self.resource or {}).get("meta") or {}
        return meta.get("version")


def quote_filter_value(value: str) -> str:
    """Quote a string for a SCIM filter (RFC 7644 §3.4.2.2: a JSON string literal)."""
    return orjson.dumps(str(value)).decode()


def equals_filter(attribute: str, value: str) -> str:
    """``attribute eq "value"`` with the value escaped, never concatenated raw."""
    if not attribute.replace(".", "").replace(":", "").replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"not a SCIM attribute path: {attribute!r}")
    return f"{attribute} eq {quote_filter_value(value)}"


# RFC 7643 §3.3: the core schemas' attributes sit at the top level of a resource, even when
# a filter names them by their full URN (``urn:ietf:params:scim:schemas:core:2.0:User:userName``).
_CORE_SCHEMA_PREFIX = "urn:ietf:params:scim:schemas:core:"


def attribute_values(resource: dict[str, Any], attribute: str) -> list[Any]:
    """Every value that ``attribute`` (an RFC 7644 §3.10 attribute path) has in ``resource``.

    ``attribute`` is ``name``, ``name.sub`` or ``urn:…:name[.sub]`` (an extension's
    attributes live under its URN). Names compare case-insensitively (RFC 7643 §2.1).
    A multi-valued attribute contributes each of its values; a complex value named
    without a sub-attribute contributes its ``value`` sub-attribute (RFC 7644 §3.4.2.2).
    An absent attribute has no values: ``[]``.
    """
    node: Any = resource
    path = attribute
    if attribute.lower().startswith("urn:"):
        urn, _, path = attribute.rpartition(":")
        extension = _member(resource, urn)
        if extension is not None:
            node = extension
        elif not urn.lower().startswith(_CORE_SCHEMA_PREFIX):
            return []
    nodes = [node]
    for name in path.split("."):
        found: list[Any] = []
        for current in nodes:
            for item in current if isinstance(current, list) else [current]:
                if isinstance(item, dict):
                    value = _member(item, name)
                    if value is not None:
                        found.extend(value if isinstance(value, list) else [value])
        nodes = found
    return [_member(v, "value") if isinstance(v, dict) else v for v in nodes]


def value_matches(found: Any, wanted: str, *, case_exact: bool) -> bool:
    """Whether one attribute value equals ``wanted`` the way the target must compare it.

    ``case_exact=False`` compares case-insensitively (RFC 7643 §2.1, e.g. ``userName``
    whose ``caseExact`` is false, §4.1.1). Booleans and numbers compare by their JSON text.
    """
    if isinstance(found, bool):
        text = "true" if found else "false"
    elif isinstance(found, int | float | str):
        text = str(found)
    else:
        return False
    return text == wanted if case_exact else text.casefold() == wanted.casefold()


def resource_matches(resource: dict[str, Any], attribute: str, value: str, *, case_exact: bool) -> bool:
    """Whether ``attribute`` of ``resource`` equals ``value``: for a multi-valued attribute, any of its values."""
    return any(value_matches(v, value, case_exact=case_exact) for v in attribute_values(resource, attribute))


def _member(node: dict[str, Any], name: str) -> Any:
    """``node[name]``, the name compared case-insensitively (RFC 7643 §2.1)."""
    if name in node:
        return node[name]
    folded = name.casefold()
    for key, value in node.items():
        if key.casefold() == folded:
            return value
    return None


def resource_path(endpoint: str, resource_id: str | None = None) -> str:
    """``Users`` or ``Users/<id>``, the id percent-quoted so that it cannot escape the path."""
    if resource_id is None:
        return endpoint
    return f"{endpoint}/{quote(str(resource_id), safe='')}"


def patch_body(operations: list[dict[str, Any]]) -> dict[str, Any]:
    """A PatchOp message (RFC 7644 §3.5.2)."""
    return {"schemas": [SCHEMA_PATCH_OP], "Operations": operations}


def check_response(
    request: ScimRequest,
    base_url: str,
    status: int,
    headers: dict[str, str],
    content: bytes,
    *,
    now: datetime | None = None,
) -> ScimResult:
    """Turn an HTTP answer into a result, or raise the error that says what to do next.

    ``now`` is the wall clock that a ``Retry-After`` HTTP-date is measured against.
    """
    if 200 <= status < 300:
        return _success(request, base_url, status, headers, content)
    info = request.info(base_url)
    if 300 <= status < 400:
        raise PermanentError(
            f"{request.method} {info.url}: redirected ({status}) to {headers.get('location', '?')}, not followed",
            status=status,
            request=info,
        )
    body = _decode(content)
    scim_type, detail = _error_fields(body)
    cls = error_class_for(status)
    raise cls(
        f"{request.method} {info.url} answered {status}",
        status=status,
        scim_type=scim_type,
        detail=detail,
        request=info,
        response_body=content.decode("utf-8", "replace") if content else None,
        retry_after=parse_retry_after(headers.get("retry-after"), now=now),
    )


def _success(
    request: ScimRequest, base_url: str, status: int, headers: dict[str, str], content: bytes
) -> ScimResult:
    resource: dict[str, Any] | None = None
    if content.strip():
        try:
            decoded = orjson.loads(content)
        except orjson.JSONDecodeError as exc:
            raise InvalidResponse(
                f"{request.method} {request.info(base_url).url} answered {status} with a body that is not JSON",
                status=status,
                request=request.info(base_url),
                response_body=content.decode("utf-8", "replace"),
            ) from exc
        if isinstance(decoded, list) and request.accept_array:
            decoded = {"Resources": decoded}
        if not isinstance(decoded, dict):
            raise InvalidResponse(
                f"{request.method} {request.info(base_url).url} answered {status} with JSON that is not an object",
                status=status,
                request=request.info(base_url),
                response_body=content.decode("utf-8", "replace"),
            )
        resource = decoded
    result = ScimResult(
        status=status,
        resource=resource,
        etag=headers.get("etag"),
        location=headers.get("location") or headers.get("content-location"),
        headers=headers,
    )
    if request.needs_resource:
        # A body is the resource (RFC 7644 §3.3, §3.4.1) and must carry its id; only an
        # empty body may name the new resource by its Location alone.
        why = None
        if resource is not None and not _usable_id(resource.get("id")):
            why = "a body without a resource id"
        elif result.id is None:
            why = "neither a body nor a Location: without a resource id"
        elif request.resource_id is not None and result.id.casefold() != request.resource_id.casefold():
            why = f"another resource (id {result.id!r}, not {request.resource_id!r})"
        if why is not None:
            raise InvalidResponse(
                f"{request.method} {request.info(base_url).url} answered {status} with {why}",
                status=status,
                request=request.info(base_url),
                response_body=content.decode("utf-8", "replace"),
            )
    return result


def read_list_response(result: ScimResult, info: RequestInfo) -> tuple[list[dict[str, Any]], int | None]:
    """The ``Resources`` and ``totalResults`` of a ListResponse (RFC 7644 §3.4.2), checked for shape.

    ``totalResults`` is None when absent or not a count. ``Resources`` may be left out
    only when ``totalResults`` is 0. Raises :class:`InvalidResponse` for anything else
    that is not a list of objects each carrying an ``id``: such an answer is never data.
    """
    body = result.resource

    def invalid(why: str) -> InvalidResponse:
        return InvalidResponse(f"{info.method} {info.url} answered {result.status} with {why}", status=result.status,
                               request=info)  # fmt: skip

    if body is None:
        raise invalid("no body where a ListResponse was expected")
    total = body.get("totalResults")
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        total = None
    resources = _member(body, "Resources")
    if resources is None:
        if total == 0:
            return [], 0
        said = "" if total is None else f" though totalResults is {total}"
        raise invalid(f"a list answer without 'Resources'{said}")
    if not isinstance(resources, list):
        raise invalid("'Resources' that is not a list")
    for item in resources:
        if not isinstance(item, dict) or not _usable_id(item.get("id")):
            raise invalid("a listed resource that is not an object with an 'id'")
    return resources, total


def _usable_id(value: Any) -> bool:
    return (isinstance(value, str) and value.strip() != "") or (isinstance(value, int) and not isinstance(value, bool))


def _decode(content: bytes) -> Any:
    try:
        return orjson.loads(content) if content else None
    except orjson.JSONDecodeError:
        return None


def _error_fields(body: Any) -> tuple[str | None, str | None]:
    """scimType and detail of a SCIM Error body (RFC 7644 §3.12), if the body is one."""
    if not isinstance(body, dict):
        return None, None
    scim_type = body.get("scimType")
    detail = body.get("detail")
    return (str(scim_type) if scim_type else None, str(detail) if detail else None)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (RFC 9110 §10.2.3): delta-seconds or an HTTP-date.

    A date is measured against ``now`` (default: the current UTC time); a date in the past means 0.
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    if now is None:
        now = datetime.now(timezone.utc)
    return max(0.0, (when - now).total_seconds())

