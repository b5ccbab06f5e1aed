"""What every source yields: records and bad records, and the limits one record must keep to."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from provisioner.errors import SourceError

# A cell longer than this is not an HR value (a pasted document, a broken export): its record is rejected.
MAX_CELL_CHARS = 65_536
# A record (all its lines) longer than this is rejected without being parsed into cells.
MAX_RECORD_CHARS = 1_048_576


@dataclass(frozen=True, slots=True)
class IdentityRecord:
    """One person as the source sees them.

    ``origin`` says where, for messages: ``file:line`` (CSV, JSON Lines), the
    database URL and row number ``url:row`` (SQL), the resource's URL (SCIM).
    """

    key: str
    attributes: dict[str, Any]
    origin: str


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A line of the source that is not a usable record; it goes to review, the rest go on.

    ``key`` is empty when the line's key could not be read. ``text`` is what
    was read of the line(s), for telling whether a rejected line has changed.
    """

    key: str
    reason: str
    origin: str
    text: str | None = field(default=None, compare=False, repr=False)


def open_text(path: Path, encoding: str) -> Any:
    """A source file opened for reading as text; SourceError when it cannot be."""
    try:
        return path.open(encoding=encoding, newline="")
    except FileNotFoundError:
        raise SourceError(f"{path}: source file not found") from None
    except OSError as exc:
        raise SourceError(f"{path}: cannot read source: {exc.strerror}") from None


def checked(key_name: str, attributes: dict[str, Any], origin: str) -> IdentityRecord | BadRecord:
    """A record, or a BadRecord when its key is missing or a cell is over MAX_CELL_CHARS."""
    key = attributes.get(key_name)
    if isinstance(key, (dict, list)):
        return BadRecord("", f"the key '{key_name}' is not a single value", origin, record_text(attributes))
    if key is None or str(key).strip() == "":
        return BadRecord("", f"the key '{key_name}' is empty", origin, record_text(attributes))
    key = str(key).strip()
    for column, value in attributes.items():
        if isinstance(value, str) and len(value) > MAX_CELL_CHARS:
            reason = f"column '{column}' holds {len(value)} characters, more than a cell may ({MAX_CELL_CHARS})"
            return BadRecord(key, reason, origin, record_text(attributes))
    return IdentityRecord(key, attributes, origin)


def record_text(attributes: dict[str, Any]) -> str:
    """A record's columns as canonical JSON text (keys sorted): what tells whether a rejected record changed."""
    return orjson.dumps(attributes, option=orjson.OPT_SORT_KEYS).decode()
