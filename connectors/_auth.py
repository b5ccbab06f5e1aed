"""Authentication for SCIM targets: a static bearer token, or OAuth 2.0 client credentials.

:class:`BearerAuth` is a plain httpx auth flow. A :class:`TokenSource` (such as
:class:`OAuth2ClientCredentials`) is asked by the client for a token before
each attempt and told when the target refused one, so that a 401 is answered by
one refresh, and one token request serves every worker of a target.

This is the one module that imports Authlib's httpx integration.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import warnings
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import httpx

# Imported first on purpose: this module installs Authlib's own "always show" filter for its
# deprecation warnings at import time, and that filter must stay in place after the block below.
from authlib.deprecate import AuthlibDeprecationWarning

from connectors._errors import BODY_CAP, AuthError, InvalidResponse, RequestInfo, ScimError, TransientError
from connectors._http import DEFAULT_TIMEOUT, Verify, require_secure_url, round_trip_deadline, tls_verify
from connectors._limiter import TargetLimiter
from connectors._protocol import parse_retry_after

with warnings.catch_warnings():
    # Authlib >= 1.7 prefers the `httpx2` fork and, when only `httpx` is installed, warns at import:
    # "The httpx module is deprecated; please use httpx2 instead." We keep httpx deliberately (the
    # project pins it; respx mocks only httpx), so exactly that notice is ignored, for this import
    # only. Every other warning, Authlib's included, is still shown.
    warnings.filterwarnings("ignore", message="The httpx module is deprecated", category=AuthlibDeprecationWarning)
    from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError

AuthMethod = Literal["client_secret_basic", "client_secret_post"]
AUTH_METHODS: tuple[AuthMethod, ...] = ("client_secret_basic", "client_secret_post")


class BearerAuth(httpx.Auth):
    """A static bearer token (RFC 6750). The token never appears in ``repr``."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("bearer token is empty")
        self._header = f"Bearer {token}"

    def __repr__(self) -> str:
        return "BearerAuth(token=***)"

    @property
    def header(self) -> str:
        """The ``Authorization`` header's value (a secret: never logged)."""
        return self._header

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        yield request


@runtime_checkable
class TokenSource(Protocol):
    """Bearer tokens that can be renewed: shared by every client of a target."""

    async def token(self) -> str:
        """A token that is valid now (fetched, or from the cache)."""
        ...

    async def refresh(self, rejected: str) -> str:
        """A new token, because the target answered 401 to ``rejected``."""
        ...


@dataclass(frozen=True, slots=True)
class _Token:
    value: str = ""
    # Clock reading after which the token is renewed before use; None: until the target refuses it.
    renew_at: float | None = None

    def __repr__(self) -> str:
        return f"_Token(value=***, renew_at={self.renew_at})"

    def fresh(self, now: float) -> bool:
        return self.renew_at is None or now < self.renew_at


