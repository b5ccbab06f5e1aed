"""The generic SCIM 2.0 client: one per target (or per worker of a target).

Every call goes through :meth:`ScimClient.send`, the single place where
transport errors become :mod:`connectors._errors`, where the target's
:class:`~connectors.RetryPolicy` is applied, where a 401 earns one token
refresh, and where redirects are followed (same origin only). Every HTTP round
trip, retries and redirect hops included, is appended to ``history``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, MutableSet, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
from tenacity import RetryCallState

from connectors._auth import BearerAuth, TokenSource
from connectors._errors import (
    BODY_CAP,
    AuthError,
    InvalidResponse,
    NotFound,
    PermanentError,
    RequestInfo,
    ScimError,
    TransientError,
    Unsupported,
)
from connectors._discovery import ResourceType, Schema, discovery_items, parse_resource_types, parse_schemas
from connectors._http import (
    DEFAULT_TIMEOUT,
    Verify,
    require_secure_url,
    round_trip_deadline,
    same_origin,
    tls_verify,
)
from connectors._limiter import TargetLimiter
from connectors._protocol import (
    CONTENT_TYPE,
    ScimRequest,
    ScimResult,
    check_response,
    equals_filter,
    patch_body,
    read_list_response,
    resource_matches,
    resource_path,
)
from connectors._quirks import Quirks
from connectors._retry import RetryPolicy

log = logging.getLogger("connectors")

# Bodies past this size are refused (16 MiB: a page of 100 large groups fits many times over).
DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024

# RFC 9110 §15.4: the redirects that name a new location. 303 turns the request into a GET
# (the operation was done; the result is elsewhere); the others keep the method and body.
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


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


@dataclass(slots=True)
class _Call:
    """One call to :meth:`ScimClient.send`, across its attempts."""

    request: ScimRequest
    attempts: int = 0
    refreshed: bool = False


class ScimClient:
    """Async SCIM 2.0 client over httpx for one target (one instance per worker).

    What belongs to the target rather than the worker is passed in, shared:
    the ``retry`` policy, the ``limiter``, the ``quirks`` and, for OAuth 2.0,
    the ``auth`` token source.
    """

    def __init__(
        self,
        base_url: str,
        *,
        auth: httpx.Auth | TokenSource | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        max_connections: int = 4,
        verify: Verify = True,
        transport: httpx.AsyncBaseTransport | None = None,
        retry: RetryPolicy | None = None,
        limiter: TargetLimiter | None = None,
        allow_insecure_http: bool = False,
        max_redirects: int = 5,
        quirks: Quirks | None = None,
        max_pages: int = 10_000,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        deadline: float | None = None,
    ) -> None:
        require_secure_url(base_url, allow_insecure_http=allow_insecure_http, what="SCIM base URL")
        self.base_url = base_url.rstrip("/")
        self.retry = retry if retry is not None else RetryPolicy()
        # Without a shared limiter, this client is polite on its own.
        self.limiter = limiter if limiter is not None else TargetLimiter(max_concurrency=max_connections)
        self.max_redirects = max_redirects
        # The target's deviations: shared by its clients, like the limiter, so that one learns for all.
        self.quirks = quirks if quirks is not None else Quirks()
        # A listing longer than this many pages is a target that pages forever (1M resources at 100 a page).
        self.max_pages = max_pages
        # Whether this client saw a page asked with count answered (then a 500 is not count's fault).
        self._count_answered = False
        if max_response_bytes < 1:
            raise ValueError(f"max_response_bytes must be at least 1, not {max_response_bytes}")
        # A body larger than this is not read on: a 50 MB answer to a lookup is not data.
        self.max_response_bytes = max_response_bytes
        # Seconds one round trip may take in all (default: the longest part of ``timeout``).
        self.deadline = deadline if deadline is not None else round_trip_deadline(timeout)
        # A token source is asked before each attempt (outside the limiter's slot, so that its own
        # token request can take one); a plain httpx auth flow signs requests inside httpx.
        self._tokens = auth if isinstance(auth, TokenSource) else None
        self._http = httpx.AsyncClient(
            base_url=self.base_url + "/",
            auth=None if self._tokens is not None else auth,
            timeout=timeout,
            verify=tls_verify(verify, url=self.base_url),
            transport=transport,
            # httpx never follows a redirect by itself: send() does, to the same origin only.
            follow_redirects=False,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            headers={"Accept": f"{CONTENT_TYPE}, application/json"},
        )
        # Every round trip since the caller last cleared it; one client serves one worker.
        self.history: list[Exchange] = []
        # How requests are built and sent: straight to httpx's transport where the auth allows.
        direct = _direct_route(self._http, self.base_url, auth)
        self._route: _DirectRoute | _ClientRoute = direct if direct is not None else _ClientRoute(self._http)

    async def __aenter__(self) -> ScimClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (a shared token source is left open: it is the target's)."""
        await self._http.aclose()

    async def send(self, request: ScimRequest) -> ScimResult:
        """Send one request, retrying as the policy says; raise a ScimError when it does not succeed."""
        call = _Call(request)
        try:
            # Most calls succeed at once: the retry controller is built only after a failure.
            return await self._attempt(call)
        except ScimError as exc:
            first = exc
        if self.retry.max_attempts <= 1:
            first.attempts = call.attempts
            raise first

        async def attempt(call: _Call) -> ScimResult:
            nonlocal first
            if first is not None:
                # The controller sees the failure already met as its first attempt: same wait, same log.
                error, first = first, None
                raise error
            return await self._attempt(call)

        retrying = self.retry.retrying(before_sleep=self._before_retry, ambiguous=request.retry_ambiguous)
        try:
            return await retrying(attempt, call)
        except ScimError as exc:
            exc.attempts = call.attempts
            raise

    def _before_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        delay = state.upcoming_sleep
        if isinstance(error, ScimError) and error.status == 429:
            # The target is overloaded for every worker, not just this one: all of them wait.
            self.limiter.slow_down(delay)
        log.info("retrying in %.2fs after attempt %d: %s", delay, state.attempt_number, error)

    async def _attempt(self, call: _Call) -> ScimResult:
        call.attempts += 1
        token = await self._tokens.token() if self._tokens is not None else None
        try:
            return await self._round_trip(call.request, token)
        except AuthError as exc:
            if self._tokens is None or token is None or call.refreshed or exc.status != 401:
                raise
        # One refresh per call, however many attempts: a second 401 is an AuthError, not a storm.
        call.refreshed = True
        call.attempts += 1
        token = await self._tokens.refresh(token)
        return await self._round_trip(call.request, token)

    async def _round_trip(self, request: ScimRequest, token: str | None) -> ScimResult:
        """One attempt: the request, then any redirects to the same origin."""
        headers = {}
        content = None
        if request.body is not None:
            content = orjson.dumps(request.body)
            headers["Content-Type"] = CONTENT_TYPE
        if request.if_match:
            headers["If-Match"] = request.if_match
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        outgoing = self._route.request(request.method, request.path, content, request.params, headers)
        body = request.body
        for hops_left in range(self.max_redirects, -1, -1):
            async with self.limiter.slot():
                answer = await self._exchange(request, outgoing, body, hops_left)
            if isinstance(answer, ScimResult):
                return answer
            outgoing, body = answer
        raise AssertionError("unreachable: the last hop raises")  # pragma: no cover

    async def _exchange(
        self, request: ScimRequest, outgoing: httpx.Request, body: Any, hops_left: int
    ) -> ScimResult | tuple[httpx.Request, Any]:
        """One HTTP round trip, recorded: a result, the next hop of a redirect, or an error."""
        started_at = datetime.now(UTC)
        started = time.perf_counter()
        status: int | None = None
        content: bytes = b""
        error: ScimError | None = None
        try:
            # httpx's timeouts bound each read: a target sending a byte every few seconds would
            # never trip them. The deadline bounds the whole round trip, body included.
            async with asyncio.timeout(self.deadline):
                response = await self._route.send(outgoing)
                try:
                    status = response.status_code
                    content, whole = await _read_capped(response, self.max_response_bytes)
                finally:
                    await response.aclose()
            headers = _lower_headers(response.headers)
            if not whole and 200 <= status < 300:
                info = _request_info(outgoing, body)
                raise InvalidResponse(
                    f"{info.method} {info.url} answered {status} with a body over {self.max_response_bytes} bytes",
                    status=status,
                    request=info,
                )
            if status in _REDIRECTS and "location" in headers:
                return self._follow(outgoing, body, status, headers["location"], _request_info(outgoing, body), hops_left)
            # An error answer over the cap is judged by its status; its body was cut.
            return check_response(request, self.base_url, status, headers, content, now=self.retry.now())
        except ScimError as exc:
            error = exc
            raise
        except httpx.TimeoutException as exc:
            info = _request_info(outgoing, body)
            error = TransientError(f"{info.method} {info.url}: timed out ({type(exc).__name__})", request=info)
            raise error from exc
        except httpx.TransportError as exc:
            info = _request_info(outgoing, body)
            error = TransientError(f"{info.method} {info.url}: {type(exc).__name__}: {exc}", request=info)
            raise error from exc
        except TimeoutError as exc:
            # No status, as for any timeout: retried like one, and ambiguous (it may have been applied).
            info = _request_info(outgoing, body)
            message = f"{info.method} {info.url}: no complete answer within {self.deadline:g}s"
            error = TransientError(message, request=info)
            raise error from exc
        finally:
            self.history.append(
                Exchange(
                    started_at=started_at,
                    method=outgoing.method,
                    url=str(outgoing.url),
                    request_body=body,
                    status=status,
                    duration_ms=(time.perf_counter() - started) * 1000,
                    response_body=content[:BODY_CAP].decode("utf-8", "replace") if content else None,
                    error=error,
                )
            )

    def _follow(
        self, outgoing: httpx.Request, body: Any, status: int, location: str, info: RequestInfo, hops_left: int
    ) -> tuple[httpx.Request, Any]:
        """The next request of a redirect, or a PermanentError if it leaves the target or goes on too long."""
        where = f"{info.method} {info.url}: redirected ({status}) to {location}"
        try:
            target = outgoing.url.join(location)
        except httpx.InvalidURL as exc:
            raise PermanentError(f"{where}: not a URL", status=status, request=info) from exc
        if not same_origin(outgoing.url, target):
            # Never followed: the Authorization header must not reach another scheme, host or port.
            raise PermanentError(f"{where}: another origin, not followed", status=status, request=info)
        if hops_left <= 0:
            raise PermanentError(f"{where}: more than {self.max_redirects} redirects", status=status, request=info)
        method, content, headers = outgoing.method, outgoing.content, httpx.Headers(outgoing.headers)
        if status == 303 and method != "HEAD":
            method, content, body = "GET", b"", None
            for name in ("Content-Type", "If-Match"):
                headers.pop(name, None)
        # Recomputed for the new request.
        for name in ("Host", "Content-Length"):
            headers.pop(name, None)
        return self._route.request(method, str(target), content or None, None, headers), body

    async def create(self, endpoint: str, resource: dict[str, Any]) -> ScimResult:
        """POST a new resource (RFC 7644 §3.3)."""
        # A POST whose answer was lost may have created the resource: never resent blindly.
        request = ScimRequest("POST", endpoint, body=resource, needs_resource=True, retry_ambiguous=False)
        return await self.send(request)

    async def get(self, endpoint: str, resource_id: str) -> ScimResult:
        """GET one resource by id (RFC 7644 §3.4.1)."""
        path = resource_path(endpoint, resource_id)
        request = ScimRequest("GET", path, needs_resource=True, resource_id=str(resource_id))
        return await self.send(request)

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

    async def find(
        self, endpoint: str, attribute: str, value: str, *, case_exact: bool = True
    ) -> list[dict[str, Any]]:
        """The resources whose ``attribute`` really equals ``value``, de-duplicated by ``id``.

        ``attribute`` is a path as in :func:`~connectors._protocol.attribute_values` (``userName``,
        ``name.familyName``, ``urn:…:enterprise:2.0:User:employeeNumber``); a multi-valued
        attribute matches when any value does. ``case_exact=False`` compares as RFC 7643
        §2.1 says for ``caseExact: false`` attributes such as ``userName`` (§4.1.1).

        The target's answer to ``filter=attribute eq "value"`` (RFC 7644 §3.4.2.2, the value
        escaped) is a claim: every result is checked. A result that does not match even
        case-insensitively means the target ignores or mangles filters: ``quirks.filter`` is
        learned as ``"client"`` and the endpoint is paged through and matched here, as it is
        from then on. A filter refused as ``invalidFilter`` or 501 is matched here for this
        call. Raises what :meth:`iter_resources` raises; never returns a resource that does
        not match.
        """
        if self.quirks.filter == "server":
            try:
                found = await self._find_filtered(endpoint, attribute, value, case_exact=case_exact)
            except PermanentError as exc:
                if not (isinstance(exc, Unsupported) or exc.scim_type == "invalidFilter"):
                    raise
                log.info("GET %s/%s refused the filter on %s (%s); matching client-side", self.base_url, endpoint,
                         attribute, exc.status)  # fmt: skip
                found = None
            if found is not None:
                return found
        return [
            resource
            async for resource in self.iter_resources(endpoint)
            if resource_matches(resource, attribute, value, case_exact=case_exact)
        ]

    async def _find_filtered(
        self, endpoint: str, attribute: str, value: str, *, case_exact: bool
    ) -> list[dict[str, Any]] | None:
        """The matching results of a server-side filter, or None once a result shows it was ignored."""
        found: list[dict[str, Any]] = []
        async with aclosing(self.iter_resources(endpoint, filter=equals_filter(attribute, value))) as results:
            async for resource in results:
                if resource_matches(resource, attribute, value, case_exact=case_exact):
                    found.append(resource)
                elif not resource_matches(resource, attribute, value, case_exact=False):
                    # The reason names the attribute, never the value: it is personal data.
                    self.quirks.learn(
                        "filter",
                        "client",
                        f"GET /{endpoint} answered filter '{attribute} eq …' with a resource whose "
                        f"{attribute} does not match",
                    )
                    return None
                # Else the target compared without case where it should not have: dropped, not a sign
                # that it ignores filters.
        return found

    async def iter_resources(
        self,
        endpoint: str,
        *,
        filter: str | None = None,
        attributes: Sequence[str] | str | None = None,
        page_size: int = 100,
        seen: MutableSet[str] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Every resource of an endpoint (or of a ``filter``), page by page (RFC 7644 §3.4.2.4).

        Each resource is yielded once, by ``id``: the ids listed are kept in
        ``seen`` (a set of its own when not given; a caller listing 100,000
        accounts may pass one kept on disk). ``attributes`` asks only for those
        (RFC 7644 §3.4.2.5; ``id`` always comes back). The target's paging is checked,
        not believed:

        - ``count`` answered 400, or 500 before any page with ``count`` was answered: the page
          is asked again without ``count``; when that works, ``quirks.page_count`` is learned
          as False and no ``count`` is sent again;
        - pages that overlap (``startIndex`` counted differently): items already seen are
          skipped; items missed at the start (a target counting from 0) are read again
          with ``startIndex=0`` (which RFC 7644 reads as 1) before giving up;
        - a page holding only items already seen (the target ignores ``startIndex``) ends the listing;
        - ``totalResults`` missing: paging goes on until an empty or repeated page (a short
          page proves nothing: targets cap ``count`` at their own maximum);
        - a listing that ends with fewer resources than ``totalResults`` said, an answer that
          is not a ListResponse with ``Resources`` (when ``totalResults`` is not 0), an item
          without ``id``, or more than ``max_pages`` pages: :class:`InvalidResponse`, never
          a short listing that would read as "absent".
        """
        fields = attributes if isinstance(attributes, str) or attributes is None else ",".join(attributes)
        seen = set() if seen is None else seen
        # Items of the pages that brought something new: a target may list one resource twice
        # in a page and count it twice in totalResults.
        received = 0
        total: int | None = None
        start = 1
        for _ in range(self.max_pages):
            page, page_total = await self._page(endpoint, start, filter, fields, page_size)
            total = page_total if page_total is not None else total
            fresh = _unseen(page, seen)
            received += len(page) if fresh else 0
            for resource in fresh:
                yield resource
            if total is not None and len(seen) >= total:
                return
            if not fresh:
                # An empty page, or only resources already seen: nothing more will come from paging on.
                break
            # A short page proves nothing: a target may return fewer than count (RFC 7644 §3.4.2.4).
            start += len(page)
        else:
            raise InvalidResponse(
                f"GET {self.base_url}/{endpoint}: still paging after {self.max_pages} pages; "
                "the target's paging does not end",
                request=ScimRequest("GET", endpoint).info(self.base_url),
            )
        if total is None or received >= total:
            return
        # Fewer than announced: maybe the target counts startIndex from 0 and skipped the first ones.
        try:
            page, _ = await self._page(endpoint, 0, filter, fields, page_size)
        except ScimError:
            page = []
        fresh = _unseen(page, seen)
        for resource in fresh:
            yield resource
        if received + len(fresh) < total:
            raise InvalidResponse(
                f"GET {self.base_url}/{endpoint}: paging ended after {len(seen)} of the {total} resources "
                "that totalResults announced",
                request=ScimRequest("GET", endpoint).info(self.base_url),
            )

    async def _page(
        self, endpoint: str, start: int, filter: str | None, attributes: str | None, page_size: int
    ) -> tuple[list[dict[str, Any]], int | None]:
        """One page: its resources and its totalResults (None when absent)."""
        params: dict[str, str | int] = {"startIndex": start}
        if filter is not None:
            params["filter"] = filter
        if attributes:
            params["attributes"] = attributes
        counted = self.quirks.page_count
        try:
            result = await self.send(ScimRequest("GET", endpoint, params={**params, "count": page_size} if counted
                                                 else params))  # fmt: skip
        except ScimError as exc:
            # Once a page with count was answered, a 500 is the target's trouble, not count's.
            blamed = (400, 500) if not self._count_answered else (400,)
            if not counted or exc.status not in blamed or exc.scim_type == "invalidFilter":
                raise
            result = await self.send(ScimRequest("GET", endpoint, params=params))
            self.quirks.learn("page_count", False, f"GET /{endpoint} answered {exc.status} with count=, 200 without")
        else:
            self._count_answered = self._count_answered or counted
        return read_list_response(result, ScimRequest("GET", endpoint, params=params).info(self.base_url))

    async def capabilities(self) -> Capabilities:
        """Read ``/ServiceProviderConfig`` (RFC 7643 §5); a target without one gets safe defaults.

        Only "no such endpoint" (404, or 405/501: :class:`Unsupported`) means defaults; another
        4xx also does, with a warning. A target that is down or refuses our credentials raises,
        and so does an answer that is not a ServiceProviderConfig (:class:`InvalidResponse`):
        guessing "no PATCH, no ETags" from an outage or from garbage would silently change
        how every update is sent (PUT, without If-Match).
        """
        try:
            result = await self.send(ScimRequest("GET", "ServiceProviderConfig"))
        except (NotFound, Unsupported):
            return Capabilities()
        except PermanentError as exc:
            log.warning("GET %s/ServiceProviderConfig answered %s; assuming no PATCH and no ETags", self.base_url,
                        exc.status)  # fmt: skip
            return Capabilities()
        body = result.resource
        if not _is_service_provider_config(body):
            raise InvalidResponse(
                f"GET {self.base_url}/ServiceProviderConfig answered {result.status} with something that is "
                "not a ServiceProviderConfig",
                status=result.status,
                request=ScimRequest("GET", "ServiceProviderConfig").info(self.base_url),
            )
        return Capabilities.from_service_provider_config(body)


    async def resource_types(self) -> dict[str, ResourceType]:
        """The target's resource types by endpoint (``"Users"``), from ``/ResourceTypes`` (RFC 7643 §6).

        Each names its core schema and its schema extensions (``(urn, required)``): an
        extension the target does not list is one it may refuse or drop. ``{}`` means
        unknown: the target has no such endpoint (404, 405, 501). A ListResponse, a bare
        array and a single object are all read; anything else is :class:`InvalidResponse`.
        """
        items = await self._discovery("ResourceTypes")
        return {} if items is None else parse_resource_types(items)

    async def schemas(self) -> dict[str, Schema]:
        """The target's schemas by URN, from ``/Schemas`` (RFC 7643 §7), with each attribute's
        ``mutability``, ``returned``, ``caseExact`` and ``uniqueness``.

        ``{}`` means unknown (no such endpoint: 404, 405, 501); shapes as :meth:`resource_types`.
        """
        items = await self._discovery("Schemas")
        return {} if items is None else parse_schemas(items)

    async def _discovery(self, endpoint: str) -> list[dict[str, Any]] | None:
        try:
            result = await self.send(ScimRequest("GET", endpoint, accept_array=True))
        except (NotFound, Unsupported):
            return None
        try:
            return discovery_items(result.resource, endpoint)
        except InvalidResponse as exc:
            exc.status = result.status
            exc.request = ScimRequest("GET", endpoint).info(self.base_url)
            raise


_SERVICE_PROVIDER_CONFIG_SECTIONS = ("patch", "bulk", "filter", "changePassword", "sort", "etag")


def _is_service_provider_config(body: dict[str, Any] | None) -> bool:
    """An object naming its ``schemas``, or at least holding one of RFC 7643 §5's sections as an object."""
    if not isinstance(body, dict):
        return False
    schemas = body.get("schemas")
    if isinstance(schemas, list) and any(isinstance(s, str) and "ServiceProviderConfig" in s for s in schemas):
        return True
    return any(isinstance(body.get(name), dict) for name in _SERVICE_PROVIDER_CONFIG_SECTIONS)


async def _read_capped(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """The body, decoded, and whether it is whole: reading stops past ``limit`` bytes.

    Past the limit only the first ``BODY_CAP`` bytes are kept (for the record), so an
    answer of any size costs at most ``limit`` bytes of memory.
    """
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return b"", False
    body = bytearray()
    async for chunk in response.aiter_bytes():
        if len(body) + len(chunk) > limit:
            return bytes(body[:BODY_CAP]), False
        body += chunk
    return bytes(body), True


class _DirectRoute:
    """Requests built and sent as ``AsyncClient.send`` would, minus what a SCIM call never uses.

    Every request of a client goes to one origin (redirects are followed to the
    same origin only), so the transport httpx would choose for it (the
    connection pool, or a proxy named in the environment) is chosen once, and
    requests go straight to it. Left out: httpx's auth flow (the token is put
    in the headers here), its redirect and event-hook machinery (unused) and
    its cookie jar (a SCIM API authenticates each request, RFC 7644 §2, and a
    cookie set by one answer is not sent back). That is about a third of the
    client's CPU per call.
    """

    __slots__ = ("base", "headers", "timeout", "transport", "urls")

    def __init__(self, transport: httpx.AsyncBaseTransport, base: str, headers: list[tuple[str, str]],
                 timeout: dict[str, float | None]) -> None:  # fmt: skip
        self.transport = transport
        self.base = base
        self.headers = headers
        self.timeout = timeout
        self.urls: dict[str, httpx.URL] = {}

    def request(
        self, method: str, path: str, content: bytes | None, params: Any, headers: dict[str, str]
    ) -> httpx.Request:
        """The request ``AsyncClient.build_request`` builds for ``path`` (relative to the base URL, or absolute)."""
        url = self.urls.get(path)
        if url is None:
            url = httpx.URL(path if path.startswith(("https://", "http://")) else self.base + path.lstrip("/"))
            if "/" not in path:
                # An endpoint (Users, ServiceProviderConfig): parsed once, not once a create.
                self.urls[path] = url
        if params:
            url = url.copy_merge_params(params)
        merged = self.headers
        if headers:
            given = {name.lower() for name in headers}
            merged = [*(h for h in self.headers if h[0].lower() not in given), *headers.items()]
        return httpx.Request(method, url, headers=merged, content=content, extensions={"timeout": self.timeout})

    async def send(self, request: httpx.Request) -> httpx.Response:
        """The answer, its body not read yet."""
        return await self.transport.handle_async_request(request)


class _ClientRoute:
    """Requests built and sent by ``AsyncClient`` itself (an ``httpx.Auth`` flow signs them)."""

    __slots__ = ("http",)

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    def request(
        self, method: str, path: str, content: bytes | None, params: Any, headers: dict[str, str]
    ) -> httpx.Request:
        return self.http.build_request(method, path, content=content, params=params, headers=headers)

    async def send(self, request: httpx.Request) -> httpx.Response:
        """The answer, its body not read yet."""
        return await self.http.send(request, stream=True)


def _direct_route(http: httpx.AsyncClient, base_url: str, auth: object) -> _DirectRoute | None:
    """The direct route for a client whose authentication is a header (none, a bearer token, a token source).

    None for any other ``httpx.Auth`` (its flow may need httpx's client), or an
    httpx without the transport lookup this relies on: then every request goes
    through ``AsyncClient.send``.
    """
    pick = getattr(http, "_transport_for_url", None)
    if pick is None or not (auth is None or isinstance(auth, BearerAuth | TokenSource)):
        return None
    base = base_url.rstrip("/") + "/"
    headers = [(k.decode("ascii"), v.decode("latin-1")) for k, v in http.headers.raw]
    if isinstance(auth, BearerAuth):
        headers.append(("Authorization", auth.header))
    return _DirectRoute(pick(httpx.URL(base)), base, headers, http.timeout.as_dict())


def _unseen(page: list[dict[str, Any]], seen: MutableSet[str]) -> list[dict[str, Any]]:
    """The resources of ``page`` whose id is not in ``seen``, once each; ``seen`` takes their ids."""
    fresh = []
    for resource in page:
        resource_id = str(resource["id"])
        if resource_id not in seen:
            seen.add(resource_id)
            fresh.append(resource)
    return fresh


def _request_info(outgoing: httpx.Request, body: Any) -> RequestInfo:
    """What an error tells of its request (the URL without its query: filters carry personal data)."""
    url = outgoing.url
    return RequestInfo(outgoing.method, str(url.copy_with(query=None) if url.query else url), body)


def _lower_headers(headers: httpx.Headers) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}
