"""The operation queue (a transactional outbox): enqueue, claim, record outcomes, list.

Operations are written before anything is sent; an outcome is written with
the account link it produces in one transaction, so a crash between the two
cannot happen.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from typing import Any, Protocol

from sqlalchemy import Engine, and_, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from provisioner.payload import Packed, dumps, loads, refs_in
from provisioner.planner import Decision, Kind, Link, Reason
from provisioner.redaction import has_write_only, mask_write_only, names_write_only, redact, register_write_only
from provisioner.store import (
    CLAIMABLE,
    AccountLink,
    Attempt,
    Operation,
    as_utc,
    chunks,
    counts_by_target,
    driver_rows,
    upsert,
    utcnow,
)

OP = Operation.__table__
LINK = AccountLink.__table__
ATTEMPT = Attempt.__table__

# Statuses in which an operation still has to happen (or be reviewed).
OPEN = ("pending", "running", "retry_wait", "failed", "held")
# Leaver operations: the ones the deletion brake can hold.
DEPROVISION = (Kind.DISABLE.value, Kind.DELETE.value)
# The kinds of operation on accounts; group operations share the table and are claimed apart.
ACCOUNT_KINDS = tuple(kind.value for kind in Kind)

# Transient failures are retried across cycles on a growing schedule, then go to review.
RETRY_SCHEDULE = (
    timedelta(minutes=1),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=2),
    timedelta(hours=6),
    timedelta(hours=12),
)
MAX_RETRY_AGE = timedelta(days=7)
# A Retry-After is honoured up to this long; a target asking for more is asked again then.
MAX_RETRY_AFTER = timedelta(days=1)
LEASE = timedelta(minutes=10)
# On a database several instances share, one claim takes at most this many rows: the others
# get their share of a large plan, and a dead instance strands no more than this until its lease ends.
SHARED_CLAIM = 100
# Bodies stored with attempts are capped: a queue row is for reading, not archiving.
BODY_CAP = 4_000


@dataclass(frozen=True, slots=True)
class Claimant:
    """The instance that claims operations in this process: its name (stamped on rows) and its lease."""

    name: str
    lease: timedelta = LEASE


def default_instance() -> str:
    """``hostname-pid``: unique among running instances, new at every start."""
    return f"{socket.gethostname()}-{os.getpid()}"


_claimant: Claimant | None = None


def claimant() -> Claimant:
    """Who this process claims as (see :func:`identify`); ``hostname-pid`` with the default lease until told."""
    global _claimant
    if _claimant is None:
        _claimant = Claimant(default_instance())
    return _claimant


def identify(name: str, lease: timedelta = LEASE) -> Claimant:
    """Name this process's instance and its lease, for every claim it makes from now on.

    One process is one instance: the daemon calls this once at start.
    """
    global _claimant
    _claimant = Claimant(name, lease)
    return _claimant


def retry_delay(attempts: int) -> timedelta:
    """How long to wait before the next try after ``attempts`` failed tries."""
    return RETRY_SCHEDULE[min(max(attempts, 1), len(RETRY_SCHEDULE)) - 1]


@dataclass(frozen=True, slots=True)
class ClaimedOperation:
    """An operation this process now owns until its lease runs out."""

    id: int
    identity_key: str
    kind: Kind
    reason: Reason
    payload: dict[str, Any] | None
    payload_hash: str | None
    attempts: int
    created_at: datetime
    # It failed before (a transient failure waiting, or one an operator sent again): a failure
    # now may be this operation's own, not a sign that the target is unwell.
    failed_before: bool = False


@dataclass(frozen=True, slots=True)
class LinkState:
    """An account link with the payload last applied, as the executor needs it."""

    scim_id: str
    active: bool
    etag: str | None
    location: str | None
    applied_hash: str | None
    applied: dict[str, Any] | None
    # Attributes the account was written without, their references naming no account yet
    # ({attribute path: value with references}, see payload.owed_references); None: nothing owed.
    owed: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One HTTP call made for an operation."""

    started_at: datetime
    duration_ms: float
    method: str | None = None
    url: str | None = None
    http_status: int | None = None
    scim_type: str | None = None
    detail: str | None = None
    error: str | None = None
    request_body: Any = None
    response_body: str | None = None


@dataclass(slots=True)
class Outcome:
    """How an operation ended this time, and the link state it leaves behind."""

    operation_id: int
    status: str
    note: str | None = None
    error: str | None = None
    http_status: int | None = None
    scim_type: str | None = None
    detail: str | None = None
    # The new link (None: unchanged); ``drop_link`` removes it (account deleted).
    link: LinkState | None = None
    drop_link: bool = False
    calls: list[CallRecord] = field(default_factory=list)
    # Which try of the operation this was (from its claim): numbers the calls, sets the retry delay.
    attempt: int = 1
    # Seconds the target asked us to wait (a Retry-After too long to wait in place): the row is due
    # then, instead of at the retry schedule's next step.
    retry_after: float | None = None
    # Succeeded with nothing sent: the account already held what the operation wanted (an update
    # whose only changes were emptied omit_if_empty attributes). Counted as unchanged, not done.
    unchanged: bool = False


@dataclass(slots=True)
class Rejections:
    """What :func:`enqueue` did with a plan's rejected records.

    ``new``: (identity key, message) of each rejection recorded now, a failed row;
    ``open``: rejections already recorded by an earlier cycle and still open;
    ``silenced``: rejections an operator resolved or cancelled for the very same record.
    """

    new: list[tuple[str, str]] = field(default_factory=list)
    open: int = 0
    silenced: int = 0


# A rejected record's row keeps the digest of the record in payload_hash (it has no payload), marked so.
RECORD_HASH_PREFIX = "record:"
# "hr.csv:12: why": the origin moves when rows above it come and go; the cause is what is compared.
_ORIGIN = re.compile(r"^.+?:\d+: ")
# "(also at line 53)": where the other records of a shared key are, which moves as much.
_OTHERS = re.compile(r" \(also at [^)]*\)")


def rejection_cause(message: str | None) -> str | None:
    """A rejection's message without its leading ``file:line:`` nor where the other records of its key are."""
    return None if message is None else _OTHERS.sub("", _ORIGIN.sub("", message, count=1), count=1)


