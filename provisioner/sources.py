"""Identity sources: records streamed from a CSV or JSON Lines file, one at a time."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from provisioner.config import SourceConfig
from provisioner.errors import SourceError


@dataclass(frozen=True, slots=True)
class IdentityRecord:
    """One person as the source sees them; ``origin`` is ``file:line`` for error messages."""

    key: str
    attributes: dict[str, Any]
    origin: str


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A line of the source that is not a usable record; it goes to review, the rest go on."""

    key: str
    reason: str
    origin: str


def read_source(config: SourceConfig) -> Iterator[IdentityRecord | BadRecord]:
    """Stream a source's records; a file that cannot be opened raises SourceError."""
    if config.type == "csv":
        return _read_csv(config)
    return _read_jsonl(config)


def source_columns(config: SourceConfig) -> set[str] | None:
    """The columns a CSV source declares in its header (None for sources without a header)."""
    if config.type != "csv":
        return None
    with _open(config.path, config.encoding) as handle:
        try:
            header = next(csv.reader(handle, delimiter=config.delimiter), [])
        except (csv.Error, UnicodeDecodeError) as exc:
            raise SourceError(f"{config.path}:1: cannot parse the header as {config.encoding} CSV: {exc}") from None
    return {name.strip() for name in header}


def _open(path: Path, encoding: str) -> Any:
    try:
        return path.open(encoding=encoding, newline="")
    except FileNotFoundError:
        raise SourceError(f"{path}: source file not found") from None
    except OSError as exc:
        raise SourceError(f"{path}: cannot read source: {exc.strerror}") from None


def _read_csv(config: SourceConfig) -> Iterator[IdentityRecord | BadRecord]:
    with _open(config.path, config.encoding) as handle:
        reader = csv.DictReader(handle, delimiter=config.delimiter)
        try:
            if reader.fieldnames is None:
                return
            reader.fieldnames = [name.strip() for name in reader.fieldnames]
            if config.key not in reader.fieldnames:
                raise SourceError(f"{config.path}:1: the key column '{config.key}' is not in the header")
            for row in reader:
                origin = f"{config.path}:{reader.line_num}"
                if None in row:
                    yield BadRecord(row.get(config.key) or "", "more fields than the header has", origin)
                elif None in row.values():
                    # A row cut short (a truncated export): missing columns must not read as empty values.
                    yield BadRecord(row.get(config.key) or "", "fewer fields than the header has", origin)
                else:
                    yield _record(config.key, row, origin)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise SourceError(f"{config.path}:{reader.line_num}: cannot parse as {config.encoding} CSV: {exc}") from None


def _read_jsonl(config: SourceConfig) -> Iterator[IdentityRecord | BadRecord]:
    with _open(config.path, config.encoding) as handle:
        try:
            yield from _jsonl_records(config, handle)
        except UnicodeDecodeError as exc:
            raise SourceError(f"{config.path}: cannot read as {config.encoding}: {exc}") from None


def _jsonl_records(config: SourceConfig, handle: Any) -> Iterator[IdentityRecord | BadRecord]:
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        origin = f"{config.path}:{number}"
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            yield BadRecord("", f"not valid JSON: {exc}", origin)
            continue
        if not isinstance(data, dict):
            yield BadRecord("", "a line must hold a JSON object", origin)
            continue
        yield _record(config.key, data, origin)


def _record(key_name: str, attributes: dict[str, Any], origin: str) -> IdentityRecord | BadRecord:
    key = attributes.get(key_name)
    if key is None or str(key).strip() == "":
        return BadRecord("", f"the key '{key_name}' is empty", origin)
    return IdentityRecord(str(key).strip(), attributes, origin)
