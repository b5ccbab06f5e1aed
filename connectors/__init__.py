"""The target side of provisioner: a generic SCIM 2.0 client, its auth, politeness and errors.

This package never imports from ``provisioner``.
"""

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