def load_links(engine: Engine, target: str) -> dict[str, Link]:
    """Every account link of a target, without payloads: one query per planning pass.

    A link whose account owes attributes (see :attr:`LinkState.owed`) says which identities they refer to.
    """
    columns = (LINK.c.identity_key, LINK.c.scim_id, LINK.c.applied_hash, LINK.c.active, LINK.c.etag, LINK.c.owed_refs)
    with engine.connect() as conn:
        rows = driver_rows(conn.execute(select(*columns).where(LINK.c.target == target)))
    none: frozenset[str] = frozenset()
    return {key: Link(key, scim_id, applied, bool(active), etag, _owes(owed) if owed else none)
            for key, scim_id, applied, active, etag, owed in rows}  # fmt: skip


def _owes(owed_refs: str | None) -> frozenset[str]:
    """The identities an account's owed attributes refer to (most accounts owe nothing: no parsing)."""
    return frozenset(refs_in(loads(owed_refs))) if owed_refs else frozenset()


def linked_identity(engine: Engine, target: str, scim_id: str) -> str | None:
    """The identity already linked to a SCIM id in a target, if any."""
    with engine.connect() as conn:
        query = select(LINK.c.identity_key).where(LINK.c.target == target, LINK.c.scim_id == scim_id)
        return conn.execute(query).scalar()


def load_link_states(engine: Engine, target: str, keys: Sequence[str]) -> dict[str, LinkState]:
    """The full link state (with applied payloads) of some identities."""
    states: dict[str, LinkState] = {}
    with engine.connect() as conn:
        for chunk in chunks(list(keys), 500):
            rows = conn.execute(select(LINK).where(LINK.c.target == target, LINK.c.identity_key.in_(chunk)))
            for row in rows.mappings():
                states[row["identity_key"]] = LinkState(
                    scim_id=row["scim_id"],
                    active=bool(row["active"]),
                    etag=row["etag"],
                    location=row["location"],
                    applied_hash=row["applied_hash"],
                    applied=loads(row["applied"]),
                    owed=loads(row["owed_refs"]),
                )
    return states


def enqueue(
    engine: Engine,
    run_id: str,
    target: str,
    decisions: Iterable[Decision],
    rejected: Iterable[tuple[str, str, Kind, Reason]] = (),
    *,
    brake: Callable[[int], bool] | None = None,
    settled: Iterable[str] = (),
    record_hashes: Mapping[str, str] | None = None,
    rejections: Rejections | None = None,
    present: Collection[str] | None = None,
) -> int:
    """Write a plan's operations in one transaction; return how many were added.

    An identical operation still open is not queued again; an older open one for
    the same account is superseded by the new plan, unless it is running.
    ``brake`` gets the number of new deprovisioning operations; when it says so,
    they are written as ``held`` and wait for an operator's approval. Open
    operations of ``settled`` identities (already as they should be: a leaver
    back in the source before their disable was sent) are superseded; of a
    settled identity with no account linked, or one gone from ``present``, a
    create already tried is kept and sent with ``active: false`` instead.

    A rejected record is one failed row per identity and cause (its message
    without ``file:line``): the next cycle does not open another. Its
    ``record_hashes`` digest is kept on the row; once an operator resolves or
    cancels it, the same rejection of the same record stays silent until the
    record changes. ``rejections``, when given, is filled with what happened.
    With ``present`` (every identity key of the source), open rejections of
    identities no longer in the source are superseded: nothing is left to review.
    """
    now = utcnow()
    rows: list[dict[str, Any]] = []
    superseded: list[int] = []
    rejected = list(rejected)
    hashes = record_hashes or {}
    tally = rejections if rejections is not None else Rejections()
    decisions = list(decisions)
    with engine.begin() as conn:
        open_by_key = open_rows(conn, target, ACCOUNT_KINDS)
        done_meanwhile = applied_since_plan(conn, target, decisions)
        # The decisions to write; their rows are built a page at a time when written (an initial
        # load's 100,000 payloads as JSON rows at once would double the memory the plan takes).
        new = _to_write(decisions, open_by_key, done_meanwhile, superseded)
        silenced = _silenced_rejections(conn, target, [hashes[key] for key, *_ in rejected if key in hashes])
        for key, message, kind, reason in rejected:
            cause = rejection_cause(message)
            existing = open_by_key.get(key, [])
            if any(r.status == "failed" and rejection_cause(r.last_error) == cause for r in existing):
                tally.open += 1
                continue
            digest = RECORD_HASH_PREFIX + hashes[key] if key in hashes else None
            if digest is not None and (key, digest, cause) in silenced:
                tally.silenced += 1
                continue
            superseded.extend(r.id for r in existing if r.status != "running")
            row = _new_row(run_id, target, key, kind, reason, now, payload_hash=digest)
            row.update(status="failed", last_error=message, finished_at=now)
            rows.append(row)
            tally.new.append((key, message))
        # Identities with an open create that may need no account now: settled, or gone from the source.
        leaving: list[str] = []
        for key in settled:
            # A no-change cycle settles every identity: look up first, build nothing for the rest.
            stale = open_by_key.get(key)
            if stale:
                superseded.extend(r.id for r in stale if r.status != "running" and not _unconfirmed_create(r))
                leaving.append(key)
        if present is not None:
            for key, existing in open_by_key.items():
                if key not in present:
                    superseded.extend(r.id for r in existing if _is_rejection(r))
                    if any(r.kind == Kind.CREATE.value for r in existing):
                        leaving.append(key)
        superseded.extend(_leavers_creates(conn, target, leaving, open_by_key, now))
        leavers = sum(d.kind.value in DEPROVISION for d in new)
        held = brake is not None and leavers > 0 and brake(leavers)
        # The rows superseded are open ones read above, never the ones inserted here (and no index spans
        # both): the order only sets the ids, which stay the plan's before its rejections', as they were.
        _insert_decisions(conn, run_id, target, new, now, held)
        write_plan(conn, rows, superseded, now)
    return len(new) + len(rows)


