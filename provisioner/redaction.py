"""Secret values known to this process, and their removal from any text we record."""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None

# Header-like credentials are masked even when we never saw the value (a target echoing a token).
_CREDENTIAL = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")


def register(secret: str) -> None:
    """Remember a secret so that it is masked wherever it would be written."""
    global _pattern
    # Very short values would mask ordinary words; a 3-character "secret" is not one anyway.
    if len(secret) >= 4 and secret not in _secrets:
        _secrets.add(secret)
        _pattern = re.compile("|".join(re.escape(s) for s in sorted(_secrets, key=len, reverse=True)))


def redact(text: str) -> str:
    """The text with every known secret and bearer credential masked."""
    if _pattern is not None:
        text = _pattern.sub(MASK, text)
    return _CREDENTIAL.sub(lambda m: f"{m.group(1)} {MASK}", text)


def redact_value(value: Any) -> Any:
    """Redact strings inside nested dicts and lists, leaving other values as they are."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(v) for v in value]
    return value
