"""Reconciliation: read what a target really holds, name each account's situation, react through the queue.

Situations are midPoint's synchronization situations:

- ``linked``: the account of an identity by its stored link; ``drift`` lists
  the attribute paths whose value in the target differs from the desired
  payload (``active`` included), for the attributes the mapping sets only,
  and of those the ones the planner compares and a target can return (no
  ``when: create`` attribute, no write-only ``password``: :func:`comparable`);
- ``unlinked``: the match attribute (``userName`` case-insensitively, RFC 7643
  §4.1.1) gives the account to an identity in scope that has none linked yet;
- ``unmatched``: no identity in scope owns the account (an orphan);
- ``deleted``: linked, but the target answers 404 for its id (a GET confirms
  it: a missing account on a page is not proof, a page may be incomplete);
- ``disputed``: a second account for an identity that already has one, or one
  account the match attribute gives to several identities.

Two layers. :class:`Classifier`, :func:`drift` and :func:`plan_repairs` are
purely computational, no side effects (the classifier keeps its per-account
state in a :class:`Spill`, a private temporary SQLite database, so that memory
does not grow with the accounts). :func:`reconcile_target` does the I/O: it
reads the source once and streams the target's accounts (paged,
``attributes=``), confirms missing links with a GET, and with ``repair``
writes each reaction as an ordinary queue operation — through the deletion
brake (member removals under ``group_members: exact`` through the member
brake), sent the way a cycle's operations are. The reactions are planned and
written a page of findings at a time, the groups and their members are kept
in the spill too, and ``reconcile --json`` is written as the findings are read
(:meth:`ReconcileReport.json_chunks`): nothing holds every account at once.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Container, Iterable, Iterator, Mapping, MutableSet, Sequence, Set
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, overload

import orjson
import structlog
from sqlalchemy import Engine, delete, func, insert, select, update

from connectors import NotFound, PermanentError
from provisioner import metrics
from provisioner.config import Config, ReconcileConfig, parse_duration
from provisioner.errors import SafetyStop
from provisioner.functions import Unique
from provisioner.mapping import AttributeMapping, MappingError
from provisioner.payload import dumps, flatten, loads, payload_hash, refs_in, resolve_refs, without
from provisioner.planner import Decision, Kind, Link, Reason, brake_trips, compared, match_key
from provisioner.queue import DEPROVISION
from provisioner.quirks import load_quirks
from provisioner.redaction import WRITE_ONLY, mask_write_only
from provisioner.sources import BadRecord, IdentityRecord, read_source
from provisioner.store import AccountLink, Operation, ReconcileRun, UnmatchedAccount, as_utc, utcnow
from provisioner.targets import TargetSession

if TYPE_CHECKING:
    from provisioner.groups import GroupDefinitions

log = structlog.get_logger("provisioner.reconcile")

LINK_TABLE = AccountLink.__table__
OPERATIONS = Operation.__table__
RUNS = ReconcileRun.__table__
UNMATCHED = UnmatchedAccount.__table__
# Queue rows for an account that no identity owns carry this key prefix and the account's id.
ORPHAN_PREFIX = "unmatched:"


class Situation(StrEnum):
    """midPoint's synchronization situations of an account."""

    LINKED = "linked"
    UNLINKED = "unlinked"
    UNMATCHED = "unmatched"
    DELETED = "deleted"
    DISPUTED = "disputed"


@dataclass(frozen=True, slots=True)
class Identity:
    """What the source says of one identity in a target.

    ``desired``: the desired SCIM payload as compact JSON (references resolved
    where their accounts are linked, else kept as ``Ref``); None when the identity must not have an active
    account (a leaver, out of scope, gone from the source). ``known`` is False
    for a record that could not be read or rendered: its desired state is
    unknown, so nothing is compared or repaired for it. Build with :meth:`of`.
    """

    key: str
    desired: str | None
    link: Link | None = None
    known: bool = True
    # The payload's value of the mapping's match attribute, and its userName.
    match_value: str | None = None
    user_name: str | None = None
    # A digest of what the comparison looks at, and the shape that says what that is (interned:
    # shared by most identities). An account whose digest matches holds what the mapping sets,
    # with no payload decoded; one whose digest differs is compared with the payload (:func:`drift`).
    digest: bytes | None = None
    shape: tuple[tuple[str, str, tuple[str, ...]], ...] | None = None

    @classmethod
    def of(
        cls, key: str, payload: dict[str, Any] | None, link: Link | None = None, *, known: bool = True,
        match: str = "userName", shapes: dict[Any, Any] | None = None,
        create_only: frozenset[tuple[str, ...]] = frozenset(), compared: Mapping[str, Any] | None = None,
    ) -> Identity:
        """An identity from its desired payload (None: no active account); with a digest when given ``shapes`` to intern into.

        ``create_only``: the mapping's ``when: create`` paths, left out of the digest as :func:`comparable` leaves them.
        ``compared``: ``flatten(comparable(payload, create_only))`` when the caller has it already (see :func:`shape_of`).
        """
        if payload is None:
            return cls(key, None, link, known)
        value, user_name = payload.get(match), payload.get("userName")
        value = value if isinstance(value, str) and value else None
        user_name = user_name if isinstance(user_name, str) else None
        if shapes is None:
            return cls(key, dumps(payload), link, known, value, user_name)
        shape = shape_of(payload, create_only, compared=compared)
        shape = shapes.setdefault(shape, shape)
        return cls(key, dumps(payload), link, known, value, user_name, fingerprint(shape, flatten(payload)), shape)

    @property
    def wants_account(self) -> bool:
        """Whether the source wants this identity to have an active account."""
        return self.desired is not None

    @property
    def payload(self) -> dict[str, Any] | None:
        """The desired payload, decoded anew on each access."""
        return loads(self.desired)


@dataclass(slots=True)
class Finding:
    """One account's situation. ``identity`` is None for an orphan; several keys joined for one claimed twice."""

    situation: Situation
    identity: str | None
    id: str | None
    user_name: str | None
    # The account's ``active`` as the target says (None: not said, or the account is gone).
    active: bool | None = None
    # The drifted paths with the target's values (None: absent), for a repair that PATCHes only those.
    # None when nothing drifted: most accounts, so no empty dict is held for each.
    observed: dict[str, Any] | None = None

    @property
    def drift(self) -> list[str]:
        """The attribute paths whose value in the target differs from the desired payload."""
        return list(self.observed) if self.observed else []

    def as_dict(self) -> dict[str, Any]:
        """The shape ``reconcile --json`` prints for one account."""
        return {
            "situation": self.situation.value,
            "identity": self.identity,
            "id": self.id,
            "userName": self.user_name,
            "drift": list(self.drift),
        }


