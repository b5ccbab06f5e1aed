"""CSV sources: rows streamed one at a time, each line read in bounded pieces.

Anything wrong with one row — too many or too few fields, a cell over
:data:`MAX_CELL_CHARS`, a record over :data:`MAX_RECORD_CHARS`, a missing key —
is a :class:`BadRecord` naming its line (and its key when it can be read): that
record goes to review, the others go on. Lines are read in pieces of at most
:data:`MAX_RECORD_CHARS` characters, so a 100 MB line costs no more memory than
a short one. A file that cannot be opened or decoded raises SourceError.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from typing import Any

from provisioner.config import SourceConfig
from provisioner.errors import SourceError
from provisioner.sources._records import MAX_RECORD_CHARS, BadRecord, IdentityRecord, checked, open_text

# The csv module refuses fields over its own limit (131,072 by default) with csv.Error;
# we never raise that process-wide limit: a field over it is a bad record like any other.
_CSV_PREFIX_CHARS = 100_000


def read_csv(config: SourceConfig) -> Iterator[IdentityRecord | BadRecord]:
    """Stream a CSV file's rows as records, header first; SourceError when the file cannot be read."""
    with open_text(config.path, config.encoding) as handle:
        lines = _Lines(handle)
        reader = csv.reader(lines, delimiter=config.delimiter)
        try:
            yield from _csv_records(config, lines, reader)
        except UnicodeDecodeError as exc:
            raise SourceError(f"{config.path}:{lines.number}: cannot parse as {config.encoding} CSV: {exc}") from None


def csv_columns(config: SourceConfig) -> set[str]:
    """The columns a CSV file declares in its header (empty for an empty file)."""
    with open_text(config.path, config.encoding) as handle:
        try:
            header = next(csv.reader(handle, delimiter=config.delimiter), [])
        except (csv.Error, UnicodeDecodeError) as exc:
            raise SourceError(f"{config.path}:1: cannot parse the header as {config.encoding} CSV: {exc}") from None
    return {name.strip() for name in header}


def _csv_records(config: SourceConfig, lines: _Lines, reader: Any) -> Iterator[IdentityRecord | BadRecord]:
    try:
        header = next(reader, None)
    except (csv.Error, _Oversized) as exc:
        raise SourceError(f"{config.path}:1: cannot parse the header as CSV: {exc}") from None
    if header is None:
        return
    names = [name.strip() for name in header]
    if config.key not in names:
        raise SourceError(f"{config.path}:1: the key column '{config.key}' is not in the header")
    key_index = names.index(config.key)
    while True:
        lines.start_record()
        try:
            row = next(reader, None)
        except (csv.Error, _Oversized) as exc:
            start, prefix = lines.finish_bad_record(config.delimiter)
            key = _key_of_prefix(prefix, key_index, config.delimiter)
            reason = str(exc) if isinstance(exc, _Oversized) else f"cannot parse as CSV: {exc}"
            yield BadRecord(key, reason, f"{config.path}:{start}", prefix[:_CSV_PREFIX_CHARS])
            continue
        if row is None:
            return
        if not row:
            continue  # a blank line
        origin = f"{config.path}:{lines.number}"
        key = row[key_index].strip() if key_index < len(row) else ""
        if len(row) > len(names):
            yield BadRecord(key, "more fields than the header has", origin, "\x1f".join(row))
        elif len(row) < len(names):
            # A row cut short (a truncated export): missing columns must not read as empty values.
            yield BadRecord(key, "fewer fields than the header has", origin, "\x1f".join(row))
        else:
            yield checked(config.key, dict(zip(names, row)), origin)


class _Oversized(Exception):
    """A record longer than MAX_RECORD_CHARS: raised through the csv reader, which resets on its next row."""


