"""The masking registry: secret values known to this process, and their removal from any text we record.

Every secret joins the registry the moment it is read or fetched: config
secrets (``config.py``), OAuth 2.0 access tokens as the token endpoint hands
them out (``targets.py``), ``writeOnly`` attribute values such as ``password``
as the mapping renders them (``executor.py``). ``redact`` is applied at every
sink: log lines, queue rows and their calls, ``target_state``, ``alert_state``,
alert bodies, CLI output and tracebacks.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

MASK = "***"
_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None
# The same secrets as a tuple, replaced whole (never changed in place) so that readers need no lock.
_forms: tuple[str, ...] = ()
# Up to this many known forms, substring tests find "no secret here" faster than the pattern does.
_FEW = 16
_lock = threading.Lock()

# Very short values would mask ordinary words; a 3-character "secret" is not one anyway.
MIN_LENGTH = 4

# Header-like credentials are masked even when we never saw the value (a target echoing a token).
_CREDENTIAL = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")


def register(secret: str) -> None:
    """Remember a secret so that it is masked wherever it would be written.

    A secret is also known in the forms it takes when written down: each of its
    lines (a multi-line secret printed or logged line by line) and its JSON
    string escape (a secret with a newline or a quote inside a JSON body).
    """
    global _pattern, _forms
    if not isinstance(secret, str):
        return
    forms = {secret, secret.strip(), json.dumps(secret)[1:-1]}
    forms.update(line.strip() for line in secret.splitlines())
    new = {form for form in forms if len(form) >= MIN_LENGTH and form not in _secrets}
    if not new:
        return
    with _lock:
        _secrets.update(new)
        _pattern = re.compile("|".join(re.escape(s) for s in sorted(_secrets, key=len, reverse=True)))
        _forms = tuple(_secrets)


def is_registered(secret: str) -> bool:
    """Whether this exact value is masked (for tests and diagnostics)."""
    return secret in _secrets


def redact(text: str) -> str:
    """The text with every known secret and bearer credential masked."""
    pattern, forms = _pattern, _forms
    if pattern is not None and (len(forms) > _FEW or any(form in text for form in forms)):
        text = pattern.sub(MASK, text)
    # Most texts name no credential scheme: a lower-cased copy says so faster than the pattern. Only for
    # ASCII text, where lower() folds case as the pattern does (it also matches "ſ" for "s", "ı" for "i").
    if text.isascii():
        lowered = text.lower()
        if "bearer" not in lowered and "basic" not in lowered:
            return text
    return _CREDENTIAL.sub(lambda m: f"{m.group(1)} {MASK}", text)


def redact_optional(text: str | None) -> str | None:
    """``redact`` that passes None through (nullable columns)."""
    return None if text is None else redact(text)


def redact_value(value: Any) -> Any:
    """Redact strings inside nested dicts and lists, leaving other values as they are."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(v) for v in value]
    return value


# Attributes whose values are secrets in any payload: RFC 7643 §4.1.1 defines ``password`` as
# mutability "writeOnly", returned "never"; a target must not echo it and we must not keep it.
WRITE_ONLY = frozenset({"password"})


def register_write_only(payload: Any) -> None:
    """Register the values of write-only attributes found anywhere in a payload."""
    if isinstance(payload, dict):
        for key, value in payload.items():
            if key in WRITE_ONLY and isinstance(value, str):
                register(value)
            else:
                register_write_only(value)
    elif isinstance(payload, list):
        for item in payload:
            register_write_only(item)


def mask_write_only(payload: Any) -> Any:
    """A copy of a payload with the values of write-only attributes replaced by ``MASK``."""
    if isinstance(payload, dict):
        return {k: MASK if k in WRITE_ONLY and v is not None else mask_write_only(v) for k, v in payload.items()}
    if isinstance(payload, list):
        return [mask_write_only(v) for v in payload]
    return payload


def has_write_only(payload: Any) -> bool:
    """Whether a payload carries a write-only attribute at its top level (where SCIM puts ``password``)."""
    return isinstance(payload, dict) and any(k in WRITE_ONLY and payload[k] is not None for k in payload)


def names_write_only(text: str) -> bool:
    """Whether a payload's compact JSON text may hold a write-only attribute: most do not, and are not walked.

    A name is looked for as a key (``"password":``, as ``payload.dumps`` writes
    it); a false alarm costs a walk that masks nothing.
    """
    return any(f'"{name}":' in text for name in WRITE_ONLY)
