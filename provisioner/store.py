"""The state database: account links, the operation queue and its attempts.

SQLModel tables on SQLite by default (WAL, a busy timeout, ``BEGIN IMMEDIATE``
for every transaction so that two claimers never read the same rows as free),
or on PostgreSQL (the ``postgres`` extra, psycopg 3) when several daemon
instances share the work. Hot paths use SQLAlchemy Core on these tables; the
ORM is for reading one row.

The schema is Alembic's (``provisioner/migrations``): :func:`open_store`
brings a database to the newest revision under a lock (a PostgreSQL advisory
lock; the state file's lock for SQLite), adopts a state file made before
migrations existed, and refuses one that a newer provisioner has upgraded.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, Index, MetaData, Table, event, func, inspect, literal_column, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlmodel import Field, SQLModel, create_engine

from provisioner.errors import ConfigError, UserError

log = structlog.get_logger("provisioner.store")

# The modules whose models are tables of the state database (besides this one).
TABLE_MODULES = ("provisioner.alerts", "provisioner.quarantine")
# The schema ``create_all`` made before migrations existed.
BASELINE = "0001"
# Advisory lock key (any constant 64-bit number) held while migrating a PostgreSQL database.
MIGRATION_LOCK = 0x7072_6F76_6D69_6772  # "provmigr"
# The state holds HR personal data: only the owner reads it (SQLite creates -wal and -shm alike).
STATE_FILE_MODE = 0o600


def utcnow() -> datetime:
    """Now, in UTC, as stored in every timestamp column."""
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """A stored timestamp, aware: a driver that hands back a naive one means UTC (all we store is)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def driver_rows(result: Any) -> list[tuple[Any, ...]]:
    """A result's rows as the driver returned them, plain tuples, and the result closed.

    Only for columns SQLAlchemy has nothing to convert: text, and flags read for
    their truth (SQLite returns 0 and 1). Its per-row processing is a third of
    reading 100,000 links.
    """
    try:
        return result.cursor.fetchall() if result.cursor is not None else [tuple(row) for row in result]
    finally:
        result.close()


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """``items`` in consecutive slices of at most ``size``: an IN list or a batch of rows per statement."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def upsert(table: Table, keys: Sequence[str], values: Sequence[str], dialect: str) -> Any:
    """INSERT … ON CONFLICT (``keys``) DO UPDATE SET ``values``, in the database's own dialect.

    ``dialect`` is the engine's dialect name (``postgresql`` or ``sqlite``, both of which spell it so).
    """
    statement = (postgresql if dialect == "postgresql" else sqlite).insert(table)
    return statement.on_conflict_do_update(
        index_elements=[table.c[key] for key in keys],
        set_={name: getattr(statement.excluded, name) for name in values},
    )


class AccountLink(SQLModel, table=True):
    """An identity's account in a target, as we last applied it."""

    __tablename__ = "account_link"
    # One account belongs to one identity: two identities racing to adopt it cannot both link it.
    __table_args__ = (Index("ux_account_link_scim_id", "target", "scim_id", unique=True),)

    target: str = Field(primary_key=True)
    identity_key: str = Field(primary_key=True)
    scim_id: str
    active: bool = True
    etag: str | None = None
    location: str | None = None
    applied_hash: str | None = None
    # The payload last applied, as JSON: PATCH sends only what differs from it.
    applied: str | None = None
    # What that payload was written without because a reference in it named an account not in the
    # target yet (a manager created later), as JSON {attribute path: value with its references}:
    # the account owes it, and the next write to the account sends it once it resolves.
    owed_refs: str | None = None
    updated_at: datetime = Field(default_factory=utcnow)


class RenderedRecord(SQLModel, table=True):
    """What an identity's record last rendered to through a target's mapping (``planner.RenderMemo``).

    A fact about a pure function, true whatever was sent since: this record,
    rendered through this mapping with these references resolved, hashes to
    ``payload_hash``. A cycle that finds the same record, mapping and
    references, and the link holding that hash, settles the identity without
    rendering it.
    """

    __tablename__ = "rendered_record"

    target: str = Field(primary_key=True)
    identity_key: str = Field(primary_key=True)
    # blake2b of the record's attributes, keyed with the mapping's digest (AttributeMapping.digest), hex.
    digest: str
    payload_hash: str | None = None
    # The match value (userName) it rendered: duplicates are found without rendering.
    match_value: str | None = None
    # JSON [[identity key, SCIM id or null], …] of the references it resolved; null: none.
    refs: str | None = None


