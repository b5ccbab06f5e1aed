"""SQL sources: a query's result rows, streamed in chunks, from any database SQLAlchemy reaches.

The record's columns are the query's result columns, named as the query names
them (``SELECT emp_no AS employee_id``). Rows are fetched ``chunk_size`` at a
time through a server-side cursor where the driver has one (SQLAlchemy's
``stream_results`` / ``yield_per``): 100,000 rows never sit in memory at once.

Values become what a mapping and a JSON payload can hold: dates and times their
ISO 8601 text (RFC 7643 §2.3.5 ``dateTime``), a ``Decimal`` an integer when it
is one and its text otherwise, binary its base64 text (§2.3.6), a UUID its text.

A record's origin is the URL, password hidden, and the row's number in the
result: ``postgresql+psycopg://reader@db/hr:17``. The URL's password never
appears in a message: errors name the URL with the password hidden and pass
through the masking registry.
"""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import NoSuchModuleError, SQLAlchemyError

from provisioner import redaction
from provisioner.config import SqlSourceConfig
from provisioner.errors import SourceError
from provisioner.sources._records import BadRecord, IdentityRecord, checked

# Integers past 64 bits do not survive JSON everywhere: they are carried as text.
_MAX_INT = 2**63 - 1


def read_sql(config: SqlSourceConfig) -> Iterator[IdentityRecord | BadRecord]:
    """Stream the query's rows as records; SourceError when the database or the query fails."""
    where = config.describe()
    engine = _engine(config)
    try:
        with engine.connect() as conn:
            result = _run(conn, config.query, config.chunk_size)
            names = _names(list(result.keys()), config)
            for number, row in enumerate(result, start=1):
                attributes = {name: _value(value) for name, value in zip(names, row)}
                yield checked(config.key, attributes, f"{where}:{number}")
    except SQLAlchemyError as exc:
        raise SourceError(f"{where}: {_reason(exc)}") from None
    finally:
        engine.dispose()


def sql_columns(config: SqlSourceConfig) -> set[str]:
    """The query's result columns, from its cursor's description, without fetching a row.

    The query is run as a cycle runs it (a server-side cursor where the driver
    has one): PostgreSQL describes the cursor once declared, SQLite steps to the
    first row. SourceError when the query fails.
    """
    where = config.describe()
    engine = _engine(config)
    try:
        with engine.connect() as conn:
            result = _run(conn, config.query, 1)
            try:
                return set(_names(list(result.keys()), config))
            finally:
                result.close()
    except SQLAlchemyError as exc:
        raise SourceError(f"{where}: {_reason(exc)}") from None
    finally:
        engine.dispose()


def _engine(config: SqlSourceConfig) -> Engine:
    url = config.engine_url()
    if url.drivername == "postgresql":
        # The driver the `postgres` extra installs (as for the state database); SQLAlchemy would look for psycopg2.
        url = url.set(drivername="postgresql+psycopg")
    backend = url.get_backend_name()
    if backend == "sqlite" and url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        # SQLite creates a missing file: an HR database that is not there would read as an empty one.
        if not Path(url.database).is_file():
            raise SourceError(f"{config.describe()}: no such database file: {url.database}")
    connect_args: dict[str, Any] = {}
    if backend == "sqlite":
        connect_args["timeout"] = config.connect_timeout
    elif backend in ("postgresql", "mysql", "mariadb"):
        connect_args["connect_timeout"] = max(1, round(config.connect_timeout))
    try:
        return create_engine(url, connect_args=connect_args, pool_pre_ping=False)
    except (NoSuchModuleError, ModuleNotFoundError, ImportError) as exc:
        raise SourceError(
            f"{config.describe()}: the database driver is not installed ({redaction.redact(str(exc))}); "
            "install it next to provisioner (e.g. pip install 'psycopg[binary]')"
        ) from None
    except (SQLAlchemyError, ValueError, TypeError) as exc:
        raise SourceError(f"{config.describe()}: cannot use this database URL: {redaction.redact(str(exc))}") from None


def _run(conn: Connection, query: str, chunk_size: int) -> Any:
    # stream_results: a server-side cursor (PostgreSQL, MySQL) or the driver's lazy cursor (SQLite);
    # yield_per: rows are buffered chunk_size at a time, never the whole result.
    return conn.execution_options(stream_results=True, yield_per=chunk_size).execute(text(query))


def _names(names: list[str], config: SqlSourceConfig) -> list[str]:
    """The result's column names; SourceError when two are the same or the key is not one of them."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise SourceError(
                f"{config.describe()}: the query returns two columns named '{name}'; name them apart with AS"
            )
        seen.add(name)
    if config.key not in seen:
        raise SourceError(
            f"{config.describe()}: the key column '{config.key}' is not among the query's columns "
            f"({', '.join(names) or 'none'})"
        )
    return names


def _value(value: Any) -> Any:
    """A database value as JSON can hold it (see the module docstring)."""
    if value is None or isinstance(value, (str, bool, float)):
        return value
    if isinstance(value, int):
        return value if -_MAX_INT <= value <= _MAX_INT else str(value)
    if isinstance(value, Decimal):
        if value == value.to_integral_value() and abs(value) <= _MAX_INT:
            return int(value)
        return str(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (dict, list)):
        return value  # a JSON column
    return str(value)


def _reason(exc: SQLAlchemyError) -> str:
    """The database's own words, one line, without the URL's password (SQLAlchemy appends the SQL and a link)."""
    original = getattr(exc, "orig", None)
    message = str(original) if original is not None else str(exc)
    first = next((line.strip() for line in message.splitlines() if line.strip()), type(exc).__name__)
    return redaction.redact(first)