class PlanWriter:
    """Writes a plan's operations page by page inside the caller's transaction, for plans too large to hold.

    :meth:`add` treats each page as :func:`enqueue` treats a whole plan (an
    identical open operation is not queued again, an older open one is
    superseded, one applied meanwhile is dropped); its rows are inserted
    ``pending``. :meth:`finish` gives ``brake`` the number of new deprovisioning
    operations of every page, and when it says so turns them ``held``: the
    transaction is still open, so nothing can claim them before the brake has
    seen the whole count. One decision per identity key across the pages.
    """

    def __init__(self, conn: Any, run_id: str, target: str) -> None:
        self.conn, self.run_id, self.target = conn, run_id, target
        self.now = utcnow()
        self.added = 0
        self.leavers = 0

    def add(self, decisions: Sequence[Decision]) -> int:
        """Write one page of decisions; return how many rows were added."""
        conn, now = self.conn, self.now
        done_meanwhile = applied_since_plan(conn, self.target, decisions)
        open_by_key = open_rows(conn, self.target, ACCOUNT_KINDS, {d.identity_key for d in decisions})
        superseded: list[int] = []
        new = _to_write(decisions, open_by_key, done_meanwhile, superseded)
        write_plan(conn, [], superseded, now)
        _insert_decisions(conn, self.run_id, self.target, new, now, False)
        self.leavers += sum(d.kind.value in DEPROVISION for d in new)
        self.added += len(new)
        return len(new)

    def finish(self, brake: Callable[[int], bool] | None) -> bool:
        """Hold this plan's new deprovisioning operations if ``brake(count)`` says so; return whether it did."""
        if brake is None or not self.leavers or not brake(self.leavers):
            return False
        self.conn.execute(
            update(OP)
            .where(OP.c.run_id == self.run_id, OP.c.target == self.target, OP.c.status == "pending",
                   OP.c.kind.in_(DEPROVISION))
            .values(status="held")
        )  # fmt: skip
        return True


def _to_write(
    decisions: Iterable[Decision], open_by_key: Mapping[str, list[Any]], done_meanwhile: Collection[str],
    superseded: list[int],
) -> list[Decision]:
    """The decisions a plan writes: not applied meanwhile, not already open as they are.

    The open rows they replace are added to ``superseded``; write-only values
    are registered for masking (a Packed payload holds none: one naming a
    write-only attribute is never packed).
    """
    new: list[Decision] = []
    for d in decisions:
        if not isinstance(d.payload, Packed):
            register_write_only(d.payload)
        if d.identity_key in done_meanwhile:
            continue
        replaced = replaced_by(open_by_key.get(d.identity_key, []), d.kind.value, d.payload_hash)
        if replaced is None:
            continue
        superseded.extend(replaced)
        new.append(d)
    return new


# Rows of a plan inserted per statement.
PLAN_PAGE = 1000


def _insert_decisions(
    conn: Any, run_id: str, target: str, new: Sequence[Decision], now: datetime, held: bool
) -> None:
    """Insert a plan's new operations a page at a time, inside the caller's transaction.

    Through the driver, the statement compiled once: SQLAlchemy's executemany
    spent more per row than SQLite took to insert it. The same transaction: the
    driver's connection under ``conn``.
    """
    if not new:
        return
    statement = _plan_insert(conn.dialect)
    cursor = conn.connection.cursor()
    try:
        for chunk in chunks(list(new), PLAN_PAGE):
            statement.run(cursor, [_decision_row(run_id, target, d, now, held) for d in chunk])
    finally:
        cursor.close()


@cache
def _plan_insert(dialect: Any) -> _Statement:
    """The plan's insert, compiled once per database (see _Statement)."""
    return _Statement(insert(OP), dialect, list(_new_row("", "", "", Kind.CREATE, Reason.JOINER, utcnow())))


def _decision_row(run_id: str, target: str, d: Decision, now: datetime, held: bool) -> dict[str, Any]:
    if isinstance(d.payload, Packed):
        # Already the text stored; it holds no write-only value (see payload.pack).
        row = _new_row(run_id, target, d.identity_key, d.kind, d.reason, now, None, d.payload_hash)
        row["payload"] = d.payload.text()
    else:
        payload = d.payload
        # Write-only values (password) are never stored: the executor renders them again when it sends.
        if has_write_only(payload):
            payload = mask_write_only(payload)
        row = _new_row(run_id, target, d.identity_key, d.kind, d.reason, now, payload, d.payload_hash)
    if held and d.kind.value in DEPROVISION:
        row["status"] = "held"
    return row


def _unconfirmed_create(row: Any) -> bool:
    """Whether an open row is a create already tried: its POST may have made the account, unlinked.

    Superseding it when the identity needs no account (a leaver before the
    retry) would leave that account active with nothing to find it by; kept,
    the retry adopts it (it looks the account up first), sent disabled
    (:func:`_leavers_creates`).
    """
    return row.kind == Kind.CREATE.value and row.status in ("pending", "retry_wait") and (row.attempts or 0) > 0


def _leavers_creates(
    conn: Any, target: str, keys: Sequence[str], open_by_key: Mapping[str, list[Any]], now: datetime
) -> list[int]:
    """The open creates of identities that need no account and have none linked: the ones to supersede.

    A settled identity with no link renders no account (out of scope, a
    leaver); one gone from the source is a leaver too. A create of theirs never
    tried made nothing and goes. One already tried may have made the account
    (:func:`_unconfirmed_create`): it is kept, and sent with ``active: false``
    (RFC 7643 §4.1.1), so that its retry makes or adopts the account disabled:
    never active, even for a cycle, for someone who has left.
    """
    if not keys:
        return []
    linked: set[str] = set()
    for chunk in chunks(list(keys), 500):
        query = select(LINK.c.identity_key).where(LINK.c.target == target, LINK.c.identity_key.in_(chunk))
        linked.update(conn.execute(query).scalars())
    drop: list[int] = []
    kept: list[int] = []
    for key in keys:
        if key in linked:
            continue  # an account to disable: the plan's own leaver operation sees to it
        for row in open_by_key.get(key, []):
            if row.kind != Kind.CREATE.value or row.status == "running":
                continue
            (kept if _unconfirmed_create(row) else drop).append(row.id)
    for chunk in chunks(kept, 500):
        rows = conn.execute(select(OP.c.id, OP.c.payload, OP.c.payload_hash).where(OP.c.id.in_(chunk))).all()
        for op_id, text, digest in rows:
            payload = loads(text)
            if not isinstance(payload, dict) or payload.get("active") is False:
                continue
            conn.execute(
                update(OP)
                .where(OP.c.id == op_id)
                .values(
                    payload=dumps({**payload, "active": False}),
                    # Another hash: a rehire's create replaces this one rather than matching it.
                    payload_hash=f"{LEFT_HASH_PREFIX}{digest or ''}",
                    updated_at=now,
                    note="the identity needs no account now; sent disabled, as the account it may have made",
                )
            )
    return drop