class GroupLink(SQLModel, table=True):
    """A group of a target: which SCIM group a group definition's key is linked to."""

    __tablename__ = "group_link"
    # One SCIM group belongs to one group definition: two rules resolving to the same
    # existing group cannot both link it (the second goes to review).
    __table_args__ = (Index("ux_group_link_scim_id", "target", "scim_id", unique=True),)

    target: str = Field(primary_key=True)
    group_key: str = Field(primary_key=True)
    scim_id: str
    display_name: str
    etag: str | None = None
    # When the group's members were last read from the target (a full compare); None: never.
    verified_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)


class TargetQuirk(SQLModel, table=True):
    """A deviation learned from a target's answers (a 501, a failed read-back), kept across restarts."""

    __tablename__ = "target_quirk"

    target: str = Field(primary_key=True)
    # A field of connectors.Quirks.
    name: str = Field(primary_key=True)
    # JSON of the value.
    value: str
    reason: str
    learned_at: datetime = Field(default_factory=utcnow)


class GroupMemberState(SQLModel, table=True):
    """One member of a group as we last applied it (or last read it from the target)."""

    __tablename__ = "group_member_state"

    target: str = Field(primary_key=True)
    group_key: str = Field(primary_key=True)
    member_id: str = Field(primary_key=True)
    identity_key: str | None = None


class Operation(SQLModel, table=True):
    """One change to send to a target: a row of the outbox, reviewed by operators.

    Status: pending → running → succeeded; or → retry_wait → …; or → failed,
    then resolved / cancelled by an operator. ``superseded`` when a newer
    plan for the same account replaced it before it was sent.
    """

    __tablename__ = "operation"
    __table_args__ = (
        Index("ix_operation_due", "target", "status", "next_attempt_at"),
        Index("ix_operation_account", "target", "identity_key"),
    )

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(index=True)
    target: str
    identity_key: str
    kind: str
    reason: str
    status: str = "pending"
    payload: str | None = None
    payload_hash: str | None = None
    attempts: int = 0
    next_attempt_at: datetime | None = None
    lease_until: datetime | None = None
    # The instance that claimed the operation last (``daemon.instance``): who holds it while
    # running, who sent it once finished.
    claimed_by: str | None = None
    last_http_status: int | None = None
    last_scim_type: str | None = None
    last_detail: str | None = None
    last_error: str | None = None
    note: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None


# The statuses a claim takes rows from (pending, retry_wait that is due, running whose lease ran out),
# as a condition with the values written in: a database uses a partial index only for a query whose
# condition implies the index's, which it cannot tell of a bound parameter (SQLite never; PostgreSQL
# not in a prepared statement's generic plan).
CLAIMABLE = Operation.__table__.c.status.in_([literal_column(f"'{status}'") for status in
                                              ("pending", "retry_wait", "running")])  # fmt: skip
# The claim's order, walked from its start: a claim reads the rows it takes, not the whole queue (a
# sort of 100,000 pending rows at every claim of 100 cost PostgreSQL 95 ms, spilled to disk). Partial:
# the finished rows, which are most of a queue, are not in it.
Index(
    "ix_operation_claim",
    Operation.__table__.c.target,
    func.coalesce(Operation.__table__.c.next_attempt_at, Operation.__table__.c.created_at),
    Operation.__table__.c.id,
    postgresql_where=CLAIMABLE,
    sqlite_where=CLAIMABLE,
)


class Attempt(SQLModel, table=True):
    """One HTTP call made for an operation: what was sent, what came back, how long it took."""

    __tablename__ = "attempt"

    id: int | None = Field(default=None, primary_key=True)
    operation_id: int = Field(index=True, foreign_key="operation.id")
    number: int
    started_at: datetime
    duration_ms: float
    method: str | None = None
    url: str | None = None
    http_status: int | None = None
    scim_type: str | None = None
    detail: str | None = None
    error: str | None = None
    request_body: str | None = None
    response_body: str | None = None


class Run(SQLModel, table=True):
    """One sync cycle of one target."""

    __tablename__ = "run"

    id: str = Field(primary_key=True)
    target: str = Field(index=True)
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    status: str = "running"
    counts: str | None = None
    # Why a refused or crashed run stopped.
    error: str | None = None


class SourceWatermark(SQLModel, table=True):
    """Where a target's delta reads of a SCIM source stand (:mod:`provisioner.delta`).

    Per target and source: each target's cycle reads the source on its own, so
    one target's read must not move another's watermark.
    """

    __tablename__ = "source_watermark"

    target: str = Field(primary_key=True)
    source: str = Field(primary_key=True)
    # The highest meta.lastModified the HR system sent (RFC 7643 §3.1), as ISO 8601 text in UTC; null: none.
    watermark: str | None = None
    # When the last full read's plan was queued (this host's clock: it only schedules the next one).
    full_read_at: datetime | None = None


