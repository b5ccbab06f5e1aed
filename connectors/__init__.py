"""The target side of provisioner: a generic SCIM 2.0 client, its auth, politeness and errors.

This package never imports from ``provisioner``. Its public names are imported on first use
(PEP 562): a caller that needs only the errors or the schema types does not load httpx and
authlib with them.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from connectors._auth import BearerAuth, OAuth2ClientCredentials, TokenSource
    from connectors._client import Capabilities, Exchange, ScimClient
    from connectors._discovery import AttributeInfo, ResourceType, Schema
    from connectors._errors import (
        AuthError,
        Conflict,
        InvalidResponse,
        NotFound,
        PermanentError,
        PreconditionFailed,
        RequestInfo,
        ScimError,
        TransientError,
        Unsupported,
    )
    from connectors._http import DEFAULT_TIMEOUT
    from connectors._limiter import RateLimit, TargetLimiter
    from connectors._protocol import (
        SCHEMA_PATCH_OP,
        ScimRequest,
        ScimResult,
        equals_filter,
        parse_retry_after,
        quote_filter_value,
        resource_matches,
    )
    from connectors._quirks import Quirks
    from connectors._retry import RetryPolicy

# Each public name and the module that defines it.
_HOMES = {
    "AttributeInfo": "connectors._discovery",
    "AuthError": "connectors._errors",
    "BearerAuth": "connectors._auth",
    "Capabilities": "connectors._client",
    "Conflict": "connectors._errors",
    "DEFAULT_TIMEOUT": "connectors._http",
    "Exchange": "connectors._client",
    "InvalidResponse": "connectors._errors",
    "NotFound": "connectors._errors",
    "OAuth2ClientCredentials": "connectors._auth",
    "PermanentError": "connectors._errors",
    "PreconditionFailed": "connectors._errors",
    "Quirks": "connectors._quirks",
    "RateLimit": "connectors._limiter",
    "RequestInfo": "connectors._errors",
    "ResourceType": "connectors._discovery",
    "RetryPolicy": "connectors._retry",
    "SCHEMA_PATCH_OP": "connectors._protocol",
    "Schema": "connectors._discovery",
    "ScimClient": "connectors._client",
    "ScimError": "connectors._errors",
    "ScimRequest": "connectors._protocol",
    "ScimResult": "connectors._protocol",
    "TargetLimiter": "connectors._limiter",
    "TokenSource": "connectors._auth",
    "TransientError": "connectors._errors",
    "Unsupported": "connectors._errors",
    "equals_filter": "connectors._protocol",
    "parse_retry_after": "connectors._protocol",
    "quote_filter_value": "connectors._protocol",
    "resource_matches": "connectors._protocol",
}

__all__ = [
    "AttributeInfo",
    "AuthError",
    "BearerAuth",
    "Capabilities",
    "Conflict",
    "DEFAULT_TIMEOUT",
    "Exchange",
    "InvalidResponse",
    "NotFound",
    "OAuth2ClientCredentials",
    "PermanentError",
    "PreconditionFailed",
    "Quirks",
    "RateLimit",
    "RequestInfo",
    "ResourceType",
    "RetryPolicy",
    "SCHEMA_PATCH_OP",
    "Schema",
    "ScimClient",
    "ScimError",
    "ScimRequest",
    "ScimResult",
    "TargetLimiter",
    "TokenSource",
    "TransientError",
    "Unsupported",
    "equals_filter",
    "parse_retry_after",
    "quote_filter_value",
    "resource_matches",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        # Not a public name: a submodule (`from connectors import _client`) is then imported as usual.
        raise AttributeError(f"module 'connectors' has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value  # the next look-up is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
