"""Errors raised by the SCIM client, grouped by what the engine should do next.

ScimError                  base: status, scim_type, detail, the request that caused it, attempts
├── TransientError         retry later: 429, 5xx, timeouts (per read, or the round trip's deadline),
│   │                      connection errors, a token endpoint down
│   └── InvalidResponse    a success status with a body that is not what was promised: not JSON, over
│                          max_response_bytes, not the SCIM shape asked for (a list without Resources,
│                          a resource without id), a listing short of its totalResults
├── AuthError              401 again after one token refresh, or the token endpoint refused us: alert
└── PermanentError         other 4xx, a redirect off the target's origin: retries are useless, to review
    ├── NotFound           404: the resource is not (or no longer) in the target
    ├── Conflict           409: uniqueness clash, e.g. the userName already exists
    ├── PreconditionFailed 412: the ETag sent in If-Match is stale
    └── Unsupported        501, 405: the target does not support this form of request; use another

``ScimClient.send`` raises a TransientError only once its RetryPolicy gives up
(``attempts`` says after how many tries), or at once for a 5xx that retrying
does not help (505…). A 501 Not Implemented or 405 Method Not Allowed (RFC 9110
§15.6.2, §15.5.6) is an Unsupported error, never retried: the same request will
be refused the same way until the caller sends another form (PATCH instead of
PUT, a member value list instead of a ``members[value eq …]`` path). A 401 is
retried once after a token refresh, never more: no storm. A redirect is
followed only to the same scheme, host and port.

The original exception (httpx's, Authlib's, or a JSON decode error) is kept as
``__cause__``. No error carries a header, a token or a client secret.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Response bodies kept on an error are capped: a target may answer with megabytes of HTML.
BODY_CAP = 2_000


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What was sent, with secrets already removed (headers are never kept)."""

    method: str
    url: str
    body: Any = None


@dataclass(slots=True)
class ScimError(Exception):
    """A SCIM call that did not succeed."""

    message: str
    status: int | None = None
    scim_type: str | None = None
    detail: str | None = None
    request: RequestInfo | None = None
    response_body: str | None = None
    retry_after: float | None = field(default=None)
    # How many times the client sent the request before giving up (retries and a token refresh included).
    attempts: int = 1

    def __post_init__(self) -> None:
        Exception.__init__(self, self.message)
        if self.response_body is not None:
            self.response_body = self.response_body[:BODY_CAP]

    def __str__(self) -> str:
        parts = [self.message]
        if self.scim_type:
            parts.append(f"scimType={self.scim_type}")
        if self.detail and self.detail not in self.message:
            parts.append(f"detail={self.detail}")
        return "; ".join(parts)


class TransientError(ScimError):
    """Retry later: the target is busy, down or unreachable."""

    @property
    def ambiguous(self) -> bool:
        """Whether the request may have been applied all the same (no answer, or a garbled one)."""
        return self.status is None or isinstance(self, InvalidResponse)


class InvalidResponse(TransientError):
    """The target answered a success status with a body we cannot read or cannot believe; never data."""


class AuthError(ScimError):
    """The target refused our credentials."""


class PermanentError(ScimError):
    """Retrying the same request will fail the same way."""


class NotFound(PermanentError):
    """The resource does not exist in the target."""


class Conflict(PermanentError):
    """The target already holds a resource with a unique value we sent."""


class PreconditionFailed(PermanentError):
    """The version we sent in If-Match is no longer current."""


class Unsupported(PermanentError):
    """The target does not implement this form of request (501) or method on this path (405)."""


_BY_STATUS: dict[int, type[ScimError]] = {
    401: AuthError,
    404: NotFound,
    409: Conflict,
    405: Unsupported,
    412: PreconditionFailed,
    429: TransientError,
    501: Unsupported,
}


def error_class_for(status: int) -> type[ScimError]:
    """The error class for an HTTP status that is not a success."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if status >= 500:
        return TransientError
    return PermanentError