class ReconcileRun(SQLModel, table=True):
    """One reconciliation of one target that was allowed to write (``--repair``, or the daemon)."""

    __tablename__ = "reconcile_run"

    id: str = Field(primary_key=True)
    target: str = Field(index=True)
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    # Accounts by situation, as JSON; ``drifted``: linked accounts with drift.
    counts: str | None = None
    drifted: int = 0


class UnmatchedAccount(SQLModel, table=True):
    """An account of a target that no identity owns, and since when it has been seen so."""

    __tablename__ = "unmatched_account"

    target: str = Field(primary_key=True)
    scim_id: str = Field(primary_key=True)
    user_name: str | None = None
    first_seen_at: datetime = Field(default_factory=utcnow)
    last_seen_at: datetime = Field(default_factory=utcnow)


def metadata() -> MetaData:
    """Every table of the state database: the models of this module and of :data:`TABLE_MODULES`."""
    for module in TABLE_MODULES:
        importlib.import_module(module)
    return SQLModel.metadata


def open_store(url: str) -> Engine:
    """Connect to the state database, bringing its schema to the newest revision first.

    Raises UserError (one line, exit 3) for a URL that is not a database URL, a
    PostgreSQL URL without the ``postgres`` extra installed, and a database that
    a newer provisioner has upgraded.
    """
    engine = connect(url)
    with engine.connect() as conn:
        # Nearly always the schema is current: said without loading Alembic (~0.1 s of CPU a command).
        current = _current(conn)
        heads = _heads_in_files()
        if heads is not None and current == heads:
            return engine
    _check_known(engine, current)
    if current != _heads():
        upgrade(engine)
    return engine


def connect(url: str) -> Engine:
    """An engine for the state database, configured for it; the schema is not touched."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError("state: not a database URL (sqlite:///file.db or postgresql://user@host/db)") from None
    backend = parsed.get_backend_name()
    kwargs: dict[str, Any] = {}
    if backend == "sqlite":
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
            private_files(Path(parsed.database))
    elif backend == "postgresql":
        if parsed.drivername == "postgresql":
            # The driver the `postgres` extra installs; SQLAlchemy would look for psycopg2.
            parsed = parsed.set(drivername="postgresql+psycopg")
        # Timestamps are stored without a zone and mean UTC, whatever the server's TimeZone says.
        kwargs["connect_args"] = {"options": "-c TimeZone=UTC"}
        # No pre-ping: it costs a round trip per transaction (0.7 ms of a 1.8 ms outcome here). After a
        # server restart the first use of the old pool fails once and SQLAlchemy drops that pool; the
        # operation it was recording stays running and is taken back when its lease ends.
    try:
        engine = create_engine(parsed, **kwargs)
    except ImportError as exc:
        raise ConfigError(
            f"state: {_shown(parsed)} needs a database driver that is not installed ({exc.name or exc}); "
            "install provisioner with the `postgres` extra: pip install 'provisioner[postgres]'"
        ) from None
    if backend == "sqlite":
        _configure_sqlite(engine)
    return engine


def schema_revision(engine: Engine) -> str | None:
    """The database's schema revision; None when it has no schema yet, "legacy" when made before migrations."""
    with engine.connect() as conn:
        return _text(_current(conn))


def head_revision() -> str:
    """The newest schema revision this provisioner knows."""
    return ",".join(_heads())


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Migrate the database to the newest revision under a lock; return (revision before, revision after).

    A state file made by ``create_all`` before migrations existed is migrated
    like an empty database: every revision creates only what is missing
    (``provisioner.migrations.idempotent``), so its tables and data are kept.
    """
    from alembic import command

    with _migration_lock(engine) as conn:
        current = _current(conn)
        _check_known(engine, current)
        command.upgrade(_alembic_config(conn), "heads")
        after = _current(conn)
    if current != after:
        log.info("state database upgraded", before=_text(current), after=_text(after))
    return _text(current), str(_text(after))


def _current(conn: Connection) -> tuple[str, ...] | str | None:
    """The revisions the database is stamped with, sorted; "legacy" for tables without a stamp, None for no table."""
    stamped = _stamped(conn)
    if stamped is not None:
        return stamped
    return "legacy" if inspect(conn).get_table_names() else None


def _stamped(conn: Connection) -> tuple[str, ...] | None:
    """The revisions ``alembic_version`` holds, sorted; None when the table is not there."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    return tuple(sorted(row[0] for row in conn.execute(text("SELECT version_num FROM alembic_version"))))


