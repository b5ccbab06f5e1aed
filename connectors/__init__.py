"""The target side of provisioner: a generic SCIM 2.0 client, its auth and its errors.

This package never imports from ``provisioner``.
"""

from connectors._auth import BearerAuth
from connectors._client import DEFAULT_TIMEOUT, Capabilities, Exchange, ScimClient
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
)
from connectors._protocol import (
    SCHEMA_PATCH_OP,
    ScimRequest,
    ScimResult,
    equals_filter,
    parse_retry_after,
    quote_filter_value,
)

__all__ = [
    "AuthError",
    "BearerAuth",
    "Capabilities",
    "Conflict",
    "DEFAULT_TIMEOUT",
    "Exchange",
    "InvalidResponse",
    "NotFound",
    "PermanentError",
    "PreconditionFailed",
    "RequestInfo",
    "SCHEMA_PATCH_OP",
    "ScimClient",
    "ScimError",
    "ScimRequest",
    "ScimResult",
    "TransientError",
    "equals_filter",
    "parse_retry_after",
    "quote_filter_value",
]
