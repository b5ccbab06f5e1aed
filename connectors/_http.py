"""HTTP settings shared by the SCIM client and the token source: timeouts, TLS, URL checks."""

from __future__ import annotations

import logging
import os
import ssl
from typing import TypeAlias

import httpx

log = logging.getLogger("connectors")

# Timeouts are always set: a target that hangs must not hang a cycle.
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)

# True (the system's CAs), a CA bundle file or directory, a ready SSLContext, or False (loudly).
Verify: TypeAlias = bool | str | os.PathLike[str] | ssl.SSLContext

_DEFAULT_PORTS = {"http": 80, "https": 443}


def round_trip_deadline(timeout: httpx.Timeout | float | None) -> float | None:
    """Seconds one whole round trip may take: the longest part of ``timeout``.

    httpx's timeouts bound each connect, write and read; a peer sending one byte
    just within the read timeout, again and again, never trips them.
    """
    if not isinstance(timeout, httpx.Timeout):
        return timeout
    parts = [t for t in (timeout.connect, timeout.read, timeout.write, timeout.pool) if t is not None]
    return max(parts) if parts else None


def tls_verify(verify: Verify, *, url: str) -> bool | ssl.SSLContext:
    """What httpx needs for ``verify``: a CA bundle path becomes an SSLContext (httpx 0.28 wants one)."""
    if verify is True or isinstance(verify, ssl.SSLContext):
        return verify
    if verify is False:
        # Never silently: this is said every time a client is built for the URL.
        log.warning("TLS certificate verification is disabled for %s", url)
        return False
    path = os.fspath(verify)
    if os.path.isdir(path):
        return ssl.create_default_context(capath=path)
    if not os.path.isfile(path):
        raise ValueError(f"CA bundle {path!r} (verify= for {url}) does not exist")
    return ssl.create_default_context(cafile=path)


def require_secure_url(url: str, *, allow_insecure_http: bool, what: str) -> None:
    """Refuse anything but https://, and http:// unless the caller opted in."""
    scheme = httpx.URL(url).scheme
    if scheme == "https":
        return
    if scheme == "http":
        if allow_insecure_http:
            return
        raise ValueError(
            f"refusing the insecure {what} {url!r}: credentials would travel in clear text; "
            "use https://, or pass allow_insecure_http=True (e.g. for a local demo server)"
        )
    raise ValueError(f"the {what} {url!r} is not an http:// or https:// URL")


def same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    """Same scheme, host and port (RFC 6454), the default port spelled or not."""
    return (
        a.scheme == b.scheme
        and a.host == b.host
        and (a.port or _DEFAULT_PORTS.get(a.scheme)) == (b.port or _DEFAULT_PORTS.get(b.scheme))
    )