# One revision file's identity, each on a line of its own (a down_revision is kept on one line).
_REVISION = re.compile(r"^revision\s*=\s*['\"]([^'\"]+)['\"]\s*$", re.MULTILINE)
_DOWN_REVISION = re.compile(r"^down_revision\s*=\s*(?:None|['\"]([^'\"]+)['\"])\s*$", re.MULTILINE)


@functools.cache
def _heads_in_files() -> tuple[str, ...] | None:
    """The newest revisions, read from the revision files' ``revision`` and ``down_revision`` lines.

    None when a file does not say them in that plain form (a merge's tuple):
    then Alembic reads them. ``_heads()`` is the authority; a test keeps both equal.
    """
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (Path(__file__).parent / "migrations" / "versions").glob("[!_]*.py"):
        source = path.read_text(encoding="utf-8")
        revision, down = _REVISION.findall(source), _DOWN_REVISION.findall(source)
        if len(revision) != 1 or len(down) != 1:
            return None
        revisions.add(revision[0])
        parents.add(down[0])
    return tuple(sorted(revisions - parents)) or None


def _text(current: tuple[str, ...] | str | None) -> str | None:
    return ",".join(current) or None if isinstance(current, tuple) else current


def _check_known(engine: Engine, current: tuple[str, ...] | str | None) -> None:
    if not isinstance(current, tuple):
        return
    unknown = [rev for rev in current if not _known(rev)]
    if unknown:
        raise UserError(
            f"state: {_shown(engine.url)} has schema revision {unknown[0]}, newer than this provisioner knows "
            f"(newest: {head_revision()}); it was upgraded by a newer provisioner: run that version or a newer one"
        )


def _known(revision: str) -> bool:
    from alembic.util import CommandError

    try:
        return _script().get_revision(revision) is not None
    except CommandError:
        return False


def _heads() -> tuple[str, ...]:
    return tuple(sorted(_script().get_heads()))


@functools.cache
def _script() -> Any:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(None))


def _alembic_config(conn: Connection | None) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "provisioner:migrations")
    config.attributes["connection"] = conn
    return config


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """One transaction, held by one process at a time, in which migrations run."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            # Released with the transaction; the others wait here, then find the schema current.
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _signed(MIGRATION_LOCK)})
            yield conn
        return
    from provisioner.lock import StateLock

    with StateLock(str(engine.url)), engine.begin() as conn:
        yield conn


def _signed(key: int) -> int:
    """A 64-bit key as PostgreSQL's signed bigint."""
    return key - (1 << 64) if key >= 1 << 63 else key


def _shown(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def check_state_driver(url: str) -> None:
    """Raise ConfigError unless the database driver the state URL names can be imported."""
    try:
        parsed = make_url(url)
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")  # as connect() does
        dialect = parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise ConfigError(f"state: {url!r} is not a database URL this engine knows ({exc})") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        hint = ""
        if parsed.get_backend_name() == "postgresql":
            hint = "; install provisioner with the `postgres` extra: pip install 'provisioner[postgres]'"
        raise ConfigError(
            f"state: the database driver of {parsed.drivername}:// is not installed ({exc.name or exc}){hint}"
        ) from None


def private_files(database: Path) -> None:
    """Create the database file 0600 before SQLite does (it would follow the umask, often 0644).

    SQLite gives the ``-wal`` and ``-shm`` files the database file's mode; files
    left wider by an earlier version are narrowed. Files we do not own are left as they are.
    """
    try:
        os.close(os.open(database, os.O_RDWR | os.O_CREAT, STATE_FILE_MODE))
    except FileNotFoundError:
        return  # no such folder: the config check names it; opening it fails clearly below
    for suffix in ("", "-wal", "-shm"):
        path = Path(f"{database}{suffix}")
        try:
            if path.exists() and path.stat().st_mode & 0o077 and path.stat().st_uid == os.getuid():
                path.chmod(STATE_FILE_MODE)
        except OSError:
            pass


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own
        # deferred BEGIN lets two writers read the same rows as free).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def counts_by_target(engine: Engine, column: Any, *where: Any) -> dict[str, dict[Any, int]]:
    """Operations counted by target and by ``column`` of ``operation``, among those ``where`` selects."""
    target = Operation.__table__.c.target
    query = select(target, column, func.count()).where(*where).group_by(target, column)
    counts: dict[str, dict[Any, int]] = {}
    with engine.connect() as conn:
        for target, value, count in conn.execute(query):
            counts.setdefault(target, {})[value] = int(count)
    return counts
