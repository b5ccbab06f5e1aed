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
through the masking registry. A source read from a config file is named at the
line to fix: a failing query at its ``query:`` (``config.yaml:6: sources.hr.query:
no such table: employes``), a database that cannot be reached or a driver that
is not installed at its ``url:``.
"""

from __future__ import annotations

import base64
import datetime as dt
import difflib
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
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
    """Stream the query's rows as records; SourceError when the database or the query fails.

    The error names the config's ``url:`` line when the database cannot be
    reached, its ``query:`` line when the query fails (see :func:`sql_columns`).
    """
    where = config.describe()
    with _query(config, config.chunk_size) as result:
        names = _names(list(result.keys()), config)
        for number, row in enumerate(result, start=1):
            attributes = {name: _value(value) for name, value in zip(names, row)}
            yield checked(config.key, attributes, f"{where}:{number}")


def sql_columns(config: SqlSourceConfig) -> set[str]:
    """The query's result columns, from its cursor's description, without fetching a row.

    The query is run as a cycle runs it (a server-side cursor where the driver
    has one): PostgreSQL describes the cursor once declared, SQLite steps to the
    first row. SourceError when the database cannot be reached (naming the
    config's ``url:`` line, the URL's password hidden) or the query fails
    (naming its ``query:`` line): ``config.yaml:6: sources.hr.query: no such table: employes``.
    """
    with _query(config, 1) as result, closing(result):
        return set(_names(list(result.keys()), config))


@contextmanager
def _query(config: SqlSourceConfig, chunk_size: int) -> Iterator[Any]:
    """The query's result, fetched ``chunk_size`` rows at a time, for the ``with`` block.

    The engine is made for the block and disposed of after it. SourceError naming
    the ``url:`` line when the database cannot be reached, the ``query:`` line when
    the query fails, in the block included (a row that cannot be fetched).
    """
    engine = _engine(config)
    try:
        with _connect(engine, config) as conn:
            try:
                yield _run(conn, config.query, chunk_size)
            except SQLAlchemyError as exc:
                raise SourceError(f"{config.at('query')}: {_reason(exc)}") from None
    finally:
        engine.dispose()


def _connect(engine: Engine, config: SqlSourceConfig) -> Connection:
    """A connection; SourceError naming the ``url:`` line and the URL (password hidden) when there is none."""
    try:
        return engine.connect()
    except SQLAlchemyError as exc:
        raise SourceError(f"{config.at('url')}: cannot connect to {config.describe()}: {_reason(exc)}") from None


def _engine(config: SqlSourceConfig) -> Engine:
    url = config.engine_url()
    if url.drivername == "postgresql":
        # The driver the `postgres` extra installs (as for the state database); SQLAlchemy would look for psycopg2.
        url = url.set(drivername="postgresql+psycopg")
    backend = url.get_backend_name()
    if backend == "sqlite" and url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        # SQLite creates a missing file: an HR database that is not there would read as an empty one.
        if not Path(url.database).is_file():
            raise SourceError(f"{config.at('url')}: no such database file: {url.database}")
    connect_args: dict[str, Any] = {}
    if backend == "sqlite":
        connect_args["timeout"] = config.connect_timeout
    elif backend in ("postgresql", "mysql", "mariadb"):
        connect_args["connect_timeout"] = max(1, round(config.connect_timeout))
    try:
        return create_engine(url, connect_args=connect_args, pool_pre_ping=False)
    except NoSuchModuleError:
        raise SourceError(
            f"{config.at('url')}: no SQLAlchemy dialect or driver is known for '{url.drivername}' "
            "(postgresql, mysql, mariadb, sqlite, mssql, oracle, optionally +driver)"
        ) from None
    except ImportError as exc:
        raise SourceError(f"{config.at('url')}: {_missing_driver(exc, url.drivername)}") from None
    except (SQLAlchemyError, ValueError, TypeError) as exc:
        raise SourceError(f"{config.at('url')}: cannot use this database URL: {redaction.redact(str(exc))}") from None


# The package that installs a DBAPI module, where its name differs from the module's.
_DRIVER_PACKAGES = {
    "psycopg": "psycopg[binary]",
    "psycopg2": "psycopg2-binary",
    "MySQLdb": "mysqlclient",
    "pymysql": "PyMySQL",
    "mysql": "mysql-connector-python",
    "mariadb": "mariadb",
    "cx_Oracle": "cx_Oracle",
    "oracledb": "oracledb",
    "pyodbc": "pyodbc",
    "pymssql": "pymssql",
    "asyncpg": "asyncpg",
    "pg8000": "pg8000",
}


def _missing_driver(exc: ImportError, drivername: str) -> str:
    """What to install for the DBAPI module the import did not find (the ImportError's ``name``)."""
    module = (exc.name or "").split(".", 1)[0]
    if not module:
        return f"the database driver for '{drivername}' cannot be loaded: {redaction.redact(str(exc))}"
    package = _DRIVER_PACKAGES.get(module, module)
    return (f"the database driver for '{drivername}' is not installed (no module named '{module}'); "
            f"install it next to provisioner: pip install '{package}'")  # fmt: skip


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
                f"{config.at('query')}: the query returns two columns named '{name}'; name them apart with AS"
            )
        seen.add(name)
    if config.key not in seen:
        close = difflib.get_close_matches(config.key, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; it returns {', '.join(names) or 'none'}"
        raise SourceError(
            f"{config.at('query')}: the query returns no column '{config.key}', the source's key{hint}"
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