@dataclass(slots=True)
class GroupFinding:
    """One group of the target and its situation.

    ``linked``: a group a rule defines, by its stored group link;
    ``unlinked``: no link yet, but its displayName is one a rule defines (the
    next cycle links it); ``unmatched``: no rule defines it; ``deleted``: linked,
    and the target answers 404. ``foreign_members``: members of a linked group
    that are not accounts we manage (account ids, or the values the target lists).
    """

    situation: Situation
    group: str | None
    id: str | None
    display_name: str | None
    foreign_members: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The shape ``reconcile --json`` prints for one group."""
        return {
            "situation": self.situation.value,
            "group": self.group,
            "id": self.id,
            "displayName": self.display_name,
            "foreign_members": list(self.foreign_members),
        }


# --- comparing ---------------------------------------------------------------------------------

# String attributes compared case-insensitively: userName is caseExact false (RFC 7643 §4.1.1), and
# e-mail addresses are compared as people read them. Every other string must match exactly.
_CASELESS_PATHS = {"username"}
_CASELESS_SUB_ATTRIBUTES = {("emails", "value"), ("emails", "type"), ("phonenumbers", "type"), ("addresses", "type")}


def get_path(resource: Mapping[str, Any], path: str) -> Any:
    """The value at a flattened attribute path (``name.givenName``, ``urn:…:User:department``), or None.

    Attribute names are case-insensitive (RFC 7643 §2.1).
    """
    if path.startswith("urn:"):
        urn, _, sub = path.rpartition(":")
        container = _get(resource, urn)
        return _get(container, sub) if isinstance(container, Mapping) else None
    if "." in path:
        parent, _, sub = path.partition(".")
        container = _get(resource, parent)
        return _get(container, sub) if isinstance(container, Mapping) else None
    return _get(resource, path)


def _get(container: Mapping[str, Any], name: str) -> Any:
    if name in container:
        return container[name]
    lowered = name.lower()
    for key, value in container.items():
        if key.lower() == lowered:
            return value
    return None


def same(path: str, want: Any, have: Any) -> bool:
    """Whether the target's value ``have`` holds what the mapping sets, ``want``.

    Only what the mapping sets counts: sub-attributes the target adds (a
    manager's ``$ref`` and ``displayName``, an e-mail's ``display``) are
    ignored. Multi-valued attributes are compared as sets (RFC 7643 §2.4: no
    order), ``primary: false`` is the same as no ``primary``.
    """
    attribute = path.rpartition(":")[2].split(".")[0].lower() if path.startswith("urn:") else path.split(".")[0].lower()
    if isinstance(want, list):
        if not isinstance(have, list):
            return False
        keys = {k for item in want if isinstance(item, Mapping) for k in item}
        return sorted(_item(attribute, x, keys) for x in want) == sorted(_item(attribute, x, keys) for x in have)
    if isinstance(want, Mapping):
        if not isinstance(have, Mapping):
            return False
        return all(same(f"{path}.{k}", v, _get(have, k)) for k, v in want.items() if not refs_in(v))
    if isinstance(want, str) and isinstance(have, str) and path.lower() in _CASELESS_PATHS:
        return want.casefold() == have.casefold()
    return bool(want == have and type(want) is type(have))


def _item(attribute: str, item: Any, keys: set[str]) -> bytes:
    """One value of a multi-valued attribute as a comparable key."""
    if not isinstance(item, Mapping):
        return orjson.dumps(item)
    kept: dict[str, Any] = {}
    for key in keys:
        value = _get(item, key)
        if key == "primary" and not value:
            continue  # absent and false say the same thing
        if isinstance(value, str) and (attribute, key.lower()) in _CASELESS_SUB_ATTRIBUTES:
            value = value.casefold()
        if value is not None:
            kept[key] = value
    return orjson.dumps(kept, option=orjson.OPT_SORT_KEYS)


# Write-only attributes (RFC 7643 §4.1.1: password is returned "never"): no target shows them, so they cannot drift.
_UNREADABLE = tuple((name,) for name in sorted(WRITE_ONLY))


def comparable(desired: Mapping[str, Any], create_only: Iterable[tuple[str, ...]] = ()) -> dict[str, Any]:
    """What reconciliation compares of a desired payload with the account the target holds.

    What the planner compares (:func:`provisioner.planner.compared`: no
    ``when: create`` attribute, which the planner never updates, so its value
    in the target is the target's business), less the write-only attributes
    a target never returns (``password``, RFC 7643 §4.1.1 returned "never").
    ``create_only``: the mapping's paths, ``("password",)`` or ``(extension urn, name)``.
    """
    return without(compared(desired, create_only), _UNREADABLE)


def shape_of(
    desired: Mapping[str, Any], create_only: Iterable[tuple[str, ...]] = (), *, compared: Mapping[str, Any] | None = None
) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """What a comparison with ``desired`` looks at: (path, "value" | "list" | "map", the keys compared).

    Only the :func:`comparable` attributes; paths holding unresolved references
    are left out too, as :func:`drift` skips them. ``compared``: the flattened
    :func:`comparable` attributes of ``desired`` (path → value), when the caller
    has computed them already; they are computed here otherwise.
    """
    shape = []
    if compared is None:
        compared = flatten(comparable(desired, create_only))
    for path, want in compared.items():
        if refs_in(want) or isinstance(want, Unique):  # a unique_username() is chosen once, on create
            continue
        if isinstance(want, list):
            keys = tuple(sorted({k for item in want if isinstance(item, Mapping) for k in item}))
            shape.append((path, "list", keys))
        elif isinstance(want, Mapping):
            shape.append((path, "map", tuple(sorted(k for k, v in want.items() if not refs_in(v)))))
        else:
            shape.append((path, "value", ()))
    return tuple(shape)


def fingerprint(shape: tuple[tuple[str, str, tuple[str, ...]], ...], values: Mapping[str, Any]) -> bytes:
    """A digest of the values at the shape's paths, normalized as :func:`same` compares them.

    ``values``: flattened paths (a desired payload's :func:`~provisioner.payload.flatten`)
    or a target resource read through :func:`get_path`. Equal digests mean no drift;
    different ones are checked again with :func:`drift` (the normalization is at
    least as strict as :func:`same`, never looser).
    """
    parts: list[Any] = []
    for path, kind, keys in shape:
        value = values.get(path) if isinstance(values, dict) else None
        parts.append(_canonical(path, kind, keys, value))
    return hashlib.blake2b(orjson.dumps(parts, default=repr), digest_size=16).digest()


def resource_fingerprint(shape: tuple[tuple[str, str, tuple[str, ...]], ...], resource: Mapping[str, Any]) -> bytes:
    """:func:`fingerprint` of a target resource."""
    return fingerprint(shape, {path: get_path(resource, path) for path, _, _ in shape})


def _canonical(path: str, kind: str, keys: tuple[str, ...], value: Any) -> Any:
    attribute = path.rpartition(":")[2].split(".")[0].lower() if path.startswith("urn:") else path.split(".")[0].lower()
    if kind == "list":
        if not isinstance(value, list):
            return ["not a list", repr(type(value))]
        return sorted(_item(attribute, x, set(keys)).decode() for x in value)
    if kind == "map":
        if not isinstance(value, Mapping):
            return ["not a map", repr(type(value))]
        return [[k, type(v).__name__, v] for k in keys for v in (_get(value, k),)]
    if isinstance(value, str) and path.lower() in _CASELESS_PATHS:
        return ["str", value.casefold()]
    return [type(value).__name__, value]


def drift(
    desired: Mapping[str, Any], resource: Mapping[str, Any], create_only: Iterable[tuple[str, ...]] = ()
) -> dict[str, Any]:
    """The attribute paths the mapping sets whose value in ``resource`` differs, with the target's values.

    Only the :func:`comparable` attributes count (``create_only``: the
    mapping's ``when: create`` paths). Unresolved references (a manager not in
    the target yet) cannot be compared and are skipped.
    """
    drifted: dict[str, Any] = {}
    for path, want in flatten(comparable(desired, create_only)).items():
        if refs_in(want) or isinstance(want, Unique):  # a unique_username() is chosen once, on create
            continue
        have = get_path(resource, path)
        if not same(path, want, have):
            drifted[path] = have
    return dict(sorted(drifted.items()))


# --- classifying -------------------------------------------------------------------------------

# Pages of SQLite's cache the spill may hold in memory (KiB); past it, rows go to its temporary file.
SPILL_CACHE_KIB = 16 * 1024

_SPILL_SCHEMA = """
CREATE TABLE identity (
    key TEXT PRIMARY KEY,
    scim_id TEXT,                        -- the stored link's account id
    link_active INTEGER,                 -- the link's active flag (NULL: no link)
    sourced INTEGER NOT NULL DEFAULT 0,  -- the source named it (a second record with its key is unreadable)
    known INTEGER NOT NULL DEFAULT 1,
    desired TEXT,                        -- compact JSON; NULL: no active account wanted
    digest BLOB,
    shape INTEGER,
    match TEXT,                          -- the match value, as the target compares it (planner.match_key)
    user_name TEXT,
    state INTEGER NOT NULL DEFAULT 0     -- 0: its linked account not seen yet, 1: seen, 2: gone (404)
) WITHOUT ROWID;
CREATE INDEX identity_scim_id ON identity (scim_id);
CREATE INDEX identity_match ON identity (match);
CREATE TABLE seen (id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE listed (id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE claim (key TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE finding (
    n INTEGER PRIMARY KEY,
    situation TEXT NOT NULL,
    identity TEXT,
    id TEXT,
    user_name TEXT,
    active INTEGER,
    observed TEXT
);
CREATE INDEX finding_candidate ON finding (identity) WHERE situation = 'unlinked';
CREATE INDEX finding_unmatched ON finding (id) WHERE situation = 'unmatched';
CREATE TABLE disputed (key TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE group_finding (
    n INTEGER PRIMARY KEY,
    situation TEXT NOT NULL,
    group_key TEXT,
    id TEXT,
    display_name TEXT
);
CREATE TABLE group_seen (id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE foreign_member (n INTEGER NOT NULL, member TEXT NOT NULL, PRIMARY KEY (n, member)) WITHOUT ROWID;
-- The member state of the target's groups as stored (group_member), read once.
CREATE TABLE member (group_key TEXT NOT NULL, member_id TEXT NOT NULL, PRIMARY KEY (group_key, member_id)) WITHOUT ROWID;
CREATE INDEX member_id ON member (member_id);
"""


class Spill:
    """One reconciliation's per-account state, kept in a private temporary SQLite database, not in memory.

    ``sqlite3.connect("")`` opens a database that lives in SQLite's page cache
    (capped at ``SPILL_CACHE_KIB``) and moves to a temporary file past it; the
    file is deleted when the connection closes (https://sqlite.org/inmemorydb.html,
    "Temporary Databases"). Memory stays flat as accounts grow: at 100,000
    accounts the rows (desired payloads included) are ~80 MB on disk.
    No journal and no sync: nothing in it outlives the run.
    """

    def __init__(self) -> None:
        self.db = sqlite3.connect("", check_same_thread=False)
        self.db.execute(f"PRAGMA cache_size = -{SPILL_CACHE_KIB}")
        self.db.execute("PRAGMA journal_mode = OFF")
        self.db.execute("PRAGMA synchronous = OFF")
        self.db.executescript(_SPILL_SCHEMA)
        # Shapes are few (most identities share one): kept in memory, referred to by number.
        self.shapes: list[tuple[tuple[str, str, tuple[str, ...]], ...]] = []
        self._shape_ids: dict[Any, int] = {}

    def shape_id(self, shape: tuple[tuple[str, str, tuple[str, ...]], ...]) -> int:
        number = self._shape_ids.get(shape)
        if number is None:
            number = self._shape_ids[shape] = len(self.shapes)
            self.shapes.append(shape)
        return number

    def scim_id_of(self, key: str) -> str | None:
        """The linked account id of an identity (a reference's lookup), or None."""
        row = self.db.execute("SELECT scim_id FROM identity WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        self.db.close()


class ListedIds(MutableSet[str]):
    """The ids a listing has yielded, kept in the spill: ``iter_resources(seen=)`` skips a page's repeats with it."""

    def __init__(self, spill: Spill) -> None:
        self.db = spill.db

    def __contains__(self, value: object) -> bool:
        return self.db.execute("SELECT 1 FROM listed WHERE id = ?", (value,)).fetchone() is not None

    def __iter__(self) -> Iterator[str]:
        return (row[0] for row in self.db.execute("SELECT id FROM listed"))

    def __len__(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM listed").fetchone()[0])

    def add(self, value: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO listed VALUES (?)", (value,))

    def discard(self, value: str) -> None:
        self.db.execute("DELETE FROM listed WHERE id = ?", (value,))


_Row = TypeVar("_Row")


class _SpillRows(Sequence[_Row]):
    """The rows of one table of a spill as a sequence, in the order they were written (``n``), decoded one at a time.

    Subclasses name the table, its columns and how a row is decoded; memory
    holds one page of ``_PAGE`` rows while iterating, one row when indexing.
    """

    _TABLE: ClassVar[str]
    _COLUMNS: ClassVar[str]
    _PAGE: ClassVar[int] = 1000

    def __init__(self, spill: Spill) -> None:
        self.spill, self.db = spill, spill.db

    def _decode(self, row: tuple[Any, ...]) -> _Row:
        raise NotImplementedError

    def __iter__(self) -> Iterator[_Row]:
        cursor = self.db.execute(f"SELECT {self._COLUMNS} FROM {self._TABLE} ORDER BY n")
        while rows := cursor.fetchmany(self._PAGE):
            yield from map(self._decode, rows)

    def __len__(self) -> int:
        return int(self.db.execute(f"SELECT count(*) FROM {self._TABLE}").fetchone()[0])

    @overload
    def __getitem__(self, index: int) -> _Row: ...
    @overload
    def __getitem__(self, index: slice) -> list[_Row]: ...
    def __getitem__(self, index: int | slice) -> _Row | list[_Row]:
        if isinstance(index, slice):
            return list(self)[index]
        index = index + len(self) if index < 0 else index
        # SQLite reads a negative OFFSET as 0: an index before the first row would give the first.
        query = f"SELECT {self._COLUMNS} FROM {self._TABLE} ORDER BY n LIMIT 1 OFFSET ?"
        row = self.db.execute(query, (index,)).fetchone() if index >= 0 else None
        if row is None:
            raise IndexError(index)
        return self._decode(row)


class GroupFindings(_SpillRows[GroupFinding]):
    """The group findings of one reconciliation, read from its spill in the order the groups were seen.

    A group's foreign members are read with it: one group's at a time in memory, not every group's.
    """

    _TABLE = "group_finding"
    _COLUMNS = "n, situation, group_key, id, display_name"
    # Fewer rows a page than accounts: each holds its group's foreign members.
    _PAGE = 100

    def add(self, finding: GroupFinding) -> None:
        n = self.db.execute(
            "INSERT INTO group_finding (situation, group_key, id, display_name) VALUES (?, ?, ?, ?)",
            (finding.situation.value, finding.group, finding.id, finding.display_name),
        ).lastrowid
        self.db.executemany("INSERT OR IGNORE INTO foreign_member VALUES (?, ?)",
                            ((n, m) for m in finding.foreign_members))  # fmt: skip

    def _decode(self, row: tuple[Any, ...]) -> GroupFinding:
        n, situation, group, scim_id, display = row
        members = [m for (m,) in self.db.execute("SELECT member FROM foreign_member WHERE n = ? ORDER BY member", (n,))]
        return GroupFinding(Situation(situation), group, scim_id, display, members)

    def counts(self) -> dict[str, int]:
        """Groups by situation (every one present), and ``foreign_members``: foreign members of linked groups."""
        tally = dict.fromkeys(GROUP_SITUATIONS, 0)
        tally.update(self.db.execute("SELECT situation, count(*) FROM group_finding GROUP BY situation").fetchall())
        tally["foreign_members"] = int(self.db.execute("SELECT count(*) FROM foreign_member").fetchone()[0])
        return tally

    def seen(self, scim_id: str) -> bool:
        """Record a group id as listed; False when it was listed already (a page repeated it)."""
        return self.db.execute("INSERT OR IGNORE INTO group_seen VALUES (?)", (scim_id,)).rowcount == 1

    def was_seen(self, scim_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM group_seen WHERE id = ?", (scim_id,)).fetchone() is not None


class MemberState(Mapping[str, set[str]]):
    """The stored member state of a target's groups (group key → member ids), copied into the spill.

    What :class:`~provisioner.group_executor.GroupExecutor` reads as ``state``,
    one group at a time, without every group's members in memory.
    """

    def __init__(self, spill: Spill) -> None:
        self.db = spill.db

    def load(self, rows: Iterable[tuple[str, str]]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO member VALUES (?, ?)", rows)

    def __getitem__(self, key: str) -> set[str]:
        members = {m for (m,) in self.db.execute("SELECT member_id FROM member WHERE group_key = ?", (key,))}
        if not members:
            raise KeyError(key)
        return members

    def __iter__(self) -> Iterator[str]:
        return (key for (key,) in self.db.execute("SELECT DISTINCT group_key FROM member").fetchall())

    def __len__(self) -> int:
        return int(self.db.execute("SELECT count(DISTINCT group_key) FROM member").fetchone()[0])

    def holds(self, member_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM member WHERE member_id = ? LIMIT 1", (member_id,)).fetchone() is not None


class ManagedIds(Set[str]):
    """The account ids we manage (every linked account, and every member in the member state), read from the spill.

    What :class:`~provisioner.group_executor.GroupExecutor` reads as ``managed``
    (``ids & managed``), without a set of every account id in memory.
    """

    def __init__(self, classifier: Classifier, state: MemberState) -> None:
        self.classifier, self.state = classifier, state

    @classmethod
    def _from_iterable(cls, values: Iterable[str]) -> set[str]:  # type: ignore[override]  # results are plain sets
        return set(values)

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and (self.classifier.is_linked(value) or self.state.holds(value))

    def __iter__(self) -> Iterator[str]:
        seen = {*self.classifier.linked_ids(), *(m for (m,) in self.state.db.execute("SELECT member_id FROM member"))}
        return iter(seen)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class KeyLookup(Protocol):
    """identity key -> linked SCIM id (a dict does, and so does the spill): how references are resolved."""

    def get(self, key: str, /) -> str | None: ...


class _Lookup:
    """identity key -> linked SCIM id, read from the spill: what ``resolve_refs`` asks with ``.get``."""

    def __init__(self, spill: Spill) -> None:
        self.get = spill.scim_id_of


def _bit(value: bool | None) -> int | None:
    return None if value is None else int(value)


class Findings(_SpillRows[Finding]):
    """The findings of one reconciliation, read from its spill in the order the accounts were seen."""

    _TABLE = "finding"
    _COLUMNS = "situation, identity, id, user_name, active, observed"

    def _decode(self, row: tuple[Any, ...]) -> Finding:
        situation, identity, scim_id, user_name, active, observed = row
        return Finding(Situation(situation), identity, scim_id, user_name,
                       active=None if active is None else bool(active), observed=loads(observed))  # fmt: skip

    def attention_pages(self, size: int = 1000) -> Iterator[list[Finding]]:
        """Every finding but the linked accounts without drift: what a repair may act on, ``size`` findings at a time.

        Few, as a rule; but an adoption or a mass drift is every account.
        """
        query = f"SELECT {self._COLUMNS} FROM finding WHERE situation != 'linked' OR observed IS NOT NULL ORDER BY n"
        cursor = self.spill.db.execute(query)
        while rows := cursor.fetchmany(size):
            yield [self._decode(row) for row in rows]

    def adopted(self) -> _Adopted:
        """The identities an ``unlinked`` account is found for, as a container read from the spill."""
        return _Adopted(self.spill)

    def disputed(self) -> _Disputed:
        """The identities in a dispute (every key a ``disputed`` account names), as a container read from the spill."""
        db = self.spill.db
        db.execute("DELETE FROM disputed")
        keys = (key for (identity,) in db.execute("SELECT identity FROM finding WHERE situation = 'disputed'").fetchall()
                for key in (identity or "").split(", "))  # fmt: skip
        db.executemany("INSERT OR IGNORE INTO disputed VALUES (?)", ((key,) for key in keys))
        return _Disputed(self.spill)

    def unmatched_pages(self, size: int = 1000) -> Iterator[list[tuple[str, str | None]]]:
        """(id, userName) of every unmatched account, ``size`` at a time."""
        cursor = self.spill.db.execute(
            "SELECT id, user_name FROM finding WHERE situation = 'unmatched' AND id IS NOT NULL ORDER BY n"
        )
        while rows := cursor.fetchmany(size):
            yield rows

    def is_unmatched(self, scim_id: str) -> bool:
        """Whether this account id was found unmatched."""
        query = "SELECT 1 FROM finding WHERE situation = 'unmatched' AND id = ? LIMIT 1"
        return self.spill.db.execute(query, (scim_id,)).fetchone() is not None

    def counts(self) -> dict[str, int]:
        """Accounts by situation, every situation present."""
        tally = dict.fromkeys((s.value for s in Situation), 0)
        tally.update(self.spill.db.execute("SELECT situation, count(*) FROM finding GROUP BY situation").fetchall())
        return tally

    def drifted(self) -> int:
        """Linked accounts with drift."""
        query = "SELECT count(*) FROM finding WHERE situation = 'linked' AND observed IS NOT NULL"
        return int(self.spill.db.execute(query).fetchone()[0])


class _Adopted(Container[str]):
    def __init__(self, spill: Spill) -> None:
        self.db = spill.db

    def __contains__(self, key: object) -> bool:
        query = "SELECT 1 FROM finding WHERE situation = 'unlinked' AND identity = ? LIMIT 1"
        return self.db.execute(query, (key,)).fetchone() is not None


class _Disputed(Container[str]):
    def __init__(self, spill: Spill) -> None:
        self.db = spill.db

    def __contains__(self, key: object) -> bool:
        return self.db.execute("SELECT 1 FROM disputed WHERE key = ?", (key,)).fetchone() is not None


class Classifier:
    """Names the situation of each account, fed one account at a time. Purely computational.

    Give it the stored links (:meth:`add_links`) and the identities
    (:meth:`add`, or :func:`read_identities` for a whole source), feed every
    account of the target to :meth:`observe`, then ask :meth:`unseen_links`
    which linked accounts were not among them, confirm each with the target
    (:meth:`observe` what a GET returns, or :meth:`gone` on a 404), and call
    :meth:`finish`.

    Its state (identities, the ids seen, the findings) is in a :class:`Spill`:
    memory does not grow with the accounts. An account is classified as it is
    observed; only ``disputed`` needs every account seen (an identity's second
    account may come pages later), and :meth:`finish` settles it in one query.
    """

    def __init__(self, identities: Iterable[Identity] = (), match_attribute: str = "userName",
                 spill: Spill | None = None, create_only: frozenset[tuple[str, ...]] = frozenset()) -> None:  # fmt: skip
        self.match_attribute = match_attribute
        # The mapping's `when: create` paths: never drift (see comparable).
        self.create_only = create_only
        self.spill = spill if spill is not None else Spill()
        self.db = self.spill.db
        for identity in identities:
            self.add(identity)

    def _match(self, value: Any) -> str | None:
        return match_key(self.match_attribute, value) if isinstance(value, str) and value else None

    def add_links(self, links: Iterable[Link]) -> None:
        """The stored links of the target (before the source's identities)."""
        self.db.executemany(
            "INSERT INTO identity (key, scim_id, link_active) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET scim_id = excluded.scim_id, link_active = excluded.link_active",
            ((link.identity_key, link.scim_id, int(link.active)) for link in links),
        )

    def add(self, identity: Identity) -> None:
        """One identity; a later one with the same key replaces it (a link given by :meth:`add_links` is kept)."""
        link = identity.link
        shape = self.spill.shape_id(identity.shape) if identity.shape is not None else None
        self.db.execute(
            "INSERT INTO identity (key, scim_id, link_active, sourced, known, desired, digest, shape, match, user_name)"
            " VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET"
            " scim_id = coalesce(excluded.scim_id, scim_id), link_active = coalesce(excluded.link_active, link_active),"
            " sourced = 1, known = excluded.known, desired = excluded.desired, digest = excluded.digest,"
            " shape = excluded.shape, match = excluded.match, user_name = excluded.user_name",
            (identity.key, link.scim_id if link else None, _bit(link.active) if link else None, int(identity.known),
             identity.desired, identity.digest, shape, self._match(identity.match_value), identity.user_name),
        )  # fmt: skip

    def sourced(self, key: str) -> bool:
        """Whether an identity with this key was given already (a duplicate key in the source)."""
        row = self.db.execute("SELECT sourced FROM identity WHERE key = ?", (key,)).fetchone()
        return bool(row and row[0])

    def link_of(self, key: str) -> Link | None:
        """The stored link of an identity, or None."""
        row = self.db.execute("SELECT scim_id, link_active FROM identity WHERE key = ?", (key,)).fetchone()
        return Link(key, row[0], None, bool(row[1])) if row and row[0] is not None else None

    def observe(self, resource: Mapping[str, Any]) -> None:
        """Classify one account of the target (a resource with at least ``id``)."""
        scim_id = str(resource.get("id") or "")
        if not scim_id:
            return
        if self.db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (scim_id,)).rowcount == 0:
            return  # a page repeated an account: it counts once
        user_name = _get(resource, "userName")
        user_name = user_name if isinstance(user_name, str) else None
        active = _get(resource, "active")
        active = active if isinstance(active, bool) else None
        row = self.db.execute(
            "SELECT key, link_active, known, desired IS NOT NULL, digest, shape FROM identity WHERE scim_id = ? LIMIT 1",
            (scim_id,),
        ).fetchone()
        if row is not None:
            key, link_active, known, wanted, digest, shape = row
            self.db.execute("UPDATE identity SET state = 1 WHERE key = ?", (key,))
            observed = self._drift(key, bool(link_active), bool(known), wanted, digest, shape, active, resource)
            self._found(Situation.LINKED, key, scim_id, user_name, active, observed)
            return
        value = self._match(_get(resource, self.match_attribute))
        owners = [r[0] for r in self.db.execute("SELECT key FROM identity WHERE match = ?", (value,))] if value else []
        if owners:
            self.db.executemany("INSERT OR IGNORE INTO claim VALUES (?)", ((key,) for key in owners))
        if not owners:
            self._found(Situation.UNMATCHED, None, scim_id, user_name, active)
        elif len(owners) > 1:
            self._found(Situation.DISPUTED, ", ".join(sorted(owners)), scim_id, user_name, active)
        else:
            # Unlinked, unless its identity turns out to have another account: settled by finish().
            self._found(Situation.UNLINKED, owners[0], scim_id, user_name, active)

    def _drift(
        self, key: str, link_active: bool, known: bool, wanted: bool, digest: bytes | None, shape: int | None,
        active: bool | None, resource: Mapping[str, Any],
    ) -> dict[str, Any] | None:
        if not known:
            return None
        if not wanted:
            # Disabled by us as a leaver, active again in the target.
            return {"active": active} if active is True and not link_active else None
        if digest is not None and shape is not None and resource_fingerprint(self.spill.shapes[shape], resource) == digest:
            return None  # the digest settles the common case without decoding the payload
        desired = loads(self.db.execute("SELECT desired FROM identity WHERE key = ?", (key,)).fetchone()[0])
        return drift(desired, resource, self.create_only) or None

    def _found(self, situation: Situation, identity: str | None, scim_id: str | None, user_name: str | None,
               active: bool | None, observed: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.db.execute(
            "INSERT INTO finding (situation, identity, id, user_name, active, observed) VALUES (?, ?, ?, ?, ?, ?)",
            (situation.value, identity, scim_id, user_name, _bit(active), dumps(observed) if observed else None),
        )

    def unseen_links(self) -> list[tuple[str, str]]:
        """(identity key, SCIM id) of every linked account the pages did not contain."""
        query = "SELECT key, scim_id FROM identity WHERE scim_id IS NOT NULL AND state = 0 ORDER BY key"
        return [(key, scim_id) for key, scim_id in self.db.execute(query)]

    def gone(self, key: str) -> None:
        """The target answered 404 for this identity's linked account."""
        scim_id, user_name = self.db.execute("SELECT scim_id, user_name FROM identity WHERE key = ?", (key,)).fetchone()
        assert scim_id is not None
        self.db.execute("UPDATE identity SET state = 2 WHERE key = ?", (key,))
        self._found(Situation.DELETED, key, scim_id, user_name, None)

    def finish(self) -> Findings:
        """Every finding; an identity's extra accounts become ``disputed``."""
        self.db.execute(
            "UPDATE finding SET situation = 'disputed' WHERE situation = 'unlinked' AND identity IN ("
            " SELECT key FROM identity WHERE state = 1"
            " UNION SELECT identity FROM finding WHERE situation = 'unlinked' GROUP BY identity HAVING count(*) > 1)"
        )
        return Findings(self.spill)

    def identities(self, keys: Iterable[str]) -> dict[str, Identity]:
        """These identities as given (their payloads decoded on access), by key; unknown keys left out."""
        found: dict[str, Identity] = {}
        for key in set(keys):
            row = self.db.execute(
                "SELECT scim_id, link_active, known, desired, match, user_name FROM identity WHERE key = ?", (key,)
            ).fetchone()
            if row is not None:
                scim_id, link_active, known, desired, match, user_name = row
                link = Link(key, scim_id, None, bool(link_active)) if scim_id is not None else None
                found[key] = Identity(key, desired, link, bool(known), match, user_name)
        return found

    def linked_ids(self) -> Iterator[str]:
        """The SCIM id of every linked account."""
        cursor = self.db.execute("SELECT scim_id FROM identity WHERE scim_id IS NOT NULL")
        while rows := cursor.fetchmany(1000):
            yield from (row[0] for row in rows)

    def is_linked(self, scim_id: str) -> bool:
        """Whether an account id is one of our links."""
        return self.db.execute("SELECT 1 FROM identity WHERE scim_id = ? LIMIT 1", (scim_id,)).fetchone() is not None

    def active_links(self) -> int:
        """Linked accounts we keep active: what the deletion brake's share is measured against."""
        return int(self.db.execute("SELECT count(*) FROM identity WHERE link_active = 1").fetchone()[0])

    def without_account(self) -> int:
        """Identities in scope with no account at all: the next cycle creates them.

        Identities in a dispute are not counted: an account claims them already.
        """
        query = ("SELECT count(*) FROM identity WHERE desired IS NOT NULL AND scim_id IS NULL "
                 "AND key NOT IN (SELECT key FROM claim)")  # fmt: skip
        return int(self.db.execute(query).fetchone()[0])


def counts(findings: Iterable[Finding]) -> dict[str, int]:
    """Accounts by situation, every situation present."""
    if isinstance(findings, Findings):
        return findings.counts()
    tally = dict.fromkeys((s.value for s in Situation), 0)
    for finding in findings:
        tally[finding.situation.value] += 1
    return tally


# --- reacting ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Repairs:
    """What the configured reactions want written: queue operations and the link changes they need."""

    decisions: list[Decision] = field(default_factory=list)
    # Link state set to what the target holds (applied payload with the drifted values; hash cleared),
    # so that the update PATCHes exactly the drifted attributes.
    observed: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Links to drop: their account is gone (recreated), or another account is adopted instead.
    drop: list[str] = field(default_factory=list)
    # Unmatched accounts held back from disable/delete, with why.
    spared: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Operations by kind."""
        tally: dict[str, int] = {}
        for decision in self.decisions:
            tally[decision.kind.value] = tally.get(decision.kind.value, 0) + 1
        return tally


def plan_repairs(
    findings: Iterable[Finding],
    identities: Mapping[str, Identity],
    policy: ReconcileConfig,
    *,
    first_seen: Mapping[str, datetime],
    now: datetime,
    lookup: KeyLookup,
    unreadable_records: int = 0,
    adopted: Container[str] | None = None,
    disputed: Container[str] | None = None,
    create_only: frozenset[tuple[str, ...]] = frozenset(),
) -> Repairs:
    """The queue operations that carry out ``policy`` for these findings. Purely computational.

    ``first_seen``: since when each unmatched account (by id) has been seen;
    ``lookup``: identity key → SCIM id, to resolve references. Identities
    in a dispute are not touched. An unmatched
    account is never disabled or deleted while some source records could not
    be read (``unreadable_records``): one of them may own it.

    ``adopted`` (identities an unlinked account is found for) and ``disputed``
    (identities in a dispute) are taken from ``findings`` when not given; give
    them to plan a page of the findings at a time (:meth:`Findings.adopted`,
    :meth:`Findings.disputed`), as they depend on every finding.

    ``create_only``: the mapping's ``when: create`` paths. A drift repair
    sends and records what an update does (:func:`provisioner.planner.decide`):
    the payload without them; a recreate sends them, as a create does.
    """
    repairs = Repairs()
    findings = list(findings)
    if adopted is None:
        adopted = {f.identity for f in findings if f.situation is Situation.UNLINKED}
    # An identity in a dispute is left to an operator whole: which of its accounts is the real one
    # is not ours to guess (and repairing one may collide with the other, e.g. on userName).
    if disputed is None:
        disputed = {key for f in findings if f.situation is Situation.DISPUTED for key in (f.identity or "").split(", ")}
    grace = timedelta(seconds=parse_duration(policy.delete_after))
    for f in findings:
        identity = identities.get(f.identity or "")
        if identity is not None and identity.key in disputed:
            continue
        if f.situation is Situation.LINKED and f.drift and policy.linked == "update" and identity is not None:
            desired = identity.payload
            if desired is None:
                repairs.decisions.append(Decision(identity.key, Kind.DISABLE, Reason.RECONCILE))
                continue
            payload, sendable = _sendable(compared(desired, create_only), lookup)
            # Stored in the link as the executor stores it: a password sent on every update is kept masked.
            applied = mask_write_only(sendable)
            for path, value in (f.observed or {}).items():
                _set_path(applied, path, value)
            repairs.observed[identity.key] = applied
            repairs.decisions.append(Decision(identity.key, Kind.UPDATE, Reason.RECONCILE, payload, payload_hash(sendable)))
        elif f.situation is Situation.DELETED and policy.deleted == "recreate" and identity is not None:
            desired = identity.payload
            if desired is None or identity.key in adopted:
                continue  # a leaver needs no account; an identity adopting another account gets that one
            payload, sendable = _sendable(desired, lookup)
            repairs.drop.append(identity.key)
            repairs.decisions.append(Decision(identity.key, Kind.CREATE, Reason.RECONCILE, payload, payload_hash(sendable)))
        elif f.situation is Situation.UNLINKED and policy.unlinked == "link" and identity is not None:
            desired = identity.payload
            if desired is None:
                continue  # its record no longer renders: nothing to adopt the account with
            if identity.link is not None:
                repairs.drop.append(identity.key)  # its linked account is gone (deleted): adopt this one
            payload, sendable = _sendable(desired, lookup)
            # The account found travels with the operation: adopted by its id, not looked up again.
            payload = {**payload, "id": f.id} if f.id else payload
            repairs.decisions.append(Decision(identity.key, Kind.LINK, Reason.RECONCILE, payload, payload_hash(sendable)))
        elif f.situation is Situation.UNMATCHED and policy.unmatched != "report" and f.id:
            orphan = {"id": f.id, "userName": f.user_name}
            if unreadable_records:
                repairs.spared.append((f.id, f"{unreadable_records} source records could not be read"))
            elif policy.unmatched == "delete":
                since = first_seen.get(f.id, now)
                if now - since >= grace:
                    repairs.decisions.append(
                        Decision(ORPHAN_PREFIX + f.id, Kind.DELETE, Reason.RECONCILE, orphan, payload_hash(orphan))
                    )
                else:
                    repairs.spared.append((f.id, f"unmatched since {since:%Y-%m-%d %H:%M}; deleted after {policy.delete_after}"))
            elif f.active is not False:
                repairs.decisions.append(
                    Decision(ORPHAN_PREFIX + f.id, Kind.DISABLE, Reason.RECONCILE, orphan, payload_hash(orphan))
                )
    return repairs


def _sendable(payload: dict[str, Any], lookup: KeyLookup) -> tuple[dict[str, Any], dict[str, Any]]:
    """The payload to queue (references kept for the executor) and what would be sent now (its hash)."""
    kept, unresolved = resolve_refs(payload, lookup.get, keep_unresolved=True)
    return kept, (resolve_refs(kept, lookup.get)[0] if unresolved else kept)


def _set_path(payload: dict[str, Any], path: str, value: Any) -> None:
    if path.startswith("urn:"):
        parent, _, name = path.rpartition(":")
    elif "." in path:
        parent, _, name = path.partition(".")
    else:
        parent, name = "", path
    container = payload.setdefault(parent, {}) if parent else payload
    if value is None:
        container.pop(name, None)
    else:
        container[name] = value


# --- reading and writing -----------------------------------------------------------------------


@dataclass(slots=True)
class ReconcileReport:
    """What one reconciliation of one target found and did."""

    target: str
    run_id: str
    # Every account's finding (a :class:`Findings` read from the run's spill, or a plain list).
    findings: Sequence[Finding] = field(default_factory=list)
    without_account: int = 0
    unreadable_records: int = 0
    requests: int = 0
    repaired: bool = False
    # Operations a repair queued, by kind (in the order the kinds were first queued); empty without one.
    queued: Counter[str] = field(default_factory=Counter)
    # Outcomes of the operations sent after a repair, by status; and how many wait for approval.
    statuses: dict[str, int] = field(default_factory=dict)
    held: int = 0
    # The target's groups (empty when the target manages none: a :class:`GroupFindings` read from the
    # run's spill, or a plain list), and the member removals queued for them.
    groups: Sequence[GroupFinding] = field(default_factory=list)
    foreign_removals: int = 0
    # Of ``held``: group operations whose member removals the brake held (group_members: exact).
    held_removals: int = 0
    # Where the findings are kept; closed by :meth:`close` (or when the report is collected).
    spill: Spill | None = None

    def counts(self) -> dict[str, int]:
        """Accounts by situation."""
        return counts(self.findings)

    @property
    def drifted(self) -> int:
        """Linked accounts with drift."""
        if isinstance(self.findings, Findings):
            return self.findings.drifted()
        return sum(1 for f in self.findings if f.situation is Situation.LINKED and f.drift)

    def close(self) -> None:
        """Let go of the spill (its temporary file is deleted); the findings cannot be read after."""
        if self.spill is not None:
            self.spill.close()

    def as_dict(self) -> dict[str, Any]:
        """The object ``reconcile --json`` prints (every account in memory: :meth:`json_chunks` writes it without)."""
        return {"target": self.target, "counts": self.counts(), "accounts": [f.as_dict() for f in self.findings],
                "groups": [g.as_dict() for g in self.groups]}  # fmt: skip

    def json_chunks(self, page: int = 1000) -> Iterator[str]:
        """:meth:`as_dict` as compact JSON text, the same characters, in pieces of ``page`` accounts or groups.

        Joined, the pieces are one JSON object, as ``orjson.dumps(as_dict())``
        writes it; no piece ends inside an account or a group. Memory holds one
        page, not every account's finding.
        """
        head = orjson.dumps({"target": self.target, "counts": self.counts()}).decode()
        yield head[:-1] + ',"accounts":['
        yield from _joined((f.as_dict() for f in self.findings), page)
        yield '],"groups":['
        yield from _joined((g.as_dict() for g in self.groups), page)
        yield "]}"

    def recorded_counts(self, groups: bool) -> dict[str, Any]:
        """What a run records and the gauges publish: accounts by situation, and with ``groups`` its group counts."""
        return {**self.counts(), "groups": self.group_counts()} if groups else self.counts()

    def group_counts(self) -> dict[str, int]:
        """Groups by situation (``deleted`` included), and foreign members of linked groups."""
        if isinstance(self.groups, GroupFindings):
            return self.groups.counts()
        tally = dict.fromkeys(GROUP_SITUATIONS, 0)
        for g in self.groups:
            tally[g.situation.value] += 1
        tally["foreign_members"] = sum(len(g.foreign_members) for g in self.groups)
        return tally


def _joined(items: Iterable[Any], page: int) -> Iterator[str]:
    """JSON array elements, comma-separated, ``page`` at a time (without the brackets)."""
    batch: list[str] = []
    first = True
    for item in items:
        batch.append(orjson.dumps(item).decode())
        if len(batch) >= page:
            yield ("" if first else ",") + ",".join(batch)
            first, batch = False, []
    if batch:
        yield ("" if first else ",") + ",".join(batch)


def read_identities(
    classifier: Classifier,
    mapping: AttributeMapping,
    records: Iterable[IdentityRecord | BadRecord],
    min_records: int = 1,
    *,
    groups: GroupDefinitions | None = None,
) -> tuple[int, list[str], dict[str, str]]:
    """Render every record of the source into ``classifier``, in one pass; unreadable records counted.

    Give the links first (:meth:`Classifier.add_links`): references resolve
    through them, and an identity gone from the source keeps its link with no
    desired state (a leaver). Returns (unreadable records, the attribute paths
    to ask the target for, the group names the rules define: key →
    displayName, as the group step counts them — static groups, and the groups
    of identities in scope whose account is linked and active; empty without
    ``groups``). Raises SafetyStop when the source has fewer usable records
    than ``min_records``: an empty export must not make every account an orphan.
    """
    lookup = _Lookup(classifier.spill)
    shapes: dict[Any, Any] = {}
    unreadable = 0
    usable = 0
    paths: set[str] = {"userName", "active", mapping.match}
    names: dict[str, str] = dict(groups.static_groups()) if groups is not None else {}
    for record in records:
        if isinstance(record, BadRecord) or classifier.sourced(record.key):
            unreadable += 1
            if record.key:
                classifier.add(Identity.of(record.key, None, known=False))
            continue
        usable += 1
        try:
            rendered = mapping.render(record.attributes)
        except MappingError:
            unreadable += 1
            classifier.add(Identity.of(record.key, None, known=False))
            continue
        payload = compared = None
        if rendered.payload:
            payload = resolve_refs(rendered.payload, lookup.get, keep_unresolved=True)[0]
            # What the target is asked for and what the identity's shape is made of: computed once.
            compared = flatten(comparable(payload, mapping.create_only))
            paths.update(compared)
            link = classifier.link_of(record.key) if groups is not None else None
            if groups is not None and link is not None and link.active:
                try:
                    for key, display in groups.groups_of(record.attributes).items():
                        names.setdefault(key, display)
                except MappingError:
                    pass  # the group step reviews it; its groups are not counted as defined
        identity = Identity.of(record.key, payload, match=mapping.match, shapes=shapes, create_only=mapping.create_only,
                               compared=compared)  # fmt: skip
        classifier.add(identity)
    if usable < max(min_records, 1):
        raise SafetyStop(
            f"the source has {usable} usable records (min_records {min_records}); "
            "refusing to reconcile: every account would look like an orphan"
        )
    return unreadable, sorted(paths), names


def _links(engine: Engine, name: str) -> Iterator[Link]:
    """The target's stored links, streamed from the state database."""
    columns = (LINK_TABLE.c.identity_key, LINK_TABLE.c.scim_id, LINK_TABLE.c.active)
    with engine.connect() as conn:
        rows = conn.execution_options(yield_per=1000).execute(select(*columns).where(LINK_TABLE.c.target == name))
        for key, scim_id, active in rows:
            yield Link(key, scim_id, None, bool(active))


async def reconcile_target(
    engine: Engine,
    config: Config,
    name: str,
    mapping: AttributeMapping,
    *,
    repair: bool = False,
    send: bool = True,
    now: datetime | None = None,
) -> ReconcileReport:
    """Read every account of a target, classify it, and with ``repair`` queue (and send) the reactions.

    Without ``repair`` nothing is written, to the target or to the state
    database. With it: the link changes the reactions need, one queue operation
    per reaction (disables and deletes through the deletion brake), the first
    sighting of unmatched accounts, a ``reconcile_run`` row; then the target's
    due operations are sent (``send``), as ``sync`` sends them.

    The source is read once, the target's pages once (requests ≈ accounts ÷
    ``page_size``, plus one GET per linked account no page listed). The state
    per account (and per group and member) is kept in a :class:`Spill` that
    the report holds until :meth:`ReconcileReport.close`, and a repair is
    planned and queued a page of findings at a time: memory stays flat as
    accounts grow.

    Raises connectors errors when the target cannot be read (nothing is
    concluded from a partial read), SafetyStop for an empty source.
    """
    from provisioner.groups import load_groups

    target = config.targets[name]
    source = config.sources[target.source]
    now = now or utcnow()
    report = ReconcileReport(name, f"{now:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}")
    classifier = Classifier(match_attribute=mapping.match, create_only=mapping.create_only)
    report.spill = classifier.spill
    try:
        classifier.add_links(_links(engine, name))
        definitions = load_groups(target.groups) if target.groups is not None else None
        report.unreadable_records, attributes, defined = read_identities(
            classifier, mapping, read_source(source), source.min_records, groups=definitions
        )
        # The target's declared and learned deviations (a target that ignores filters or rejects count) hold here too.
        session = TargetSession(target, quirks=load_quirks(engine, name, target))
        client = session.client()
        try:
            listed = ListedIds(classifier.spill)
            async for resource in _pages(client, mapping.endpoint, attributes, target.reconcile.page_size, name, listed):
                classifier.observe(resource)
                if len(client.history) >= 100:
                    _tally(report, client)
            for key, scim_id in classifier.unseen_links():
                # Not on any page: only a 404 for the id itself says the account is gone.
                try:
                    result = await client.get(mapping.endpoint, scim_id)
                except NotFound:
                    classifier.gone(key)
                else:
                    classifier.observe(result.resource or {"id": scim_id})
                if len(client.history) >= 100:
                    _tally(report, client)
            if target.groups is not None:
                report.groups = await _read_groups(engine, config, name, defined, classifier, client, session.quirks)
            _tally(report, client)
        finally:
            await client.aclose()
            await session.aclose()
        report.findings = classifier.finish()
        report.without_account = classifier.without_account()
        log.info("reconciled", target=name, counts=report.counts(), drifted=report.drifted, requests=report.requests)
        if repair:
            await _repair(engine, config, name, mapping, report, classifier, now, send=send)
    except BaseException:
        report.close()
        raise
    return report


def _tally(report: ReconcileReport, client: Any) -> None:
    """Count the client's requests and let go of their record (each keeps up to 4 KB of its answer)."""
    report.requests += len(client.history)
    client.history.clear()


async def _pages(
    client: Any, endpoint: str, attributes: list[str], page_size: int, name: str, seen: MutableSet[str] | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Every resource of an endpoint, asked with ``attributes=`` to keep pages small (RFC 7644 §3.4.2.5).

    Sub-attribute and extension paths in ``attributes`` are RFC 7644 §3.10, but
    some targets answer them with a 400 (SCIMMY: ``name.givenName`` or the
    enterprise extension's URN). A 400 to the first page is answered by asking
    again without ``attributes``: larger pages, the same accounts. A 400 after
    resources were listed is raised (the read is partial; nothing is concluded).
    ``seen``: where the listing keeps the ids it yielded (see ``iter_resources``).
    """
    listed = False
    try:
        async for resource in client.iter_resources(endpoint, attributes=attributes, page_size=page_size, seen=seen):
            listed = True
            yield resource
        return
    except PermanentError as exc:
        if listed or exc.status != 400:
            raise
        log.warning("the target refused the attributes asked for; reading whole resources", target=name,
                    endpoint=endpoint, error=str(exc))  # fmt: skip
    async for resource in client.iter_resources(endpoint, page_size=page_size, seen=seen):
        yield resource


async def _read_groups(
    engine: Engine, config: Config, name: str, defined: Mapping[str, str], classifier: Classifier, client: Any,
    quirks: Any,
) -> GroupFindings:
    """Every group of the target, paged (``attributes=displayName,members``), with its situation.

    ``defined``: the groups the rules define, key → displayName (from the one
    read of the source, :func:`read_identities`). Members are read the way the
    group step reads them: a group listed without ``members`` is asked again,
    and a target that never reports them (``group_members_returned: false``)
    gives no foreign members rather than a guess.

    The groups found, their foreign members, the ids listed and the stored
    member state are kept in the classifier's spill: memory holds one group's
    members at a time, not every group's.
    """
    from provisioner.group_executor import ENDPOINT, GroupExecutor, load_group_links, member_rows

    target = config.targets[name]
    assert target.groups is not None
    executor = GroupExecutor(engine, name, target, lambda: client, quirks=quirks)
    # What GroupExecutor.load reads, the member state and the managed ids kept in the spill rather than in memory.
    executor.links = {key: link for key, (link, _) in load_group_links(engine, name).items()}
    state = MemberState(classifier.spill)
    with engine.connect() as conn:
        state.load(member_rows(conn, name))
    executor.state = state  # type: ignore[assignment]  # read as a mapping only: .get(key)
    executor.managed = ManagedIds(classifier, state)  # type: ignore[assignment]  # read as a set only: in, &
    by_id = {link.scim_id: key for key, link in executor.links.items()}
    # displayName is caseExact false in the Group schema (RFC 7643 §8.7.1): a defined name in another case is ours.
    by_name = {display.casefold(): key for key, display in defined.items()}
    found = GroupFindings(classifier.spill)

    async def observe(group: dict[str, Any]) -> None:
        scim_id = str(group.get("id") or "")
        if not scim_id or not found.seen(scim_id):
            return
        display = group.get("displayName")
        display = display if isinstance(display, str) else None
        key = by_id.get(scim_id)
        if key is not None:
            members = await executor.members_in_target(client, executor.links[key], group)
            # Accounts we manage: every linked account. The member state is not enough: foreign members
            # queued for removal are recorded there, and must stay foreign until they are gone.
            foreign = sorted(m for m in members or () if not classifier.is_linked(m))
            found.add(GroupFinding(Situation.LINKED, key, scim_id, display, foreign))
        elif display is not None and display.casefold() in by_name:
            found.add(GroupFinding(Situation.UNLINKED, by_name[display.casefold()], scim_id, display))
        else:
            found.add(GroupFinding(Situation.UNMATCHED, None, scim_id, display))

    async for group in _pages(client, ENDPOINT, ["displayName", "members"], target.reconcile.page_size, name):
        await observe(group)
    for key, link in executor.links.items():
        if found.was_seen(link.scim_id):
            continue
        # Not on any page: only a 404 for the id itself says the group is gone.
        try:
            result = await client.get(ENDPOINT, link.scim_id)
        except NotFound:
            found.add(GroupFinding(Situation.DELETED, key, link.scim_id, link.display_name))
        else:
            await observe(result.resource or {"id": link.scim_id})
    return found


def _remove_foreign_members(
    engine: Engine, config: Config, name: str, run_id: str, groups: Iterable[GroupFinding]
) -> int:
    """Queue one ``group_members`` operation per linked group with foreign members (``group_members: exact``).

    The foreign members are first recorded in the group's member state, as a
    full compare records what it reads: the executor removes only members it
    knows the group holds. The removals go through the member brake
    (``max_member_removals`` / ``max_member_removal_share``): above it they are
    held until an operator approves the run. Returns the members queued for removal.
    """
    from provisioner.group_executor import GMEMBER, enqueue_groups, member_brake
    from provisioner.groups import GroupDecision, GroupKind, GroupPlan, GroupReason

    plan = GroupPlan(name)
    with engine.begin() as conn:
        for g in groups:
            if g.situation is not Situation.LINKED or not g.foreign_members or g.group is None:
                continue
            known = {row[0] for row in conn.execute(
                select(GMEMBER.c.member_id).where(GMEMBER.c.target == name, GMEMBER.c.group_key == g.group))}  # fmt: skip
            new = [m for m in g.foreign_members if m not in known]
            if new:
                conn.execute(insert(GMEMBER), [{"target": name, "group_key": g.group, "member_id": m,
                                                "identity_key": None} for m in new])  # fmt: skip
            plan.decisions.append(GroupDecision(g.group, GroupKind.MEMBERS, GroupReason.DRIFT, g.display_name or g.group,
                                                remove=tuple(g.foreign_members)))  # fmt: skip
    if plan.decisions:
        enqueue_groups(engine, run_id, name, plan, {}, brake=member_brake(config.targets[name]))
    return sum(len(d.remove) for d in plan.decisions)


async def _repair(
    engine: Engine,
    config: Config,
    name: str,
    mapping: AttributeMapping,
    report: ReconcileReport,
    classifier: Classifier,
    now: datetime,
    *,
    send: bool,
) -> None:
    """Plan and queue the reactions a page of findings at a time, in one transaction; then send them.

    Nothing is held for every account at once: each page's identities,
    decisions and link changes are written and let go. The deletion brake is
    applied once every page is written and before the transaction commits
    (:class:`~provisioner.queue.PlanWriter`): it sees the whole count, and no
    operation can be claimed before it has.
    """
    from provisioner.queue import PlanWriter
    from provisioner.sync import send_due  # sync imports the planner and executor; keep this module light

    target = config.targets[name]
    findings = report.findings if isinstance(report.findings, Findings) else None
    assert findings is not None, "a repair reads the findings from the run's spill"
    adopted, disputed = findings.adopted(), findings.disputed()
    lookup = _Lookup(classifier.spill)
    active = classifier.active_links()

    def brake(leavers: int) -> bool:
        return brake_trips(leavers, active, target.max_deprovision, target.max_deprovision_share)

    queued: Counter[str] = Counter()
    with engine.begin() as conn:
        first_seen = _track_unmatched(conn, name, findings, now)
        writer = PlanWriter(conn, report.run_id, name)
        # Linked accounts without drift need nothing: the reactions are planned from the others alone.
        for page in findings.attention_pages():
            identities = classifier.identities(f.identity for f in page if f.identity)
            planned = plan_repairs(page, identities, target.reconcile, first_seen=first_seen, now=now, lookup=lookup,
                                   unreadable_records=report.unreadable_records, adopted=adopted,
                                   disputed=disputed, create_only=mapping.create_only)  # fmt: skip
            for scim_id, why in planned.spared:
                log.info("unmatched account left as it is", target=name, id=scim_id, reason=why)
            _fix_links(conn, name, planned)
            writer.add(planned.decisions)
            # The page's decisions, link changes and spared accounts are let go: only their counts are kept.
            queued.update(planned.counts())
        writer.finish(brake)
    report.queued = queued
    report.repaired = True
    if target.groups is not None and target.group_members == "exact":
        report.foreign_removals = _remove_foreign_members(engine, config, name, report.run_id, report.groups)
    with engine.begin() as conn:
        conn.execute(
            insert(RUNS).values(id=report.run_id, target=name, started_at=now, finished_at=utcnow(),
                                counts=dumps(report.recorded_counts(target.groups is not None)),
                                drifted=report.drifted)  # fmt: skip
        )
        held = select(func.count()).select_from(OPERATIONS).where(
            OPERATIONS.c.run_id == report.run_id, OPERATIONS.c.status == "held"
        )
        report.held = int(conn.execute(held).scalar_one())
        report.held_removals = int(conn.execute(held.where(OPERATIONS.c.kind.notin_(DEPROVISION))).scalar_one())
    if report.held:
        log.warning("reconciliation held", target=name, run_id=report.run_id, leavers=report.held - report.held_removals,
                    group_removals=report.held_removals,
                    hint="provisioner plan --held, then provisioner approve RUN_ID or reject RUN_ID")  # fmt: skip
    if send and writer.added:
        sent = await send_due(engine, config, name, mapping)
        report.statuses = dict(sent.statuses)
    if send and report.foreign_removals and not report.held_removals:
        from provisioner.group_executor import send_due_groups

        sent_groups = await send_due_groups(engine, config, name)
        for status, n in sent_groups.statuses.items():
            report.statuses[status] = report.statuses.get(status, 0) + n


def _fix_links(conn: Any, name: str, repairs: Repairs) -> None:
    """Links as the target really is: drifted values as applied (hash cleared), gone accounts unlinked."""
    for key, applied in repairs.observed.items():
        conn.execute(
            update(LINK_TABLE)
            .where(LINK_TABLE.c.target == name, LINK_TABLE.c.identity_key == key)
            .values(applied=dumps(applied), applied_hash=None, updated_at=utcnow())
        )
    for key in repairs.drop:
        conn.execute(delete(LINK_TABLE).where(LINK_TABLE.c.target == name, LINK_TABLE.c.identity_key == key))


class _FirstSeen(Mapping[str, datetime]):
    """Since when each unmatched account (by id) has been seen, read from the state database as asked."""

    def __init__(self, conn: Any, name: str) -> None:
        self.conn, self.name = conn, name

    def __getitem__(self, scim_id: str) -> datetime:
        query = select(UNMATCHED.c.first_seen_at).where(UNMATCHED.c.target == self.name, UNMATCHED.c.scim_id == scim_id)
        found = self.conn.execute(query).scalar_one_or_none()
        if found is None:
            raise KeyError(scim_id)
        return as_utc(found)

    def __iter__(self) -> Iterator[str]:
        query = select(UNMATCHED.c.scim_id).where(UNMATCHED.c.target == self.name)
        return iter([row[0] for row in self.conn.execute(query)])

    def __len__(self) -> int:
        query = select(func.count()).select_from(UNMATCHED).where(UNMATCHED.c.target == self.name)
        return int(self.conn.execute(query).scalar_one())


def _track_unmatched(conn: Any, name: str, findings: Findings, now: datetime) -> Mapping[str, datetime]:
    """Record the unmatched accounts seen now; forget the others; return since when each has been seen.

    A page of accounts at a time: an adoption preview's target may hold nothing but unmatched accounts.
    """
    for page in findings.unmatched_pages():
        ids = dict(page)
        known = {row[0] for row in conn.execute(
            select(UNMATCHED.c.scim_id).where(UNMATCHED.c.target == name, UNMATCHED.c.scim_id.in_(list(ids))))}  # fmt: skip
        new = [{"target": name, "scim_id": i, "user_name": u, "first_seen_at": now, "last_seen_at": now}
               for i, u in ids.items() if i not in known]  # fmt: skip
        if new:
            conn.execute(insert(UNMATCHED), new)
        if known:
            conn.execute(
                update(UNMATCHED)
                .where(UNMATCHED.c.target == name, UNMATCHED.c.scim_id.in_(list(known)))
                .values(last_seen_at=now)
            )
    rows = conn.execute(select(UNMATCHED.c.scim_id).where(UNMATCHED.c.target == name)).fetchall()
    gone = [scim_id for (scim_id,) in rows if not findings.is_unmatched(scim_id)]
    del rows
    for start in range(0, len(gone), 500):
        conn.execute(delete(UNMATCHED).where(UNMATCHED.c.target == name, UNMATCHED.c.scim_id.in_(gone[start:start + 500])))
    return _FirstSeen(conn, name)


def last_reconciled(engine: Engine, name: str) -> dict[str, Any] | None:
    """The latest reconciliation of a target that was recorded (a repair run), or None."""
    with engine.connect() as conn:
        row = conn.execute(
            select(RUNS).where(RUNS.c.target == name).order_by(RUNS.c.started_at.desc()).limit(1)
        ).mappings().first()
    return dict(row) if row else None


GROUP_SITUATIONS = ("linked", "unlinked", "unmatched", "deleted")


def publish(target: str, counts: Mapping[str, Any], drifted: int) -> None:
    """Set the Prometheus gauges of a target's reconciliation: accounts by situation, drifted accounts; groups.

    ``counts``: accounts by situation, and under ``groups`` (a target that
    manages groups) groups by situation with ``foreign_members``, as
    :meth:`ReconcileReport.recorded_counts` gives them.
    """
    for situation in Situation:
        metrics.RECONCILE_ACCOUNTS.labels(target, situation.value).set(counts.get(situation.value, 0))
    metrics.RECONCILE_DRIFTED.labels(target).set(drifted)
    groups = counts.get("groups")
    if isinstance(groups, Mapping):
        for situation in GROUP_SITUATIONS:
            metrics.RECONCILE_GROUPS.labels(target, situation).set(groups.get(situation, 0))
        metrics.RECONCILE_FOREIGN_MEMBERS.labels(target).set(groups.get("foreign_members", 0))


def publish_last(engine: Engine, target: str) -> None:
    """Publish the gauges of a target's last recorded reconciliation, if any (a restarted daemon)."""
    last = last_reconciled(engine, target)
    if last is not None and last["counts"]:
        publish(target, orjson.loads(last["counts"]), int(last["drifted"]))
