"""What may travel over plain http://: loopback only, unless a config names the host.

Credentials sent over http:// can be read by anyone on the path. A target or
a webhook on 127.0.0.1 (a local test server, a sidecar) never leaves the
machine, so ``allow_insecure_http: true`` allows exactly those; any other
host must be named.
"""

from __future__ import annotations

import ipaddress
import re

_HOST = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://(?:[^@/]*@)?(\[[^\]]*\]|[^:/?#]*)")


def is_loopback(host: str) -> bool:
    """Whether a host name or address never leaves this machine (127.0.0.0/8, ::1, localhost)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_host(url: str) -> str | None:
    """The host of a URL (brackets of an IPv6 literal removed), or None when it has none."""
    match = _HOST.match(url.strip())
    return match.group(1).strip("[]").lower() if match and match.group(1) else None


def is_clear_text(url: str) -> bool:
    """Whether a URL is plain http://."""
    return url.strip().lower().startswith("http://")
