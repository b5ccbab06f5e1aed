"""The generic SCIM 2.0 client: one per target (or per worker of a target).

Every call goes through :meth:`ScimClient.send`, the single place where
transport errors become :mod:`connectors._errors` and where retry policy
slots in.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson

from connectors._errors import BODY_CAP, InvalidResponse, ScimError, TransientError
from connectors._protocol import (
    CONTENT_TYPE,
    ScimRequest,
    ScimResult,
    check_response,
    equals_filter,
    patch_body,
    resource_path,
)

# Timeouts are always set: a target that hangs must not hang a cycle.
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a target says it supports (``/ServiceProviderConfig``), possibly overridden."""

    patch: bool = False
    etag: bool = False
    filter: bool = True
    max_results: int | None = None

    @classmethod
    def from_service_provider_config(cls, body: dict[str, Any]) -> Capabilities:
        """Read RFC 7643 §5; anything missing or malformed counts as unsupported."""

        def supported(name: str) -> bool:
            section = body.get(name)
            return isinstance(section, dict) and section.get("supported") is True

        filter_section = body.get("filter") if isinstance(body.get("filter"), dict) else {}
        max_results = filter_section.get("maxResults") if filter_section else None
        return cls(
            patch=supported("patch"),
            etag=supported("etag"),
            filter=supported("filter") if "filter" in body else True,
            max_results=max_results if isinstance(max_results, int) and max_results > 0 else None,
        )


@dataclass(frozen=True, slots=True)
class Exchange:
    """One HTTP round trip as the engine records it (never with headers, so never credentials)."""

    started_at: datetime
    method: str
    url: str
    request_body: Any
    status: int | None
    duration_ms: float
    response_body: str | None
    error: ScimError | None


class ScimClient:
    """Async SCIM 2.0 client over httpx for one target."""

    def __init__(
        self,
        base_url: str,
        *,
        auth: httpx.Auth | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        max_connections: int = 4,
        verify: bool | str = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url + "/",
            auth=auth,
            timeout=timeout,
            verify=verify,
            transport=transport,
            # Redirects are refused here; a redirect is reported, never followed blindly
            # with credentials attached.
            follow_redirects=False,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            headers={"Accept": f"{CONTENT_TYPE}, application/json"},
        )
        # Every round trip since the caller last cleared it; one client serves one worker.
        self.history: list[Exchange] = []

    async def __aenter__(self) -> ScimClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def send(self, request: ScimRequest) -> ScimResult:
        """Send one request and check the answer; raise a ScimError on any failure."""
        headers = {}
        content = None
        if request.body is not None:
            content = orjson.dumps(request.body)
            headers["Content-Type"] = CONTENT_TYPE
        if request.if_match:
            headers["If-Match"] = request.if_match
        info = request.info(self.base_url)
        started_at = datetime.now(UTC)
        started = time.perf_counter()
        status: int | None = None
        body: bytes = b""
        error: ScimError | None = None
        try:
            response = await self._http.request(
                request.method, request.path, content=content, params=request.params, headers=headers
            )
            status, body = response.status_code, response.content
            return check_response(request, self.base_url, status, _lower_headers(response.headers), body)
        except ScimError as exc:
            error = exc
            raise
        except httpx.TimeoutException as exc:
            error = TransientError(f"{request.method} {info.url}: timed out ({type(exc).__name__})", request=info)
            raise error from exc
        except httpx.TransportError as exc:
            error = TransientError(f"{request.method} {info.url}: {type(exc).__name__}: {exc}", request=info)
            raise error from exc
        finally:
            self.history.append(
                Exchange(
                    started_at=started_at,
                    method=request.method,
                    url=info.url if not request.params else f"{info.url}?{httpx.QueryParams(request.params)}",
                    request_body=request.body,
                    status=status,
                    duration_ms=(time.perf_counter() - started) * 1000,
                    response_body=body[:BODY_CAP].decode("utf-8", "replace") if body else None,
                    error=error,
                )
            )

    async def create(self, endpoint: str, resource: dict[str, Any]) -> ScimResult:
        """POST a new resource (RFC 7644 §3.3)."""
        return await self.send(ScimRequest("POST", endpoint, body=resource, needs_resource=True))

    async def get(self, endpoint: str, resource_id: str) -> ScimResult:
        """GET one resource by id (RFC 7644 §3.4.1)."""
        return await self.send(ScimRequest("GET", resource_path(endpoint, resource_id), needs_resource=True))

    async def replace(
        self, endpoint: str, resource_id: str, resource: dict[str, Any], *, etag: str | None = None
    ) -> ScimResult:
        """PUT the whole resource (RFC 7644 §3.5.1)."""
        body = {**resource, "id": resource_id}
        return await self.send(ScimRequest("PUT", resource_path(endpoint, resource_id), body=body, if_match=etag))

    async def patch(
        self, endpoint: str, resource_id: str, operations: list[dict[str, Any]], *, etag: str | None = None
    ) -> ScimResult:
        """PATCH with add/replace/remove operations (RFC 7644 §3.5.2)."""
        request = ScimRequest("PATCH", resource_path(endpoint, resource_id), body=patch_body(operations), if_match=etag)
        return await self.send(request)

    async def delete(self, endpoint: str, resource_id: str, *, etag: str | None = None) -> ScimResult:
        """DELETE a resource (RFC 7644 §3.6)."""
        return await self.send(ScimRequest("DELETE", resource_path(endpoint, resource_id), if_match=etag))

    async def find(self, endpoint: str, attribute: str, value: str) -> list[dict[str, Any]]:
        """Resources whose ``attribute`` equals ``value`` (the filter value is escaped)."""
        return [r async for r in self.iter_resources(endpoint, filter=equals_filter(attribute, value))]

    async def iter_resources(
        self, endpoint: str, *, filter: str | None = None, page_size: int = 100
    ) -> AsyncIterator[dict[str, Any]]:
        """Every resource of an endpoint, page by page (RFC 7644 §3.4.2.4)."""
        start = 1
        while True:
            params: dict[str, str | int] = {"startIndex": start, "count": page_size}
            if filter is not None:
                params["filter"] = filter
            result = await self.send(ScimRequest("GET", endpoint, params=params))
            body = result.resource or {}
            page = body.get("Resources") or []
            if not isinstance(page, list):
                raise InvalidResponse(
                    f"GET {self.base_url}/{endpoint}: 'Resources' is not a list", status=result.status
                )
            for item in page:
                yield item
            total = body.get("totalResults")
            start += len(page)
            # Servers that ignore paging send everything at once; stop on an empty page too.
            if not page or not isinstance(total, int) or start > total:
                return

    async def capabilities(self) -> Capabilities:
        """Read ``/ServiceProviderConfig``; a target that fails to answer gets safe defaults."""
        try:
            result = await self.send(ScimRequest("GET", "ServiceProviderConfig"))
        except ScimError:
            return Capabilities()
        return Capabilities.from_service_provider_config(result.resource or {})


def _lower_headers(headers: httpx.Headers) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}
