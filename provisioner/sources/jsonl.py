"""JSON Lines sources: one JSON object per line, streamed; a line over MAX_RECORD_CHARS is skipped unread."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from provisioner.config import SourceConfig
from provisioner.errors import SourceError
from provisioner.sources._records import MAX_RECORD_CHARS, BadRecord, IdentityRecord, checked, open_text


def read_jsonl(config: SourceConfig) -> Iterator[IdentityRecord | BadRecord]:
    """Stream a JSON Lines file's objects as records; SourceError when the file cannot be read."""
    with open_text(config.path, config.encoding) as handle:
        try:
            yield from _jsonl_records(config, handle)
        except UnicodeDecodeError as exc:
            raise SourceError(f"{config.path}: cannot read as {config.encoding}: {exc}") from None


def _jsonl_records(config: SourceConfig, handle: Any) -> Iterator[IdentityRecord | BadRecord]:
    number = 0
    while line := handle.readline(MAX_RECORD_CHARS + 1):
        number += 1
        origin = f"{config.path}:{number}"
        if len(line) > MAX_RECORD_CHARS and not line.endswith(("\n", "\r")):
            while (rest := handle.readline(MAX_RECORD_CHARS)) and not rest.endswith(("\n", "\r")):
                pass
            yield BadRecord("", f"the line holds more than {MAX_RECORD_CHARS} characters", origin)
            continue
        if not line.strip():
            continue
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            yield BadRecord("", f"not valid JSON: {exc}", origin, line)
            continue
        if not isinstance(data, dict):
            yield BadRecord("", "a line must hold a JSON object", origin, line)
            continue
        yield checked(config.key, data, origin)
