"""Identity sources: records streamed from a file, a database query or an HR system's SCIM endpoint.

One module per kind — :mod:`~provisioner.sources.csv`, :mod:`~provisioner.sources.jsonl`,
:mod:`~provisioner.sources.sql`, :mod:`~provisioner.sources.scim` — each turning
its source into :class:`IdentityRecord` and :class:`BadRecord` items, one at a time.

A source that cannot be read at all (a missing file, a database that refuses
the query, an HR endpoint that is down) raises SourceError, and the cycle is
refused. Anything wrong with one record is a :class:`BadRecord` naming where it
is (``file:line``, ``url:row``, the resource's URL) and, when it can be read,
its key: that record goes to review, the others go on. That includes a key
several records share: every one of them is rejected, none is guessed
(:mod:`provisioner.sources._unique`).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator

from provisioner.config import ScimSourceConfig, SourceConfig, SqlSourceConfig
from provisioner.sources._records import MAX_CELL_CHARS, MAX_RECORD_CHARS, BadRecord, IdentityRecord
from provisioner.sources._unique import unique_keys

# Each kind's module is imported when a source of that kind is read: a CSV source does not
# load the SCIM client (httpx, authlib) or a database driver at start-up.

__all__ = [
    "BadRecord",
    "IdentityRecord",
    "MAX_CELL_CHARS",
    "MAX_RECORD_CHARS",
    "first_records",
    "read_off_loop",
    "read_source",
    "source_columns",
]


def read_source(config: SourceConfig | SqlSourceConfig | ScimSourceConfig) -> Iterator[IdentityRecord | BadRecord]:
    """Stream a source's records, each key at most once as an IdentityRecord.

    Raises SourceError (when the iteration starts) for a source that cannot be read.
    """
    # What a `file:N` origin counts: a file's lines, a query's rows; a SCIM record's origin is its URL.
    unit = "row" if isinstance(config, SqlSourceConfig) else None if isinstance(config, ScimSourceConfig) else "line"
    return unique_keys(_records(config), config.key, unit)


_END = object()


async def read_off_loop(records: Iterator[IdentityRecord | BadRecord]) -> Iterator[IdentityRecord | BadRecord]:
    """A :func:`read_source` iterator with the source already read, in a thread: the event loop never waits on it.

    :func:`read_source` reads the whole snapshot (into its spool) before it
    gives the first record, so taking that first record in a thread is where
    a slow query or HR endpoint is waited for; the rest comes from the local
    spool. The records are then rendered where the caller iterates them: in
    the main thread, where a mapping's time limit (SIGALRM) holds. Raises
    SourceError as :func:`read_source` does.
    """
    first = await asyncio.to_thread(next, records, _END)
    if first is _END:
        return iter(())
    return itertools.chain((first,), records)  # type: ignore[arg-type]


def first_records(
    config: SourceConfig | SqlSourceConfig | ScimSourceConfig, count: int
) -> list[IdentityRecord | BadRecord]:
    """The first ``count`` records as the source has them, without reading the rest (duplicates not looked for).

    For a quick look (``check`` renders them); SourceError as :func:`read_source`.
    """
    records = _records(config)
    try:
        return list(itertools.islice(records, count))
    finally:
        close = getattr(records, "close", None)
        if close is not None:
            close()


def _records(config: SourceConfig | SqlSourceConfig | ScimSourceConfig) -> Iterator[IdentityRecord | BadRecord]:
    """The records as the source has them, duplicates included."""
    if isinstance(config, SqlSourceConfig):
        from provisioner.sources.sql import read_sql

        return read_sql(config)
    if isinstance(config, ScimSourceConfig):
        from provisioner.sources.scim import read_scim

        return read_scim(config)
    if config.type == "csv":
        from provisioner.sources.csv import read_csv

        return read_csv(config)
    from provisioner.sources.jsonl import read_jsonl

    return read_jsonl(config)


def source_columns(config: SourceConfig | SqlSourceConfig | ScimSourceConfig) -> set[str] | None:
    """The columns a source's records have, when it says before they are read; None when it cannot say.

    CSV: its header. SQL: the query's result columns (the query is run with no
    row fetched). SCIM: the names the records take (see :mod:`provisioner.sources.scim`)
    from the server's ``/Schemas``, None when it has none. JSON Lines: None.
    Raises SourceError when the source cannot be read.
    """
    if isinstance(config, SqlSourceConfig):
        from provisioner.sources.sql import sql_columns

        return sql_columns(config)
    if isinstance(config, ScimSourceConfig):
        from provisioner.sources.scim import scim_columns

        return scim_columns(config)
    if config.type == "csv":
        from provisioner.sources.csv import csv_columns

        return csv_columns(config)
    return None