class _Lines:
    """A text file's lines for csv.reader, each read in bounded pieces, counted, with the current record kept.

    The csv reader pulls lines one at a time and may pull several for one
    record (a quoted cell with line breaks). What it pulled since the record
    started is kept (at most MAX_RECORD_CHARS characters), so that a record
    that fails to parse can be skipped to its real end and its key read.
    """

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.number = 0
        self.start = 1
        self.pieces: list[str] = []
        self.size = 0
        # Set when the current physical line was cut at MAX_RECORD_CHARS and its rest is still unread.
        self.cut = False
        # The part of the last line read that made the record too long (scanned, not kept).
        self.tail = ""

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self.handle.readline(MAX_RECORD_CHARS + 1)
        if not line:
            raise StopIteration
        self.number += 1
        self.cut = len(line) > MAX_RECORD_CHARS and not line.endswith(("\n", "\r"))
        self.size += len(line)
        if self.size <= MAX_RECORD_CHARS:
            self.pieces.append(line)
        else:
            keep = max(0, MAX_RECORD_CHARS - self.size + len(line))
            self.pieces.append(line[:keep])
            self.tail = line[keep:]
        if self.cut or self.size > MAX_RECORD_CHARS:
            raise _Oversized(f"the record holds more than {MAX_RECORD_CHARS} characters")
        return line

    def start_record(self) -> None:
        self.start = self.number + 1
        self.pieces.clear()
        self.size = 0
        self.tail = ""

    def finish_bad_record(self, delimiter: str) -> tuple[int, str]:
        """Skip the rest of a record the csv reader gave up on; return its first line and its start.

        The reader drops the rest of the physical line it failed on and starts
        afresh at the next one, so a quoted cell that goes on over more lines
        would be read as new records: scan the record as csv does and read on
        to its real end.
        """
        start, prefix = self.start, "".join(self.pieces)
        state = _scan(self.tail, _scan(prefix, _START, delimiter), delimiter)
        if self.cut:  # the rest of an over-long physical line, in pieces
            while True:
                piece = self.handle.readline(MAX_RECORD_CHARS)
                state = _scan(piece, state, delimiter)
                if not piece or piece.endswith(("\n", "\r")):
                    break
            self.cut = False
        while state == _QUOTED:  # a quoted cell still open: its lines belong to this record
            piece = self.handle.readline(MAX_RECORD_CHARS)
            if not piece:
                break
            if piece.endswith(("\n", "\r")):
                self.number += 1
            state = _scan(piece, state, delimiter)
        return start, prefix


# States of the csv module's parser (excel dialect, doublequote, non-strict), as far as record ends go.
_START, _FIELD, _QUOTED, _QUOTE_IN_QUOTED = range(4)


def _scan(text: str, state: int, delimiter: str, quote: str = '"') -> int:
    """The parser state after ``text``; a line break outside a quoted cell ends the record (state _START)."""
    special = _SPECIAL.get(delimiter) or _SPECIAL.setdefault(delimiter, re.compile(f"[{re.escape(delimiter)}\"\r\n]"))
    i, n = 0, len(text)
    while i < n:
        if state == _QUOTED:
            j = text.find(quote, i)
            if j < 0:
                return _QUOTED
            state, i = _QUOTE_IN_QUOTED, j + 1
            continue
        c = text[i]
        if c in "\r\n":
            state = _START
        elif state == _QUOTE_IN_QUOTED and c == quote:
            state = _QUOTED
        elif c == delimiter:
            state = _START  # a new field: the same as a record's start for quoting
        elif c == quote and state == _START:
            state = _QUOTED
        else:
            # Inside an unquoted cell nothing matters until the next delimiter, quote or line break.
            state = _FIELD
            found = special.search(text, i + 1)
            i = found.start() if found else n
            continue
        i += 1
    return state


_SPECIAL: dict[str, re.Pattern[str]] = {}


def _key_of_prefix(prefix: str, key_index: int, delimiter: str) -> str:
    """The key of a record that could not be parsed, when it lies in a complete cell before the trouble."""
    try:
        fields = next(csv.reader(prefix[:_CSV_PREFIX_CHARS].splitlines(keepends=True), delimiter=delimiter), [])
    except csv.Error:
        return ""
    return fields[key_index].strip() if key_index < len(fields) - 1 else ""