class OAuth2ClientCredentials:
    """OAuth 2.0 client credentials (RFC 6749 §4.4), fetched with Authlib's httpx client.

    One instance per target, shared by all its clients: the token is cached,
    renewed ``leeway`` seconds before ``expires_in`` runs out (at the latest
    halfway through its life) and when the target answers 401, and only one
    token request is ever in flight, however many requests wait for it. Token
    requests go through the target's ``limiter`` like every other request.
    The client secret never appears in ``repr``, ``str`` or errors. Like the
    limiter, an instance belongs to one event loop; close it with ``aclose``.
    """

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        *,
        scope: str | Sequence[str] | None = None,
        audience: str | None = None,
        auth_method: AuthMethod = "client_secret_basic",
        leeway: float = 60.0,
        limiter: TargetLimiter | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        verify: Verify = True,
        transport: httpx.AsyncBaseTransport | None = None,
        allow_insecure_http: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        require_secure_url(token_url, allow_insecure_http=allow_insecure_http, what="token URL")
        if auth_method not in AUTH_METHODS:
            raise ValueError(f"auth_method must be one of {', '.join(AUTH_METHODS)}, not {auth_method!r}")
        if not client_id:
            raise ValueError("OAuth 2.0 client_id is empty")
        if not client_secret:
            raise ValueError(f"OAuth 2.0 client_secret for client {client_id!r} is empty")
        if leeway < 0:
            raise ValueError(f"leeway must not be negative, not {leeway}")
        self.token_url = token_url
        self.client_id = client_id
        self.scope = scope if scope is None or isinstance(scope, str) else " ".join(scope)
        self.audience = audience
        self.auth_method = auth_method
        self.leeway = leeway
        self.limiter = limiter
        self._clock = clock
        self._secret = client_secret
        self._oauth = AsyncOAuth2Client(
            client_id=client_id,
            client_secret=client_secret,
            token_endpoint_auth_method=auth_method,
            scope=self.scope,
            timeout=timeout,
            verify=tls_verify(verify, url=token_url),
            transport=transport,
            # A token endpoint that redirects is misconfigured: the secret is not sent after it.
            follow_redirects=False,
        )
        self._oauth.register_compliance_hook("access_token_response", self._keep_response)
        self._response: httpx.Response | None = None
        self._token: _Token | None = None
        # One token request at a time; everyone else waits for its result.
        self._lock = asyncio.Lock()
        # httpx's timeouts bound each read; this bounds the whole token request.
        self._deadline = round_trip_deadline(timeout)

    def __repr__(self) -> str:
        return (
            f"OAuth2ClientCredentials(token_url={self.token_url!r}, client_id={self.client_id!r}, "
            f"client_secret=***, auth_method={self.auth_method!r}, scope={self.scope!r}, audience={self.audience!r})"
        )

    async def __aenter__(self) -> OAuth2ClientCredentials:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the token endpoint's connection pool."""
        await self._oauth.aclose()

    async def token(self) -> str:
        """The cached token while it is fresh; else one token request, shared by every caller waiting."""
        current = self._token
        if current is not None and current.fresh(self._clock()):
            return current.value
        async with self._lock:
            current = self._token
            if current is None or not current.fresh(self._clock()):
                self._token = None
                current = self._token = await self._fetch()
            return current.value

    async def refresh(self, rejected: str) -> str:
        """A new token after a 401; callers refused the same token share one token request."""
        async with self._lock:
            current = self._token
            if current is None or current.value == rejected or not current.fresh(self._clock()):
                self._token = None
                current = self._token = await self._fetch()
            return current.value

    def _keep_response(self, response: httpx.Response) -> httpx.Response:
        self._response = response
        return response

    async def _fetch(self) -> _Token:
        info = RequestInfo("POST", self.token_url)
        extra: dict[str, Any] = {"audience": self.audience} if self.audience else {}
        self._response = None
        limit = self.limiter.slot() if self.limiter is not None else contextlib.nullcontext()
        try:
            async with limit, asyncio.timeout(self._deadline):
                body = await self._oauth.fetch_token(self.token_url, grant_type="client_credentials", **extra)
        except OAuthError as exc:
            # Not chained: Authlib's error repeats the server's description, which may echo the secret;
            # everything it says (error, description, status, body) is on ours, redacted.
            raise self._refused(info, self._response, exc.error, exc.description) from None
        except httpx.HTTPStatusError as exc:
            raise self._refused(info, exc.response, None, None) from exc
        except (httpx.TimeoutException, TimeoutError) as exc:
            message = f"POST {self.token_url}: token request timed out ({type(exc).__name__})"
            raise TransientError(message, request=info) from exc
        except httpx.TransportError as exc:
            message = self._redact(f"POST {self.token_url}: token request failed: {type(exc).__name__}: {exc}")
            raise TransientError(message, request=info) from exc
        except ValueError as exc:
            raise self._invalid(info, "a body that is not a usable token response") from exc
        if self._response is not None and not self._response.is_success:
            # A JSON body without "error" on a failure status, e.g. a gateway's 429.
            raise self._refused(info, self._response, None, None)
        access_token = body.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise self._invalid(info, "no access_token")
        token_type = str(body.get("token_type") or "Bearer")
        if token_type.lower() != "bearer":
            raise AuthError(f"POST {self.token_url}: token_type {token_type!r} is not Bearer", request=info)
        return _Token(access_token, self._renew_at(body.get("expires_in")))

    def _renew_at(self, expires_in: object) -> float | None:
        try:
            lifetime = float(expires_in)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
        # Renew `leeway` early, but never spend less than half a short-lived token's life.
        return self._clock() + max(lifetime - self.leeway, lifetime / 2)

    def _refused(
        self, info: RequestInfo, response: httpx.Response | None, error: str | None, description: str | None
    ) -> ScimError:
        status = response.status_code if response is not None else None
        retry_after = parse_retry_after(response.headers.get("retry-after")) if response is not None else None
        # Busy or down: retry later. Anything else (invalid_client, invalid_scope…): the credentials.
        cls = TransientError if status is not None and (status == 429 or status >= 500) else AuthError
        if error is None:
            reason = f"HTTP {status}"
        else:
            reason = f"{error} ({description})" if description else error
        return cls(
            self._redact(f"POST {self.token_url}: token request for client {self.client_id!r} refused: {reason}"),
            status=status,
            scim_type=None,
            detail=self._redact(description) if description else None,
            request=info,
            response_body=self._body(response),
            retry_after=retry_after,
        )

    def _invalid(self, info: RequestInfo, what: str) -> InvalidResponse:
        response = self._response
        return InvalidResponse(
            f"POST {self.token_url}: token response with {what}",
            status=response.status_code if response is not None else None,
            request=info,
            response_body=self._body(response),
        )

    def _body(self, response: httpx.Response | None) -> str | None:
        return self._redact(response.text[:BODY_CAP]) if response is not None and response.content else None

    def _redact(self, text: str) -> str:
        """A server may echo what it was sent: the secret is cut out of anything we keep."""
        return text.replace(self._secret, "***")