# Marks the payload hash of a kept create rewritten to make or adopt its account disabled.
LEFT_HASH_PREFIX = "left:"


def _is_rejection(row: Any) -> bool:
    return row.status == "failed" and (row.payload_hash or "").startswith(RECORD_HASH_PREFIX)


def _silenced_rejections(conn: Any, target: str, digests: list[str]) -> set[tuple[str, str, str | None]]:
    """(identity key, record digest, cause) of the rejections an operator resolved or cancelled."""
    found: set[tuple[str, str, str | None]] = set()
    for chunk in chunks(sorted({RECORD_HASH_PREFIX + d for d in digests}), 500):
        query = select(OP.c.identity_key, OP.c.payload_hash, OP.c.last_error).where(
            OP.c.target == target, OP.c.status.in_(("resolved", "cancelled")), OP.c.payload_hash.in_(chunk)
        )
        found.update((row[0], row[1], rejection_cause(row[2])) for row in conn.execute(query))
    return found


def applied_since_plan(conn: Any, target: str, decisions: Sequence[Decision]) -> set[str]:
    """Identities whose planned create or update another instance applied after the plan read the links.

    Planning reads the links, then writes the plan; on a shared database other
    instances send meanwhile. An operation they finished in between is no
    longer open, yet the plan still wants it: a create whose account is linked
    now, or an update whose payload is the one applied now, would be sent twice.
    """
    keys = [d.identity_key for d in decisions if d.kind in (Kind.CREATE, Kind.UPDATE, Kind.ENABLE)]
    wanted = {d.identity_key: d for d in decisions}
    moot: set[str] = set()
    for chunk in chunks(keys, 500):
        query = select(LINK.c.identity_key, LINK.c.applied_hash, LINK.c.active).where(
            LINK.c.target == target, LINK.c.identity_key.in_(chunk)
        )
        for key, applied_hash, active in conn.execute(query):
            d = wanted[key]
            if d.kind is Kind.CREATE or (applied_hash == d.payload_hash and bool(active)):
                moot.add(key)
    return moot


def open_rows(
    conn: Any, target: str, kinds: Sequence[str], identities: Collection[str] | None = None
) -> dict[str, list[Any]]:
    """A target's open operations of some kinds, by identity (or group) key.

    With ``identities``, only theirs (read 500 keys per query). Read ``FOR
    UPDATE`` on PostgreSQL: until the caller's transaction ends, no other
    instance claims them, so a row the plan supersedes is not being sent
    meanwhile (SQLite's ``BEGIN IMMEDIATE`` already keeps claimers out).
    """
    query = (
        select(OP.c.id, OP.c.identity_key, OP.c.kind, OP.c.payload_hash, OP.c.status, OP.c.last_error, OP.c.attempts)
        .where(OP.c.target == target, OP.c.status.in_(OPEN), OP.c.kind.in_(kinds))
        .with_for_update()
    )
    queries = [query] if identities is None else [
        query.where(OP.c.identity_key.in_(chunk)) for chunk in chunks(sorted(identities), 500)
    ]  # fmt: skip
    by_key: dict[str, list[Any]] = {}
    for each in queries:
        for row in conn.execute(each):
            by_key.setdefault(row.identity_key, []).append(row)
    return by_key


def replaced_by(existing: list[Any], kind: str, payload_hash: str | None) -> list[int] | None:
    """The open rows a new operation replaces, or None when it is queued already (or one is running)."""
    if any(r.status == "running" or (r.kind == kind and r.payload_hash == payload_hash) for r in existing):
        return None
    return [r.id for r in existing]


def write_plan(conn: Any, rows: list[dict[str, Any]], superseded: list[int], now: datetime) -> None:
    """Insert a plan's new rows and mark the open rows they replace, inside the caller's transaction."""
    for chunk in chunks(superseded, 500):
        conn.execute(
            update(OP)
            .where(OP.c.id.in_(chunk))
            .values(status="superseded", updated_at=now, finished_at=now, note="replaced by a newer plan")
        )
    if rows:
        conn.execute(insert(OP), rows)


def count_status(engine: Engine, target: str, status: str) -> int:
    """How many operations of a target are in a status."""
    with engine.connect() as conn:
        query = select(func.count()).select_from(OP).where(OP.c.target == target, OP.c.status == status)
        return int(conn.execute(query).scalar_one())


def release_held(engine: Engine, run_id: str, *, approve: bool, note: str | None = None) -> int:
    """Approve (back to pending) or reject (cancelled) a run's held operations; return how many."""
    now = utcnow()
    values: dict[str, Any] = {"status": "pending", "updated_at": now} if approve else {
        "status": "cancelled", "updated_at": now, "finished_at": now
    }  # fmt: skip
    values["note"] = note or ("approved by an operator" if approve else "rejected by an operator")
    with engine.begin() as conn:
        result = conn.execute(update(OP).where(OP.c.run_id == run_id, OP.c.status == "held").values(**values))
        return int(result.rowcount)


def _new_row(
    run_id: str,
    target: str,
    key: str,
    kind: Kind,
    reason: Reason,
    now: datetime,
    payload: dict[str, Any] | None = None,
    payload_hash: str | None = None,
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "target": target,
        "identity_key": key,
        "kind": kind.value,
        "reason": reason.value,
        "status": "pending",
        "payload": None if payload is None else dumps(payload),
        "payload_hash": payload_hash,
        "attempts": 0,
        "next_attempt_at": None,
        "lease_until": None,
        "last_http_status": None,
        "last_scim_type": None,
        "last_detail": None,
        "last_error": None,
        "note": None,
        "created_at": now,
        "updated_at": now,
        "finished_at": None,
    }


# What a claimer reads of a row: converting the other timestamps of a page of 1,000 rows cost more than the claim.
_CLAIMED = (OP.c.id, OP.c.identity_key, OP.c.kind, OP.c.reason, OP.c.payload, OP.c.payload_hash, OP.c.attempts,
            OP.c.created_at, OP.c.last_error)  # fmt: skip


def claim_rows(
    engine: Engine,
    target: str,
    kinds: Sequence[str],
    *,
    now: datetime | None = None,
    lease: timedelta | None = None,
    limit: int | None = None,
    identities: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """Take due rows of some kinds in the order they became due: pending, retry_wait that is due, or
    running with an expired lease. ``identities``: only the rows of these identity (or group) keys.

    A row becomes due when it is created, when its retry time comes, or when it is
    given back unsent (:func:`release` stamps that time): a row given back waits its
    turn behind those already due, instead of going first again and again.

    Each row is stamped ``running``, ``claimed_by`` this instance (see
    :func:`identify`) and ``lease_until`` now + ``lease`` (default: the
    instance's). On PostgreSQL the rows are read ``FOR UPDATE SKIP LOCKED``:
    instances claiming at once take disjoint rows without waiting for each
    other, and one claim takes at most :data:`SHARED_CLAIM` rows. On SQLite the
    transaction is ``BEGIN IMMEDIATE`` (see ``provisioner.store``), which
    serialises claimers.

    Returns the rows as they were before the claim, ``attempts`` not yet counted: ``id``,
    ``identity_key``, ``kind``, ``reason``, ``payload``, ``payload_hash``, ``attempts``,
    ``created_at`` and ``last_error``.
    """
    names = [column.key for column in _CLAIMED]
    return [dict(zip(names, row)) for row in _claim(engine, target, kinds, now, lease, limit, identities)]


def _claim(
    engine: Engine,
    target: str,
    kinds: Sequence[str],
    now: datetime | None,
    lease: timedelta | None,
    limit: int | None,
    identities: Collection[str] | None,
) -> list[tuple[Any, ...]]:
    """claim_rows' work: the rows as tuples of :data:`_CLAIMED`, ``created_at`` aware (UTC)."""
    now = now or utcnow()
    me = claimant()
    lease = me.lease if lease is None else lease
    if engine.dialect.name == "postgresql":
        limit = SHARED_CLAIM if limit is None else min(limit, SHARED_CLAIM)
    due = and_(
        OP.c.target == target,
        # Implied by what follows; said so that both databases see they may walk ix_operation_claim.
        CLAIMABLE,
        OP.c.kind.in_(kinds),
        or_(
            OP.c.status == "pending",
            and_(OP.c.status == "retry_wait", OP.c.next_attempt_at <= now),
            and_(OP.c.status == "running", OP.c.lease_until < now),
        ),
    )
    if identities is not None:
        due = and_(due, OP.c.identity_key.in_(list(identities)))
    order = (func.coalesce(OP.c.next_attempt_at, OP.c.created_at), OP.c.id)
    query = select(*_CLAIMED).where(due).order_by(*order).limit(limit).with_for_update(skip_locked=True)
    with engine.begin() as conn:
        # The driver's rows: SQLAlchemy's row processing was most of a claim's CPU; the one
        # timestamp is converted below, as the column type would.
        rows = driver_rows(conn.execute(query))
        for chunk in chunks([row[0] for row in rows], 500):
            conn.execute(
                update(OP)
                .where(OP.c.id.in_(chunk))
                .values(status="running", claimed_by=me.name, lease_until=now + lease,
                        attempts=OP.c.attempts + 1, updated_at=now)  # fmt: skip
            )
    # The driver's timestamp: SQLite's is text; both are naive UTC (the column has no zone).
    return [(*row[:7], as_utc(datetime.fromisoformat(row[7]) if isinstance(row[7], str) else row[7]), row[8])
            for row in rows]  # fmt: skip


# The enumerations by stored value: a dict look-up costs a fifth of calling the enum.
_KINDS = {kind.value: kind for kind in Kind}
_REASONS = {reason.value: reason for reason in Reason}


def claim(
    engine: Engine,
    target: str,
    *,
    now: datetime | None = None,
    lease: timedelta | None = None,
    limit: int | None = None,
    identities: Collection[str] | None = None,
) -> list[ClaimedOperation]:
    """Take due account operations of a target, oldest first (see :func:`claim_rows`)."""
    rows = _claim(engine, target, ACCOUNT_KINDS, now, lease, limit, identities)
    return [
        ClaimedOperation(op_id, key, _KINDS[kind], _REASONS[reason], loads(payload), payload_hash, attempts + 1,
                         created_at, last_error is not None)  # fmt: skip
        for op_id, key, kind, reason, payload, payload_hash, attempts, created_at, last_error in rows
    ]


def release(engine: Engine, operation_ids: Sequence[int]) -> None:
    """Give claimed operations that were never started back to the queue, at the end of the line.

    Their attempt is not counted; they are due again from now, so :func:`claim_rows`
    takes the rows that were already waiting first. Only while this instance still
    holds them: a row whose lease ran out may be another's now.
    """
    if not operation_ids:
        return
    now = utcnow()
    with engine.begin() as conn:
        for chunk in chunks(list(operation_ids), 500):
            conn.execute(
                update(OP)
                .where(OP.c.id.in_(chunk), OP.c.status == "running", OP.c.claimed_by == claimant().name)
                .values(status="pending", lease_until=None, attempts=OP.c.attempts - 1, updated_at=now,
                        next_attempt_at=now)  # fmt: skip
            )


def renew_leases(engine: Engine, *, now: datetime | None = None) -> int:
    """Extend the lease of every operation this instance holds running; return how many.

    The daemon calls this well within a lease while it runs, so that a long
    call is never taken back from a live instance; a dead one stops renewing
    and its rows fall due when their lease ends.
    """
    now = now or utcnow()
    me = claimant()
    with engine.begin() as conn:
        result = conn.execute(
            update(OP)
            .where(OP.c.status == "running", OP.c.claimed_by == me.name)
            .values(lease_until=now + me.lease)
        )
        return int(result.rowcount)


def recover_orphans(engine: Engine, target: str | None = None, *, now: datetime | None = None) -> int:
    """Operations left running by a process that died: pending again, now.

    Which ones: on SQLite every running row (one process per state file holds
    the state lock, so nobody else can be running them); on a shared database
    only this instance's own rows (a restart under the same ``daemon.instance``)
    and rows whose lease has expired, never another live instance's.
    A retried create looks the account up before POSTing, so nothing is duplicated.
    """
    now = now or utcnow()
    where = OP.c.status == "running"
    if engine.dialect.name != "sqlite":
        where = and_(where, or_(OP.c.claimed_by == claimant().name, OP.c.lease_until < now, OP.c.lease_until.is_(None)))
    if target is not None:
        where = and_(where, OP.c.target == target)
    with engine.begin() as conn:
        result = conn.execute(
            update(OP).where(where).values(status="pending", lease_until=None, updated_at=now,
                                           note="recovered after an interrupted run")  # fmt: skip
        )
        return int(result.rowcount)


# Statements of the hot path, built once: building one per call costs more than running it.
_FINISH = (
    update(OP)
    .where(OP.c.id == bindparam("op_id"))
    .values(
        status=bindparam("status"),
        updated_at=bindparam("now"),
        lease_until=None,
        last_http_status=bindparam("http_status"),
        last_scim_type=bindparam("scim_type"),
        last_detail=bindparam("detail"),
        last_error=bindparam("error"),
        note=func.coalesce(bindparam("note"), OP.c.note),
        next_attempt_at=bindparam("next_attempt_at"),
        finished_at=bindparam("finished_at"),
    )
)
_INSERT_CALL = insert(ATTEMPT)
_DROP_LINK = delete(LINK).where(LINK.c.target == bindparam("t"), LINK.c.identity_key == bindparam("k"))
_LINK_VALUES = ("scim_id", "active", "etag", "location", "applied_hash", "applied", "owed_refs", "updated_at")


@cache
def _upsert_link(dialect: str) -> Any:
    """INSERT … ON CONFLICT DO UPDATE for the link table, in the database's own dialect."""
    return upsert(LINK, ("target", "identity_key"), _LINK_VALUES, dialect)


class Finished(Protocol):
    """What any operation's outcome tells the queue (accounts' and groups' alike)."""

    operation_id: int
    status: str
    note: str | None
    error: str | None
    http_status: int | None
    scim_type: str | None
    detail: str | None
    calls: list[CallRecord]
    attempt: int
    retry_after: float | None


def next_attempt(outcome: Finished, now: datetime) -> datetime:
    """When a waiting operation is due again: when the target asked (Retry-After), else the retry schedule."""
    if outcome.retry_after is not None:
        return now + timedelta(seconds=min(max(outcome.retry_after, 0.0), MAX_RETRY_AFTER.total_seconds()))
    return now + retry_delay(outcome.attempt)


def finish(conn: Any, outcome: Finished, now: datetime) -> None:
    """Write an operation's status and the calls made for it, inside the caller's transaction."""
    conn.execute(_FINISH, _finish_row(outcome, now))
    if outcome.calls:
        conn.execute(_INSERT_CALL, [_call_row(outcome, call) for call in outcome.calls])


def _finish_row(outcome: Finished, now: datetime) -> dict[str, Any]:
    waits = outcome.status == "retry_wait"
    return {
        "op_id": outcome.operation_id,
        "status": outcome.status,
        "now": now,
        "http_status": outcome.http_status,
        "scim_type": outcome.scim_type,
        "detail": cap(outcome.detail),
        "error": cap(outcome.error),
        "note": outcome.note,
        "next_attempt_at": next_attempt(outcome, now) if waits else None,
        "finished_at": now if outcome.status in ("succeeded", "failed") else None,
    }


def record_many(engine: Engine, target: str, outcomes: Sequence[tuple[str, Outcome]]) -> None:
    """Write several outcomes (``(identity key, outcome)``), their calls and links in one transaction.

    The same rows as :func:`record` writes for each, in one statement per table
    (a group commit): the cost of a transaction is paid once for the outcomes of
    every worker that finished meanwhile. When a link cannot be written (an
    account linked to another identity meanwhile), nothing of the group is kept
    and each outcome is written again on its own by :func:`record`, which sends
    that one to review.
    """
    now = utcnow()
    finished = [_finish_row(outcome, now) for _, outcome in outcomes]
    calls = [_call_row(outcome, call) for _, outcome in outcomes for call in outcome.calls]
    dropped = [{"t": target, "k": key} for key, outcome in outcomes if outcome.drop_link]
    links = [_link_row(target, key, outcome.link, now) for key, outcome in outcomes
             if outcome.link is not None and not outcome.drop_link]  # fmt: skip
    writer = _writer(engine.dialect)
    # The driver's own connection: SQLAlchemy's execution machinery costs ten times the statements' own work here.
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        try:
            if writer.begin:
                cursor.execute(writer.begin)
            writer.finish.run(cursor, finished)
            writer.call.run(cursor, calls)
            writer.drop.run(cursor, dropped)
            writer.upsert.run(cursor, links)
            raw.commit()
        except writer.integrity_error:
            raw.rollback()
        else:
            return
        finally:
            cursor.close()
    except BaseException:
        raw.rollback()
        raise
    finally:
        raw.close()
    for key, outcome in outcomes:
        record(engine, target, key, outcome)


class _Statement:
    """A Core statement compiled once for a database, run with executemany on a driver cursor."""

    def __init__(self, statement: Any, dialect: Any, column_keys: Sequence[str] | None = None) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=column_keys)
        self.sql = compiled.string
        self.positional = compiled.positiontup is not None
        names = compiled.positiontup if self.positional else [n for n in compiled.binds if f"%({n})s" in self.sql]
        # (name, value when the row has none, the type's conversion for this database) per parameter.
        self.params = [
            (name, compiled.binds[name].effective_value if not compiled.binds[name].required else None,
             compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect))
            for name in names
        ]  # fmt: skip

    def run(self, cursor: Any, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if self.positional:
            values: list[Any] = [
                [process(row.get(name, default)) if process else row.get(name, default)
                 for name, default, process in self.params]
                for row in rows
            ]  # fmt: skip
        else:
            values = [
                {name: process(row.get(name, default)) if process else row.get(name, default)
                 for name, default, process in self.params}
                for row in rows
            ]  # fmt: skip
        cursor.executemany(self.sql, values)


@dataclass(slots=True)
class _Writer:
    begin: str | None
    finish: _Statement
    call: _Statement
    drop: _Statement
    upsert: _Statement
    integrity_error: type[Exception]


_CALL_KEYS = ("operation_id", "number", "started_at", "duration_ms", "method", "url", "http_status", "scim_type",
              "detail", "error", "request_body", "response_body")  # fmt: skip


@cache
def _writer(dialect: Any) -> _Writer:
    """The statements of :func:`record_many`, compiled once per database."""
    return _Writer(
        # SQLite: the write lock at once, as every transaction of the store takes it (see provisioner.store).
        begin="BEGIN IMMEDIATE" if dialect.name == "sqlite" else None,
        finish=_Statement(_FINISH, dialect),
        call=_Statement(_INSERT_CALL, dialect, _CALL_KEYS),
        drop=_Statement(_DROP_LINK, dialect),
        upsert=_Statement(_upsert_link(dialect.name), dialect, ("target", "identity_key", *_LINK_VALUES)),
        integrity_error=dialect.loaded_dbapi.IntegrityError,
    )


class GroupCommit:
    """Outcomes of concurrent workers written together, in groups of up to ``max_group``.

    A worker hands its outcome in with :meth:`hand_in` and goes on to its next
    operation; ``then`` runs once the outcome is committed. Whatever counts an
    operation as done belongs in ``then``: nothing counts before it is recorded,
    as with :func:`record`. A group is written by :func:`record_many` in one
    transaction when it holds ``max_group`` outcomes, ``max_wait`` seconds after
    its first one, at once when an outcome is not a success (the quarantine's
    count of failures in a row must not lag), and by :meth:`close`.

    A transaction costs about as much as writing a dozen rows (SQLite: ~190 µs
    for a group of one, ~65 µs an outcome in a group of 16), so a worker that
    waited for its own outcome's commit kept groups to one or two. An outcome
    handed in but not yet written when the process dies is an operation sent
    and not recorded, as a crash between a send and its record always was: its
    row stays claimed until its lease runs out, and its retry looks the account
    up before creating it again. A group that cannot be written is kept as the
    error, which :meth:`hand_in` and :meth:`close` raise; its outcomes' ``then``
    never run. Create it inside the running event loop.
    """

    def __init__(self, engine: Engine, target: str, *, max_group: int = 64, max_wait: float = 0.02) -> None:
        self.engine = engine
        self.target = target
        self.max_group = max_group
        self.max_wait = max_wait
        self.error: BaseException | None = None
        self._loop = asyncio.get_running_loop()
        self._waiting: list[tuple[str, Outcome, Callable[[], None]]] = []
        self._timer: asyncio.TimerHandle | None = None

    def hand_in(self, identity_key: str, outcome: Outcome, then: Callable[[], None]) -> None:
        """Queue one outcome for writing; ``then()`` runs once it is committed. Raises an earlier group's error."""
        if self.error is not None:
            raise self.error
        self._waiting.append((identity_key, outcome, then))
        if len(self._waiting) >= self.max_group or outcome.status != "succeeded":
            self.flush()
            if self.error is not None:
                raise self.error
        elif self._timer is None:
            self._timer = self._loop.call_later(self.max_wait, self.flush)

    def flush(self) -> None:
        """Write every outcome handed in and not written yet, now, then run their ``then``."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        group, self._waiting = self._waiting, []
        if not group or self.error is not None:
            return
        try:
            record_many(self.engine, self.target, [(key, outcome) for key, outcome, _ in group])
        except Exception as exc:  # noqa: BLE001 - kept for hand_in() and close() to raise in the workers' task
            self.error = exc
            return
        for *_, then in group:
            then()

    def close(self) -> None:
        """Write what is still waiting; raise the error of any group that could not be written."""
        self.flush()
        if self.error is not None:
            raise self.error


def record(engine: Engine, target: str, identity_key: str, outcome: Outcome) -> None:
    """Write an operation's outcome, its calls and the link it leaves, in one transaction.

    If the account is linked to another identity meanwhile (two identities with
    one userName, adopting the same account at once), the operation goes to
    review instead, without the link.
    """
    now = utcnow()
    try:
        with engine.begin() as conn:
            finish(conn, outcome, now)
            if outcome.drop_link:
                conn.execute(_DROP_LINK, {"t": target, "k": identity_key})
            elif outcome.link is not None:
                conn.execute(_upsert_link(engine.dialect.name), _link_row(target, identity_key, outcome.link, now))
    except IntegrityError:
        if outcome.link is None:
            raise
        scim_id = outcome.link.scim_id
        owner = linked_identity(engine, target, scim_id)
        outcome.status, outcome.link = "failed", None
        outcome.error = f"account {scim_id} is already linked to identity {owner}; not linked twice"
        with engine.begin() as conn:
            finish(conn, outcome, now)


def _call_row(outcome: Finished, call: CallRecord) -> dict[str, Any]:
    return {
        "operation_id": outcome.operation_id,
        "number": outcome.attempt,
        "started_at": call.started_at,
        "duration_ms": round(call.duration_ms, 2),
        "method": call.method,
        "url": call.url and redact(call.url),
        "http_status": call.http_status,
        "scim_type": call.scim_type,
        "detail": cap(call.detail),
        "error": cap(call.error),
        "request_body": None if call.request_body is None else cap(_body_text(call.request_body)),
        "response_body": cap(call.response_body),
    }


def _link_row(target: str, key: str, link: LinkState, now: datetime) -> dict[str, Any]:
    return {
        "target": target,
        "identity_key": key,
        "scim_id": link.scim_id,
        "active": link.active,
        "etag": link.etag,
        "location": link.location,
        "applied_hash": link.applied_hash,
        # Write-only values (password) are never kept once applied.
        "applied": None if link.applied is None else _body_text(link.applied),
        "owed_refs": dumps(link.owed) if link.owed else None,
        "updated_at": now,
    }


def remember_payload(engine: Engine, operation_id: int, payload: Mapping[str, Any]) -> None:
    """Store what an operation sends where its plan left a choice (a unique_username()), so that a retry sends the same.

    ``payload`` as the row holds it: write-only values masked.
    """
    with engine.begin() as conn:
        conn.execute(update(OP).where(OP.c.id == operation_id).values(payload=_body_text(dict(payload))))


def _body_text(body: Any) -> str:
    """A payload or request body as stored: write-only attributes masked by name.

    (A secret's value anywhere else is masked by ``cap``.)
    """
    text = dumps(body)
    return dumps(mask_write_only(body)) if names_write_only(text) else text


def give_up_if_too_old(claimed: ClaimedOperation, now: datetime | None = None) -> bool:
    """Whether a transient failure has been retried for longer than the maximum age."""
    return (now or utcnow()) - claimed.created_at > MAX_RETRY_AGE


def list_operations(
    engine: Engine,
    *,
    status: str | None = None,
    target: str | None = None,
    identity: str | None = None,
    reason: str | None = None,
    since: datetime | None = None,
    limit: int = 200,
) -> list[dict[str, Any]]:
    """Operations, newest first, filtered as an operator asks."""
    query = select(OP).order_by(OP.c.id.desc()).limit(limit)
    if reason:
        query = query.where(OP.c.reason == reason)
    if since:
        query = query.where(OP.c.updated_at >= since)
    if status:
        query = query.where(OP.c.status == status)
    if target:
        query = query.where(OP.c.target == target)
    if identity:
        query = query.where(OP.c.identity_key == identity)
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(query).mappings()]


def get_operation(engine: Engine, operation_id: int) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """One operation and every HTTP call made for it, or None."""
    with engine.connect() as conn:
        row = conn.execute(select(OP).where(OP.c.id == operation_id)).mappings().first()
        if row is None:
            return None
        calls = conn.execute(
            select(ATTEMPT).where(ATTEMPT.c.operation_id == operation_id).order_by(ATTEMPT.c.id)
        ).mappings()
        return dict(row), [dict(call) for call in calls]


def cap(text: str | None) -> str | None:
    """Text as stored in the queue: secrets masked, capped in size."""
    if text is None:
        return None
    text = redact(text)
    return text if len(text) <= BODY_CAP else text[:BODY_CAP] + f"… ({len(text) - BODY_CAP} more characters)"


# What an operator may do to an operation in each status.
RETRYABLE = ("failed", "retry_wait", "cancelled")
RESOLVABLE = ("failed", "retry_wait", "held", "pending")
CANCELLABLE = ("failed", "retry_wait", "held", "pending")


@dataclass(frozen=True, slots=True)
class Selection:
    """Which operations an operator's command applies to: ids, or filters."""

    ids: tuple[int, ...] = ()
    status: str | None = None
    target: str | None = None

    def where(self, allowed: tuple[str, ...]) -> Any:
        """The SQL condition: the selection, restricted to the statuses the action allows."""
        clauses = [OP.c.status.in_(allowed)]
        if self.ids:
            clauses.append(OP.c.id.in_(self.ids))
        if self.status:
            clauses.append(OP.c.status == self.status)
        if self.target:
            clauses.append(OP.c.target == self.target)
        return and_(*clauses)


def retry_now(engine: Engine, selection: Selection) -> tuple[int, int]:
    """Put selected operations back to pending, due now; return (retried, skipped).

    Records that could not be mapped carry no payload: they are fixed in the
    source and replanned by the next cycle, so they are skipped here.
    """
    now = utcnow()
    no_payload = and_(OP.c.payload.is_(None), OP.c.kind.in_((Kind.CREATE.value, Kind.UPDATE.value, Kind.ENABLE.value)))
    with engine.begin() as conn:
        skipped = conn.execute(select(func.count()).select_from(OP).where(selection.where(RETRYABLE), no_payload))
        skipped_count = int(skipped.scalar_one())
        result = conn.execute(
            update(OP)
            .where(selection.where(RETRYABLE), ~no_payload)
            .values(status="pending", next_attempt_at=None, finished_at=None, updated_at=now, note="retried by an operator")
        )
        return int(result.rowcount), skipped_count


def close(engine: Engine, selection: Selection, *, status: str, note: str | None) -> int:
    """Mark selected operations resolved (handled by hand) or cancelled; kept for audit."""
    allowed = RESOLVABLE if status == "resolved" else CANCELLABLE
    now = utcnow()
    text = note or f"{status} by an operator"
    with engine.begin() as conn:
        result = conn.execute(
            update(OP).where(selection.where(allowed)).values(status=status, note=text, updated_at=now, finished_at=now)
        )
        return int(result.rowcount)


def status_by_target(engine: Engine) -> dict[str, dict[str, int]]:
    """Operation counts by target and status."""
    return counts_by_target(engine, OP.c.status)


def running_by_instance(engine: Engine) -> dict[str, dict[str, int]]:
    """Running operations by target and the instance that claimed them (``claimed_by``)."""
    counts = counts_by_target(engine, OP.c.claimed_by, OP.c.status == "running")
    return {target: {instance or "unknown": n for instance, n in by.items()} for target, by in counts.items()}


# Finished operations an operator no longer needs: what retention deletes.
PRUNABLE = ("succeeded", "superseded", "cancelled", "resolved")


def prune(engine: Engine, older_than: datetime) -> int:
    """Delete finished operations (and their calls) last updated before a time; return how many."""
    old = and_(OP.c.status.in_(PRUNABLE), OP.c.updated_at < older_than)
    with engine.begin() as conn:
        ids = [row[0] for row in conn.execute(select(OP.c.id).where(old))]
        for chunk in chunks(ids, 500):
            conn.execute(delete(ATTEMPT).where(ATTEMPT.c.operation_id.in_(chunk)))
            conn.execute(delete(OP).where(OP.c.id.in_(chunk)))
    return len(ids)
