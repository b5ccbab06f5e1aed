"""Sending group operations to a target, and the group state they leave behind.

One group step of a cycle (:func:`sync_groups`), run after the users are sent:

1. **Compare** (I/O): groups whose members were not read from the target for
   ``group_reconcile_every`` are fetched (``GET /Groups/{id}``); their member
   sets, restricted to the accounts we manage, replace what we had stored, so a
   member removed by hand is seen as missing and added back.
2. **Plan** (pure, :func:`provisioner.groups.plan_groups`): desired members vs stored members.
3. **Queue**: group operations are rows of the operation table, claimed by their kinds.
4. **Send**: per group, create or link it (by ``displayName``: never a duplicate),
   then PATCH member changes in batches of ``max_members_per_patch`` (or GET +
   PUT of the whole member list for targets without PATCH). A 412 refetches
   the group and recomputes what is left against its fresh member list.

Each outcome is written with the group link and member changes it made, in one
transaction; a batch that succeeded before a later one failed is kept.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import quote
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, and_, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.dialects import postgresql, sqlite

from connectors import (
    AuthError,
    Capabilities,
    Conflict,
    NotFound,
    PermanentError,
    PreconditionFailed,
    Quirks,
    ScimClient,
    ScimError,
    ScimRequest,
    ScimResult,
    TransientError,
    equals_filter,
)
from provisioner.config import Config, TargetConfig, parse_duration
from provisioner.groups import (
    GroupDecision,
    GroupKind,
    GroupLink,
    GroupPlan,
    batches,
    desired_groups,
    group_resource,
    load_groups,
    patch_operations,
    plan_groups,
    GROUP_KINDS,
)
from provisioner.mapping import AttributeMapping
from provisioner.planner import Kind, Link, Plan, brake_trips
from provisioner.payload import dumps, loads
from provisioner.reactions import MembersRead, Step, group_members, next_removal_form, on_member_removal
from provisioner.quarantine import Admission, Tally, admission
from provisioner.quirks import load_quirks
from provisioner.executor import call_records, judge, put_off, tally_outcome, target_answers
from provisioner.queue import (
    DEPROVISION,
    CallRecord,
    claim_rows,
    finish,
    load_links,
    open_rows,
    release,
    write_plan,
)
from provisioner.sources import read_off_loop, read_source
from provisioner.store import GroupLink as GroupLinkTable
from provisioner.store import AccountLink, GroupMemberState, Operation, as_utc, upsert, utcnow
from provisioner.store import Attempt
from provisioner.targets import TargetSession, discover

log = structlog.get_logger("provisioner.groups")

OP = Operation.__table__
ATTEMPT = Attempt.__table__
GLINK = GroupLinkTable.__table__
GMEMBER = GroupMemberState.__table__
LINK = AccountLink.__table__
ENDPOINT = "Groups"
# 412 rounds per group operation before it goes to review.
PRECONDITION_ROUNDS = 3
CLAIM_PAGE = 1000
# Members of a group whose reads omit members are checked one filter each, up to this many;
# beyond it the stored state is trusted (with a warning) rather than flooding the target.
FILTER_READ_CAP = 50
BODY_CAP = 4_000
ClientFactory = Callable[[], ScimClient]


# ---------------------------------------------------------------- state


def load_group_links(engine: Engine, target: str) -> dict[str, tuple[GroupLink, datetime | None]]:
    """Every group link of a target with when its members were last read from the target."""
    with engine.connect() as conn:
        rows = conn.execute(select(GLINK).where(GLINK.c.target == target)).mappings()
        return {
            r["group_key"]: (GroupLink(r["group_key"], r["scim_id"], r["display_name"], r["etag"]), as_utc(r["verified_at"]) if r["verified_at"] else None)
            for r in rows
        }


def member_rows(conn: Connection, target: str) -> Iterable[tuple[str, str]]:
    """(group key, member id) of every stored member of a target's groups, streamed a thousand rows at a time.

    Read them before ``conn`` is closed.
    """
    query = select(GMEMBER.c.group_key, GMEMBER.c.member_id).where(GMEMBER.c.target == target)
    return ((key, member) for key, member in conn.execute(query, execution_options={"yield_per": 1000}))


def load_member_state(engine: Engine, target: str) -> dict[str, set[str]]:
    """Member ids per group, as last applied or read."""
    state: dict[str, set[str]] = {}
    with engine.connect() as conn:
        for key, member in member_rows(conn, target):
            state.setdefault(key, set()).add(member)
    return state


def load_usernames(engine: Engine, target: str) -> dict[str, str]:
    """Account id -> userName as last applied, for targets whose members[].value is the userName."""
    names: dict[str, str] = {}
    with engine.connect() as conn:
        for scim_id, applied in conn.execute(select(LINK.c.scim_id, LINK.c.applied).where(LINK.c.target == target)):
            name = (loads(applied) or {}).get("userName") if applied else None
            if isinstance(name, str):
                names[scim_id] = name
    return names


def held_identities(engine: Engine, target: str) -> set[str]:
    """Identities whose deprovisioning is held by the deletion brake: their memberships wait too."""
    with engine.connect() as conn:
        query = select(OP.c.identity_key).where(OP.c.target == target, OP.c.status == "held",
                                                OP.c.kind.in_(DEPROVISION))  # fmt: skip
        return {row[0] for row in conn.execute(query)}


def member_brake(target: TargetConfig) -> Callable[[int, int], bool] | None:
    """The deletion brake on member removals, for ``group_members: exact``; None otherwise.

    It gets the number of members a run would remove and the members of our
    groups as last known, and says whether the removals must wait for an
    operator: over ``max_member_removals``, or over ``max_member_removal_share``
    (:func:`provisioner.planner.brake_trips`, as leavers are braked). The same
    limits as :func:`delete_brake`: under ``additive`` only deletes are braked.
    """
    return delete_brake(target) if target.group_members == "exact" else None


def delete_brake(target: TargetConfig) -> Callable[[int, int], bool]:
    """The deletion brake on group deletes, whatever ``group_members`` says.

    Deleting a group takes every member with it (those of accounts we do not
    manage too), and a group is deleted when its rule is gone from the groups
    file: a rule removed by mistake must not empty the target's groups in one
    cycle. A delete counts as removing each member the group holds, against
    ``max_member_removals`` and ``max_member_removal_share``.
    """

    def trips(removals: int, members: int) -> bool:
        return brake_trips(removals, members, target.max_member_removals, target.max_member_removal_share)

    return trips


def enqueue_groups(
    engine: Engine, run_id: str, target: str, plan: GroupPlan, identities: dict[str, str], *,
    brake: Callable[[int, int], bool] | None = None, deletes: Callable[[int, int], bool] | None = None,
    partial: bool = False,
) -> int:
    """Write a group plan to the queue; an identical open row is kept, an older different one superseded.

    ``brake`` (see :func:`member_brake`) gets the number of members the new rows
    would remove and the members of the target's groups in the member state;
    when it says so, the removals are written ``held`` and wait for
    ``provisioner approve RUN_ID``. Only removals wait: a group that also gains
    members (or is renamed) gets two rows, its additions sent at once and its
    removals held. Removals already held (or approved) for a group stay the row
    they are while the plan still wants exactly them, so the run to approve does
    not move from cycle to cycle. Removals an operator rejected that the plan
    still wants are held again, and their row says so.

    ``deletes`` (see :func:`delete_brake`) does the same for group deletes: each
    counts as removing the members it lists (with the run's removals when
    ``brake`` is given too), and when it trips the delete row is written
    ``held``, whole: nothing of the group is deleted until approved.

    ``partial``: the plan is about some members only (``sync --only``); held
    removals of a group it removes nobody from are none of its business and stay held.
    """
    now = utcnow()
    rows: list[dict[str, Any]] = []
    superseded: list[int] = []
    with engine.begin() as conn:
        open_by_key = open_rows(conn, target, GROUP_KINDS)
        wanted = _not_running(plan, open_by_key)
        for key in plan.settled:
            superseded.extend(r.id for r in open_by_key.get(key, ()) if r.status != "running")
        hold_removals, hold_deletes = _verdict(conn, target, wanted, brake, deletes)
        names: dict[str, str] | None = None
        for d, existing in wanted:
            if d.kind is GroupKind.DELETE:
                parts = [(d, "held" if hold_deletes and not _queued(d, existing) else "pending")]
            elif d.remove and not _queued(d, existing) and (hold_removals or _removals_queued(d, existing)):
                if names is None:
                    names = _group_names(conn, target)
                parts = _split(d, names.get(d.group_key), held=hold_removals)
            else:
                parts = [(d, "pending")]
            kept: set[int] = set()
            for part, status in parts:
                digest = part.payload_hash()
                same = [r.id for r in existing if _is(part, r)]
                if same:
                    kept.add(same[0])
                    continue
                row = _new_row(run_id, target, part, digest, identities, now)
                row["status"] = status
                if status == "held":
                    _note_rejection(conn, target, row)
                rows.append(row)
            spared = partial and not d.remove
            superseded.extend(r.id for r in existing if r.id not in kept and not (spared and r.status == "held"))
        write_plan(conn, rows, superseded, now)
    return len(rows)


def _not_running(plan: GroupPlan, open_by_key: dict[str, list[Any]]) -> list[tuple[GroupDecision, list[Any]]]:
    """The plan's decisions with the open rows of their group, but for groups with a row running.

    A group being sent now is planned again once its row has finished. The one
    filter of :func:`enqueue_groups` and :func:`would_hold`, so the dry run
    judges the very decisions a cycle would write.
    """
    wanted: list[tuple[GroupDecision, list[Any]]] = []
    for d in plan.decisions:
        existing = open_by_key.get(d.group_key, [])
        if not any(r.status == "running" for r in existing):
            wanted.append((d, existing))
    return wanted


def _verdict(
    conn: Any, target: str, wanted: list[tuple[GroupDecision, list[Any]]],
    brake: Callable[[int, int], bool] | None, deletes: Callable[[int, int], bool] | None,
) -> tuple[bool, bool]:
    """Whether the brakes hold these decisions' (member removals, group deletes); what is queued already is not."""
    removals = sum(len(d.remove) for d, existing in wanted
                   if d.kind is not GroupKind.DELETE and not _removals_queued(d, existing))  # fmt: skip
    # A delete takes its members with it: it counts as their removal.
    deleted = sum(len(d.remove) for d, existing in wanted if d.kind is GroupKind.DELETE and not _queued(d, existing))
    counted = (removals if brake is not None else 0) + (deleted if deletes is not None else 0)
    judge = brake or deletes
    tripped = judge is not None and counted > 0 and judge(counted, _member_count(conn, target))
    # Each kind is said held only when the plan has some of it: a brake tripped by removals holds no delete.
    return tripped and brake is not None and removals > 0, tripped and deletes is not None and deleted > 0


def would_hold(engine: Engine, name: str, target: TargetConfig, plan: GroupPlan) -> tuple[bool, bool]:
    """Whether a cycle writing ``plan`` would hold its (member removals, group deletes); reads, writes nothing.

    The same judgement :func:`enqueue_groups` makes with :func:`member_brake`
    and :func:`delete_brake`, against the open rows and the member state now:
    removals already held or approved are not counted again.
    """
    with engine.connect() as conn:
        wanted = _not_running(plan, open_rows(conn, name, GROUP_KINDS))
        return _verdict(conn, name, wanted, member_brake(target), delete_brake(target))


def _removals(d: GroupDecision) -> GroupDecision:
    """The member removals of a decision alone: the part the member brake may hold."""
    return GroupDecision(d.group_key, GroupKind.MEMBERS, d.reason, d.display_name, remove=d.remove)


def _is(d: GroupDecision, row: Any) -> bool:
    """Whether an open row is this very decision; a held one only if it holds nothing but removals.

    A held row that also adds members (written so before additions went on
    without approval) is not kept: it is split anew.
    """
    return row.kind == d.kind.value and row.payload_hash == d.payload_hash() and (row.status != "held" or not d.add)


def _queued(d: GroupDecision, existing: list[Any]) -> bool:
    """Whether the decision is queued already, as it is."""
    return any(_is(d, r) for r in existing)


def _removals_queued(d: GroupDecision, existing: list[Any]) -> bool:
    """Whether the decision's removals are queued already (as it is, or as a removals row held or approved)."""
    if not d.remove or _queued(d, existing):
        return True
    digest = _removals(d).payload_hash()
    return any(r.kind == GroupKind.MEMBERS.value and r.payload_hash == digest for r in existing)


def _split(d: GroupDecision, linked_name: str | None, *, held: bool) -> list[tuple[GroupDecision, str]]:
    """A decision as two rows: what it adds (and a rename) sent at once, what it removes held when ``held``."""
    parts: list[tuple[GroupDecision, str]] = []
    if d.add or d.kind is not GroupKind.MEMBERS or linked_name != d.display_name:
        parts.append((replace(d, remove=()), "pending"))
    parts.append((_removals(d), "held" if held else "pending"))
    return parts


def _group_names(conn: Any, target: str) -> dict[str, str]:
    """Group key -> display name in the target, as linked."""
    return dict(conn.execute(select(GLINK.c.group_key, GLINK.c.display_name).where(GLINK.c.target == target)).all())


def _note_rejection(conn: Any, target: str, row: dict[str, Any]) -> None:
    """Say on a held row when an operator rejected these very removals before and the plan still wants them."""
    query = (
        select(OP.c.run_id)
        .where(OP.c.target == target, OP.c.identity_key == row["identity_key"], OP.c.kind == row["kind"],
               OP.c.payload_hash == row["payload_hash"], OP.c.status == "cancelled")  # fmt: skip
        .order_by(OP.c.id.desc())
        .limit(1)
    )
    rejected = conn.execute(query).scalar()
    if rejected is not None:
        row["note"] = f"{row['note']} (rejected in run {rejected}, still planned)"
        log.warning("group member removals rejected before are held again", target=target, group=row["identity_key"],
                    rejected_run=rejected, run_id=row["run_id"])  # fmt: skip


def _member_count(conn: Any, target: str) -> int:
    """Members of the target's groups in the member state (ours, and foreign ones known)."""
    return int(conn.execute(select(func.count()).select_from(GMEMBER).where(GMEMBER.c.target == target)).scalar_one())


def _new_row(
    run_id: str, target: str, d: GroupDecision, digest: str, identities: dict[str, str], now: datetime
) -> dict[str, Any]:
    return {
        "run_id": run_id, "target": target, "identity_key": d.group_key, "kind": d.kind.value,
        "reason": d.reason.value, "status": "pending", "payload": dumps(d.payload(identities)),
        "payload_hash": digest, "attempts": 0, "next_attempt_at": None, "lease_until": None,
        "last_http_status": None, "last_scim_type": None, "last_detail": None, "last_error": None,
        "note": _summary(d), "created_at": now, "updated_at": now, "finished_at": None,
    }  # fmt: skip


def _summary(d: GroupDecision) -> str:
    """What the row does, for ``queue list``: the group's name and its member changes."""
    parts = [f"{'delete ' if d.kind is GroupKind.DELETE else ''}group {d.display_name!r}"]
    if d.add:
        parts.append(f"+{len(d.add)} members")
    if d.remove:
        parts.append(f"-{len(d.remove)} members")
    return " ".join(parts)


@dataclass(frozen=True, slots=True)
class GroupOperation:
    """A claimed group operation."""

    id: int
    group_key: str
    kind: GroupKind
    reason: str
    display_name: str
    add: tuple[str, ...]
    remove: tuple[str, ...]
    identities: dict[str, str | None]
    attempts: int
    created_at: datetime
    # It failed before: a failure now may be its own rather than the target's (see quarantine).
    failed_before: bool = False


def claim_groups(
    engine: Engine, target: str, *, now: datetime | None = None, limit: int | None = None,
    groups: Collection[str] | None = None,
) -> list[GroupOperation]:
    """Take due group operations of a target (pending, due retries, expired leases), oldest first; only ``groups``' when given."""
    rows = claim_rows(engine, target, GROUP_KINDS, now=now, limit=limit, identities=groups)
    claimed = []
    for row in rows:
        payload = loads(row["payload"]) or {}
        add = payload.get("add") or []
        remove = payload.get("remove") or []
        claimed.append(
            GroupOperation(
                id=row["id"],
                group_key=row["identity_key"],
                kind=GroupKind(row["kind"]),
                reason=row["reason"],
                display_name=payload.get("displayName") or row["identity_key"],
                add=tuple(m["value"] for m in add),
                remove=tuple(m["value"] for m in remove),
                identities={m["value"]: m.get("identity") for m in [*add, *remove]},
                attempts=row["attempts"] + 1,
                created_at=row["created_at"],
                failed_before=row["last_error"] is not None,
            )
        )
    return claimed


@dataclass(slots=True)
class GroupOutcome:
    """How a group operation ended, and what it changed in the target (also when it failed half-way)."""

    operation_id: int
    status: str = "succeeded"
    note: str | None = None
    error: str | None = None
    http_status: int | None = None
    scim_type: str | None = None
    detail: str | None = None
    link: GroupLink | None = None
    drop_link: bool = False
    verified: bool = False
    # Member ids known to be in the group now (a matched group, a fresh read): replaces the stored set.
    reset: set[str] | None = None
    added: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    calls: list[CallRecord] = field(default_factory=list)
    attempt: int = 1
    # Seconds the target asked us to wait (Retry-After): the row is due then.
    retry_after: float | None = None


def record_group(engine: Engine, target: str, key: str, identities: dict[str, str | None], out: GroupOutcome) -> None:
    """Write a group operation's outcome, its calls, the group link and member changes, in one transaction."""
    now = utcnow()
    try:
        with engine.begin() as conn:
            finish(conn, out, now)
            _write_group_state(conn, engine.dialect.name, target, key, identities, out, now)
    except IntegrityError:
        if out.link is None:
            raise
        # Another group rule linked this SCIM group meanwhile (two rules resolving to one
        # existing group, sent at once): one group, one rule; this one goes to review.
        scim_id = out.link.scim_id
        owner = _group_owner(engine, target, scim_id)
        out.status, out.link, out.reset, out.verified = "failed", None, None, False
        out.added, out.removed = set(), set()
        out.error = f"group {scim_id} is already linked to group {owner!r}; two rules resolve to one SCIM group"
        with engine.begin() as conn:
            finish(conn, out, now)


def _write_group_state(
    conn: Any, dialect: str, target: str, key: str, identities: dict[str, str | None], out: GroupOutcome, now: datetime
) -> None:
    members = and_(GMEMBER.c.target == target, GMEMBER.c.group_key == key)
    if out.drop_link:
        conn.execute(delete(GLINK).where(GLINK.c.target == target, GLINK.c.group_key == key))
        conn.execute(delete(GMEMBER).where(members))
        return
    if out.link is not None:
        values = {"target": target, "group_key": key, "scim_id": out.link.scim_id,
                  "display_name": out.link.display_name, "etag": out.link.etag, "updated_at": now}  # fmt: skip
        if out.verified:
            values["verified_at"] = now
        changed = [name for name in values if name not in ("target", "group_key")]
        conn.execute(upsert(GLINK, ("target", "group_key"), changed, dialect), values)
    if out.reset is not None:
        conn.execute(delete(GMEMBER).where(members))
        _insert_members(conn, dialect, target, key, out.reset, identities)
    if out.removed:
        removed = list(out.removed)
        for start in range(0, len(removed), 500):
            conn.execute(delete(GMEMBER).where(members, GMEMBER.c.member_id.in_(removed[start : start + 500])))
    if out.added:
        _insert_members(conn, dialect, target, key, out.added, identities)


def _insert_members(conn: Any, dialect: str, target: str, key: str, ids: Iterable[str], identities: dict[str, str | None]) -> None:
    rows = [{"target": target, "group_key": key, "member_id": m, "identity_key": identities.get(m)} for m in ids]
    if rows:
        module = postgresql if dialect == "postgresql" else sqlite
        conn.execute(module.insert(GMEMBER).on_conflict_do_nothing(), rows)


# ---------------------------------------------------------------- sending


@dataclass(slots=True)
class GroupReport:
    """What the group step of a cycle did in one target."""

    planned: dict[str, int] = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)
    done: Counter[str] = field(default_factory=Counter)
    compared: int = 0
    drifted: int = 0
    skipped: int = 0
    calls: int = 0
    # Member removals of this run held by the brake (group_members: exact): operations, not members.
    held: int = 0


def _held_removals(engine: Engine, run_id: str, name: str) -> int:
    """Group operations of a run held by the member brake; said in the log with what releases them."""
    with engine.connect() as conn:
        held = int(conn.execute(select(func.count()).select_from(OP).where(
            OP.c.run_id == run_id, OP.c.target == name, OP.c.status == "held", OP.c.kind.in_(GROUP_KINDS))).scalar_one())  # fmt: skip
    if held:
        log.warning("group member removals held", target=name, run_id=run_id, operations=held,
                    hint=f"provisioner plan --held, then provisioner approve {run_id} or reject {run_id}")  # fmt: skip
    return held


class GroupExecutor:
    """Compares and sends the groups of one target."""

    def __init__(
        self, engine: Engine, target: str, config: TargetConfig, client_factory: ClientFactory, *, quirks: Quirks | None = None
    ) -> None:
        self.engine = engine
        self.target = target
        self.config = config
        self.client_factory = client_factory
        # The target's deviations, declared and learned (shared with its clients when they come from one session).
        self.quirks = quirks if quirks is not None else load_quirks(engine, target, config)
        self.capabilities: Capabilities | None = None
        self.links: dict[str, GroupLink] = {}
        self.state: dict[str, set[str]] = {}
        # SCIM ids of the accounts we manage: the only members we ever add, remove or compare.
        self.managed: set[str] = set()
        self.stopping = asyncio.Event()
        self.calls = 0
        # Account id -> userName, read when the target lists members by userName.
        self._names: dict[str, str] | None = None
        self._by_name: dict[str, str] | None = None

    def load(self) -> dict[str, datetime | None]:
        """Read group links, member state and managed accounts; return when each group was last compared."""
        links = load_group_links(self.engine, self.target)
        self.links = {key: link for key, (link, _) in links.items()}
        self.state = load_member_state(self.engine, self.target)
        self.managed = {link.scim_id for link in load_links(self.engine, self.target).values()}
        for members in self.state.values():
            self.managed |= members
        return {key: verified for key, (_, verified) in links.items()}

    async def _discover(self, client: ScimClient) -> Capabilities:
        if self.capabilities is None:
            self.capabilities = await discover(client, self.config, update_method=self.config.group_update_method)
        return self.capabilities

    async def compare(self, keys: list[str]) -> set[str]:
        """Read the members of these linked groups from the target; return the groups that drifted.

        Only members that are accounts we manage count: members added in the
        target by hand, for accounts we do not manage, are left alone.
        """
        drifted: set[str] = set()
        if not keys:
            return drifted
        work = list(keys)

        async def worker(client: ScimClient) -> None:
            while work and not self.stopping.is_set():
                key = work.pop()
                link = self.links[key]
                out = GroupOutcome(0, verified=True)
                try:
                    fresh = await client.get(ENDPOINT, link.scim_id)
                    read, fresh_read = await self._members(client, link, fresh)
                except NotFound:
                    log.warning("group missing in the target; it will be created again", target=self.target, group=key)
                    out.drop_link = True
                    self.links.pop(key, None)
                    self.state.pop(key, None)
                except ScimError as exc:
                    log.warning("group compare failed", target=self.target, group=key, error=str(exc))
                    continue
                else:
                    if fresh_read is None:
                        # Members not reported: nothing to compare; never read as "empty".
                        out.verified = False
                    members = read & self.managed
                    stored = self.state.get(key, set())
                    if fresh_read is not None and members - stored and stored and not self.quirks.verify_writes:
                        # Members we never added or had removed are back: the target's 200s cannot be trusted.
                        self.quirks.learn("verify_writes", True,
                                          f"group {link.scim_id} read back holds members the engine had removed")  # fmt: skip
                    if members != stored:
                        drifted.add(key)
                        out.reset = members
                        self.state[key] = members
                    out.link = GroupLink(key, link.scim_id, _name(fresh.resource) or link.display_name, fresh.version)
                    self.links[key] = out.link
                finally:
                    self.calls += len(client.history)
                    client.history.clear()
                with self.engine.begin() as conn:
                    _write_group_state(conn, self.engine.dialect.name, self.target, key, {}, out, utcnow())

        clients = [self.client_factory() for _ in range(min(self.config.max_concurrency, len(work)))]
        try:
            await asyncio.gather(*(worker(c) for c in clients))
        finally:
            await asyncio.gather(*(c.aclose() for c in clients))
        return drifted

    async def run(self, operations: list[GroupOperation]) -> GroupReport:
        """Send every operation (different groups concurrently) and record each outcome."""
        report = GroupReport()
        if not operations:
            return report
        gate = admission(self.engine, self.target)
        if gate is Admission.SKIP:
            # Paused, or quarantined between probes: the operations wait in the queue.
            release(self.engine, [op.id for op in operations])
            report.skipped = len(operations)
            return report
        finished: set[int] = set()
        work = list(reversed(operations))
        clients = [self.client_factory() for _ in range(min(self.config.max_concurrency, len(operations)))]
        # Group operations count toward the target's health like the users' (see quarantine).
        tally = Tally()
        try:
            try:
                await self._discover(clients[0])
            except (TransientError, AuthError) as exc:
                log.warning("target unreachable", target=self.target, error=str(exc))
                tally.add(ok=False, unwell=True, auth=isinstance(exc, AuthError), error=str(exc))
                return report
            finally:
                self.calls += len(clients[0].history)
                clients[0].history.clear()

            def stop() -> bool:
                breaker = tally.consecutive_failures >= self.config.quarantine.consecutive_failures
                return self.stopping.is_set() or breaker

            # Groups being sent: a group's operations (its additions, then its approved removals) go one
            # after the other, each against the member state the one before left.
            busy: set[str] = set()

            def take() -> GroupOperation | None:
                for index in range(len(work) - 1, -1, -1):
                    if work[index].group_key not in busy:
                        return work.pop(index)
                return None  # the rest belongs to groups other workers are sending, and take next

            async def worker(client: ScimClient) -> None:
                while work and not stop():
                    op = take()
                    if op is None:
                        return
                    busy.add(op.group_key)
                    started = time.perf_counter()
                    out = await self._apply(client, op)
                    out.calls = call_records(client.history, out.status == "succeeded", self.config.call_bodies)
                    self.calls += len(client.history)
                    client.history.clear()
                    out.attempt = op.attempts
                    if out.http_status is None and out.calls:
                        out.http_status = out.calls[-1].http_status
                    record_group(self.engine, self.target, op.group_key, op.identities, out)
                    self._remember(op.group_key, out)
                    finished.add(op.id)
                    busy.discard(op.group_key)
                    tally_outcome(tally, out, repeated=op.failed_before)
                    report.statuses[out.status] += 1
                    if out.status == "succeeded":
                        report.done[op.kind.value] += 1
                    event = log.info if out.status == "succeeded" else log.warning
                    event("group operation", target=self.target, group=op.group_key, kind=op.kind.value,
                          status=out.status, added=len(out.added), removed=len(out.removed), calls=len(out.calls),
                          duration_ms=round((time.perf_counter() - started) * 1000, 1), error=out.error)  # fmt: skip

            if gate is Admission.PROBE:
                # Quarantined, due for a probe: a read, then the operation tried least, alone.
                if not await target_answers(clients[0], tally):
                    return report
                probe = min(operations, key=lambda op: (op.failed_before, op.attempts, op.created_at))
                rest = [op for op in work if op is not probe]
                work[:] = [probe]
                await worker(clients[0])
                if not tally.succeeded:
                    return report
                work[:] = rest
            await asyncio.gather(*(worker(c) for c in clients))
            if tally.only_repeated:
                await target_answers(clients[0], tally)
        finally:
            await asyncio.gather(*(c.aclose() for c in clients))
            unstarted = [op.id for op in operations if op.id not in finished]
            release(self.engine, unstarted)
            report.skipped = len(unstarted)
            judge(self.engine, self.target, self.config, tally)
        return report

    def _remember(self, key: str, out: GroupOutcome) -> None:
        if out.drop_link:
            self.links.pop(key, None)
            self.state.pop(key, None)
            return
        if out.link is not None:
            self.links[key] = out.link
        members = self.state.setdefault(key, set())
        if out.reset is not None:
            members.clear()
            members |= out.reset
        members -= out.removed
        members |= out.added

    async def _apply(self, client: ScimClient, op: GroupOperation) -> GroupOutcome:
        out = GroupOutcome(op.id)
        try:
            await self._send(client, op, out)
        except NotFound as exc:
            if op.kind is GroupKind.DELETE:
                out.drop_link = True
                out.note = "group not found in the target"
                return out
            # The group vanished from the target: forget it; the next cycle creates it again.
            _fail(out, "retry_wait", exc)
            out.drop_link = True
        except (TransientError, AuthError) as exc:
            _fail(out, "failed" if utcnow() - op.created_at > timedelta(days=7) else "retry_wait", exc)
            if out.status == "retry_wait" and client.retry.defers(exc):
                out.retry_after = put_off(client, exc)
        except PermanentError as exc:
            _fail(out, "failed", exc)
        return out

    async def _send(self, client: ScimClient, op: GroupOperation, out: GroupOutcome) -> None:
        link = self.links.get(op.group_key)
        if op.kind is GroupKind.DELETE:
            if link is not None:
                await self._delete(client, op, link, out)
            out.drop_link = True
            return
        base = set(self.state.get(op.group_key, set()))
        if link is None:
            link, found = await self._link_or_create(client, op, out)
            if found is not None:
                base = found
                out.reset = set(found)
            else:
                base = set()
                out.reset = set()
        # Against what the group holds now: a retried operation never repeats what already happened.
        add = [m for m in op.add if m not in base]
        remove = [m for m in op.remove if m in base]
        rename = op.display_name if link.display_name != op.display_name else None
        if not add and not remove and rename is None:
            out.link = link
            return
        # The managed members the group must have once this operation is done: what a 412 is rebased on.
        desired = (base | set(op.add)) - set(op.remove)
        await self._change(client, link, add, remove, op.display_name, out, desired)

    async def _change(
        self, client: ScimClient, link: GroupLink, add: list[str], remove: list[str], name: str, out: GroupOutcome,
        desired: set[str] | None = None,
    ) -> None:
        """Send member changes (and a rename to ``name``) by PATCH, or by GET + PUT of the whole group.

        PUT when PATCH is not used (``ServiceProviderConfig.patch``, RFC 7644 §3.5.2,
        or ``group_update_method``), or when there are removals and the target was
        found not to apply them by PATCH (``member_removal: put``, learned).
        ``desired``: as :meth:`_patch` and :meth:`_put` take it.
        """
        if self._use_patch() and not (remove and self.quirks.member_removal == "put"):
            rename = name if name != link.display_name else None
            await self._patch(client, link, add, remove, rename, out, desired)
        else:
            await self._put(client, link, add, remove, name, out, desired)

    async def _delete(self, client: ScimClient, op: GroupOperation, link: GroupLink, out: GroupOutcome) -> None:
        """DELETE a group no longer defined, unless it is kept for others; on a 412, decide again from a fresh read."""
        fresh: ScimResult | None = None
        for round_ in range(PRECONDITION_ROUNDS + 1):
            kept, version = await self._left_to_others(client, op, link, out, fresh)
            if kept:
                return
            try:
                await client.delete(ENDPOINT, link.scim_id, etag=self._etag(version or link.etag))
                return
            except PreconditionFailed as exc:
                # Someone changed the group since we last read it: what it holds now decides.
                if round_ == PRECONDITION_ROUNDS:
                    exc.message = f"{exc.message}; still stale after {PRECONDITION_ROUNDS} refetches"
                    raise
                fresh = await client.get(ENDPOINT, link.scim_id)
                link = GroupLink(link.group_key, link.scim_id, link.display_name, fresh.version)

    async def _left_to_others(
        self, client: ScimClient, op: GroupOperation, link: GroupLink, out: GroupOutcome, fresh: ScimResult | None = None
    ) -> tuple[bool, str | None]:
        """Under ``group_members: additive``, whether the group holds members we do not manage, and is kept.

        Also the version the read found (None: not read), for the DELETE's If-Match.
        ``fresh``: the group as read after a 412, decided on without reading it again.

        Only a group left empty is deleted (``delete_empty_groups``): one that
        still holds members added by hand or by another tool is read first and
        kept for them, with the members the row removes taken out of it. A
        target whose reads omit members is trusted as our member state says.
        Under ``exact`` the group is ours alone and is deleted as planned.
        """
        if self.config.group_members != "additive":
            return False, None
        members, read = await self._members(client, link, fresh)
        version = read.version if read is not None else None
        foreign = members - self.managed
        if not foreign:
            return False, version
        ours = sorted(members & set(op.remove))
        if ours:
            await self._change(client, link, [], ours, link.display_name, out)
        out.note = (f"not deleted: it holds {len(foreign)} members we do not manage (group_members: additive); "
                    f"removed our {len(ours)} and left the group to them")  # fmt: skip
        log.warning("group no longer defined kept for members we do not manage", target=self.target,
                    group=op.group_key, foreign=len(foreign), removed=len(ours))  # fmt: skip
        return True, version

    async def _link_or_create(
        self, client: ScimClient, op: GroupOperation, out: GroupOutcome
    ) -> tuple[GroupLink, set[str] | None]:
        """Link the target's group of that displayName, or POST a new one. Never a duplicate."""
        found = await self._find_group(client, op.display_name)
        if len(found) > 1:
            ids = ", ".join(str(g.get("id")) for g in found)
            raise Conflict(f"displayName eq {op.display_name!r} matches {len(found)} groups in the target ({ids}); "
                           "expected at most one to link")  # fmt: skip
        note = "linked an existing group of the same displayName"
        if not found:
            first = sorted(op.add) if self.quirks.group_create_with_members else None
            try:
                result = await self._create_group(client, op, first)
            except Conflict as exc:
                # The lookup missed a group the target has (its filter lags or ignores case): look again.
                found = await self._conflicting(client, op, exc)
                note = "409 on create: linked the existing group of that displayName"
            else:
                out.link = GroupLink(op.group_key, result.id or "", op.display_name, result.version)
                out.verified = True
                if result.first is None:
                    return out.link, None
                out.added.update(result.first)
                return out.link, set(result.first)
        if found:
            existing = found[0]
            scim_id = str(existing["id"])
            # Claimed before anything is sent to it: two rules resolving to this group never both write it.
            owner = _claim_group(self.engine, self.target, op.group_key, scim_id, _name(existing) or op.display_name)
            if owner is not None and owner != op.group_key:
                raise Conflict(f"group {scim_id} ({op.display_name!r}) is already linked to group {owner!r}")
            version = (existing.get("meta") or {}).get("version")
            out.link = GroupLink(op.group_key, scim_id, _name(existing) or op.display_name, version)
            out.note = note
            members = self._ids(existing) if "members" in existing else None
            if members is None:
                fresh = await client.get(ENDPOINT, scim_id)
                members = self._ids(fresh.resource)
                out.link = GroupLink(op.group_key, scim_id, out.link.display_name, fresh.version or version)
            out.verified = True
            return out.link, members & self.managed
        raise AssertionError("unreachable: a group was found or created")  # pragma: no cover

    async def _conflicting(self, client: ScimClient, op: GroupOperation, conflict: Conflict) -> list[dict[str, Any]]:
        """After a 409 on POST /Groups: the one group of exactly that displayName, or a Conflict saying why not.

        The target's answers are checked (RFC 7643 §4.2: ``displayName`` is the
        group's name; we match it exactly, whatever the filter returned), de-duplicated
        by ``id``. Linking it is safe only if no other group of ours owns it already
        (checked by the caller).
        """
        name = op.display_name
        exact = await self._find_group(client, name)
        if len(exact) == 1:
            return exact
        where = f"POST /Groups answered 409 ({conflict.detail or conflict.scim_type or 'conflict'}) for {name!r}"
        if not exact:
            raise Conflict(f"{where}, but no group of exactly that displayName can be found to link "
                           f"({len(exact)} results for the lookup); create or rename it by hand") from conflict  # fmt: skip
        ids = ", ".join(str(g["id"]) for g in exact)
        raise Conflict(f"{where}, and {len(exact)} groups have exactly that displayName ({ids}); "
                       "expected one to link") from conflict  # fmt: skip

    async def _create_group(self, client: ScimClient, op: GroupOperation, first: list[str] | None) -> _Created:
        """POST the group, with its first members when the target needs them (declared, or a 400 without)."""
        try:
            result = await client.create(ENDPOINT, group_resource(op.display_name, None if first is None else self._values(first)))
        except PermanentError as exc:
            if isinstance(exc, Conflict) or first is not None or not op.add or exc.status != 400:
                raise
            # Some targets refuse a group without members (400): created with its first members instead.
            first = sorted(op.add)
            result = await client.create(ENDPOINT, group_resource(op.display_name, self._values(first)))
            self.quirks.learn("group_create_with_members", True, f"POST /Groups without members answered {exc.status}")
        return _Created(result.id, result.version, first)

    async def _find_group(self, client: ScimClient, display_name: str) -> list[dict[str, Any]]:
        """Groups whose displayName is exactly ``display_name``, once each: a lookup result is a claim.

        A target that ignores the filter answers with other groups; linking one of
        them would rename it and hand its access to our members.
        """
        # find() keeps only results that really match, once each by id.
        return await client.find(ENDPOINT, "displayName", display_name, case_exact=True)

    async def members_in_target(
        self, client: ScimClient, link: GroupLink, resource: dict[str, Any] | None = None
    ) -> set[str] | None:
        """The account ids (or, for accounts we do not know, the values) of a linked group's members in the target.

        ``resource``: the group as a page listed it; when it carries ``members``
        no request is sent. A read without ``members`` is "not reported" (RFC 7643
        §4.2), asked again as :meth:`_members` does; None when the target never
        says (``group_members_returned: false`` and no filter to ask with).
        """
        if resource is not None and isinstance(resource.get("members"), list):
            return self._ids(resource)
        members, read = await self._members(client, link)
        return members if read is not None or not self.state.get(link.group_key) else None

    async def _members(self, client: ScimClient, link: GroupLink, fresh: ScimResult | None = None) -> tuple[set[str], ScimResult | None]:
        """The group's member ids in the target, and the read that said so (None: the stored state, trusted).

        A read without ``members`` is "not reported", never "empty" (RFC 7643 §4.2):
        the members are asked for (``attributes=members``), then the stored state
        is kept with a warning and ``group_members_returned: false`` is learned when
        we know the group has members.
        """
        stored = self.state.get(link.group_key, set())
        asked: tuple[str, ...] = ()
        if fresh is None and self.quirks.group_members_returned:
            fresh = await client.get(ENDPOINT, link.scim_id)
        while True:
            how = group_members(fresh.resource if fresh is not None else None, asked)
            if how is MembersRead.REPORTED:
                assert fresh is not None
                return self._ids(fresh.resource), fresh
            if how is MembersRead.ASK_ATTRIBUTES:
                asked += ("attributes",)
                fresh = await client.send(ScimRequest("GET", f"{ENDPOINT}/{quote(link.scim_id, safe='')}",
                                                      params={"attributes": "members"}, needs_resource=True))  # fmt: skip
                continue
            if not stored:
                # Nothing of ours is in it as far as we know, and the target reports no members: empty.
                return set(), fresh
            if how is MembersRead.ASK_FILTER and self.quirks.filter == "server" and len(stored) <= FILTER_READ_CAP:
                asked += ("filter",)
                # Which of the members we hold is in it, one members.value filter each (RFC 7644 §3.4.2.2).
                # Trusted only from a target that applies filters: one that ignores them answers every group.
                present: set[str] = set()
                for member in sorted(stored):
                    query = f"{equals_filter('members.value', self._values([member])[0])} and {equals_filter('id', link.scim_id)}"
                    async for group in client.iter_resources(ENDPOINT, filter=query, attributes="id"):
                        if str(group.get("id")) == link.scim_id:
                            present.add(member)
                self._learn_unreported()
                return present, fresh
            self._learn_unreported()
            log.warning("group members not reported by the target; trusting the stored state",
                        target=self.target, group=link.group_key)  # fmt: skip
            return set(stored), None

    def _values(self, ids: Iterable[str]) -> list[str]:
        """members[].value for these account ids, as the target keeps them (``member_value``)."""
        if self.quirks.member_value != "userName":
            return list(ids)
        names = self._usernames()
        return [names.get(m, m) for m in ids]

    def _ids(self, resource: dict[str, Any] | None) -> set[str]:
        """The account ids of a group's members, from the values the target reports.

        A target that lists members by userName (values that are the userNames of
        accounts we manage, none their ids) teaches ``member_value: userName``.
        """
        values = _member_ids(resource)
        if not values:
            return values
        if self.quirks.member_value != "userName":
            if values & self.managed:
                return values
            if not any(v.casefold() in self._ids_by_name() for v in values):
                return values
            self.quirks.learn("member_value", "userName", "group members are listed by userName, not id")
        by_name = self._ids_by_name()
        return {by_name.get(v.casefold(), v) for v in values}

    def _usernames(self) -> dict[str, str]:
        if self._names is None:
            self._names = load_usernames(self.engine, self.target)
        return self._names

    def _ids_by_name(self) -> dict[str, str]:
        if self._by_name is None:
            self._by_name = {name.casefold(): m for m, name in self._usernames().items()}
        return self._by_name

    def _learn_unreported(self) -> None:
        if self.quirks.group_members_returned:
            self.quirks.learn("group_members_returned", False, "GET /Groups/{id} omits members, also with attributes=members")

    async def _patch(
        self,
        client: ScimClient,
        link: GroupLink,
        add: list[str],
        remove: list[str],
        rename: str | None,
        out: GroupOutcome,
        desired: set[str] | None = None,
    ) -> None:
        """PATCH member changes in batches; on a 412, rebase on the group as it is now.

        After a 412 (or a ``noTarget`` on a removal) the group is read again and
        what is left to send is ``desired`` against its fresh members: a managed
        member someone removed meanwhile is added back in this same operation, one
        someone added that we do not want is removed (RFC 7644 §3.14). Members of
        accounts we do not manage are left alone. Without ``desired``, only the
        rest of this operation's own changes is sent.
        """
        size = self.config.max_members_per_patch
        pending = batches(add, remove, size) or [([], [])]
        etag = self._etag(link.etag)
        rounds = 0
        index = 0
        while index < len(pending):
            batch_add, batch_remove = pending[index]
            form = self.quirks.member_removal
            operations = patch_operations(self._values(batch_add), self._values(batch_remove),
                                          removal="list" if form == "put" else form, rename=rename)  # fmt: skip
            if not operations:
                index += 1
                continue
            try:
                result = await client.patch(ENDPOINT, link.scim_id, operations, etag=etag)
            except PermanentError as exc:
                if batch_remove and on_member_removal(form, exc.status, exc.scim_type, False) is Step.NEXT_FORM:
                    # This form of removal is not supported here. PATCH is atomic (RFC 7644 §3.5.2):
                    # nothing of the batch was applied, adds included; all of it goes again in the next form.
                    following = next_removal_form(form)
                    self.quirks.learn("member_removal", following,
                                      f"PATCH removing members by {form} answered {exc.status}")  # fmt: skip
                    if following == "put":
                        rest_add = [m for a, _ in pending[index:] for m in a]
                        rest_remove = [m for _, r in pending[index:] for m in r]
                        await self._put(client, link, rest_add, rest_remove, rename or link.display_name, out)
                        return
                    continue
                # 412: someone changed the group. 400 noTarget: a member we remove is gone already
                # (servers differ on whether that is an error). Both: read the group and recompute.
                stale = isinstance(exc, PreconditionFailed) or (exc.scim_type == "noTarget" and bool(batch_remove))
                if not stale:
                    raise
                rounds += 1
                if rounds > PRECONDITION_ROUNDS:
                    exc.message = f"{exc.message}; still stale after {PRECONDITION_ROUNDS} refetches"
                    raise
                # Someone changed the group: read it, and send what it lacks of the desired state.
                fresh = await client.get(ENDPOINT, link.scim_id)
                members, _ = await self._members(client, link, fresh)
                if rename is not None and _name(fresh.resource) == rename:
                    rename = None
                if desired is not None:
                    ours = members & (self.managed | desired)
                    # What the group holds now is the base; what is sent from here is counted on top of it.
                    out.reset, out.added, out.removed = set(ours), set(), set()
                    rest_add, rest_remove = sorted(desired - members), sorted(ours - desired)
                else:
                    rest_add = [m for a, _ in pending[index:] for m in a]
                    rest_remove = [m for _, r in pending[index:] for m in r]
                    out.added |= {m for m in rest_add if m in members}
                    out.removed |= {m for m in rest_remove if m not in members}
                    rest_add = [m for m in rest_add if m not in members]
                    rest_remove = [m for m in rest_remove if m in members]
                pending = pending[:index] + (batches(rest_add, rest_remove, size) or [([], [])])
                etag = self._etag(fresh.version)
                continue
            out.added.update(batch_add)
            out.removed.update(batch_remove)
            if batch_remove:
                await self._verify_removal(client, link, batch_remove, result, out)
            if rename is not None:
                link = GroupLink(link.group_key, link.scim_id, rename, link.etag)
                rename = None
            etag = self._etag(result.version)
            link = GroupLink(link.group_key, link.scim_id, link.display_name, result.version or None)
            out.link = link
            index += 1
        out.link = link

    async def _put(
        self,
        client: ScimClient,
        link: GroupLink,
        add: list[str],
        remove: list[str],
        name: str,
        out: GroupOutcome,
        desired: set[str] | None = None,
    ) -> None:
        """GET the group, PUT it back with the member list changed; on 412, again from a fresh read.

        With ``desired``, the managed members PUT are exactly those (a member removed
        by someone else comes back); members of accounts we do not manage are kept.
        """
        for round_ in range(PRECONDITION_ROUNDS + 1):
            fresh = await client.get(ENDPOINT, link.scim_id)
            resource = fresh.resource or {}
            current, _ = await self._members(client, link, fresh)
            if desired is not None:
                members = (current - self.managed - set(remove)) | desired
            else:
                members = (current - set(remove)) | set(add)
            body = {k: v for k, v in resource.items() if k not in ("id", "meta", "members", "displayName")}
            body = {**group_resource(name, self._values(members)), **{k: v for k, v in body.items() if k != "schemas"}}
            try:
                result = await client.replace(ENDPOINT, link.scim_id, body, etag=self._etag(fresh.version))
            except PreconditionFailed as exc:
                if round_ == PRECONDITION_ROUNDS:
                    exc.message = f"{exc.message}; still stale after {PRECONDITION_ROUNDS} refetches"
                    raise
                continue
            if desired is not None:
                out.reset, out.added, out.removed = set(desired), set(), set()
            else:
                out.added.update(add)
                out.removed.update(remove)
            out.link = GroupLink(link.group_key, link.scim_id, name, result.version)
            return

    async def _verify_removal(
        self, client: ScimClient, link: GroupLink, removed: list[str], answer: ScimResult, out: GroupOutcome
    ) -> None:
        """Check that members answered as removed are gone; if not, the next removal forms, then fail.

        The write's answer is read when it lists members (free); otherwise the
        group is read back when the target's answers cannot be trusted
        (``verify_writes``: declared, or learned when a read-back found a member we
        had removed). A 200 that removed nothing teaches the next form (value
        list, then GET + PUT); when none is left the operation fails.
        """
        body = answer.resource if isinstance(answer.resource, dict) else None
        if body is not None and "members" in body:
            present: set[str] | None = self._ids(body)
        elif self.quirks.verify_writes:
            members, read = await self._members(client, link)
            present = members if read is not None else None
        else:
            return
        if present is None:
            return
        still = [m for m in removed if m in present]
        while still:
            form = self.quirks.member_removal
            if on_member_removal(form, None, None, True) is Step.GIVE_UP:
                out.removed -= set(still)
                raise PermanentError(f"target did not remove member {', '.join(sorted(still))} "
                                     f"(answered success to every removal form)")  # fmt: skip
            self.quirks.learn("verify_writes", True, f"a member removal by {form} was answered success but not applied")
            following = next_removal_form(form)
            assert following is not None
            self.quirks.learn("member_removal", following, f"a member removal by {form} was answered success but not applied")
            if following == "put":
                await self._put(client, link, [], still, link.display_name, out)
            else:
                await client.patch(ENDPOINT, link.scim_id, patch_operations([], self._values(still), removal=following))
            members, read = await self._members(client, link)
            if read is None:
                return
            still = [m for m in still if m in members]

    def _use_patch(self) -> bool:
        return bool(self.capabilities and self.capabilities.patch)

    def _etag(self, version: str | None) -> str | None:
        return version if self.capabilities and self.capabilities.etag else None


def _fail(out: GroupOutcome, status: str, exc: ScimError) -> None:
    out.status = status
    out.error = str(exc)
    out.http_status = exc.status
    out.scim_type = exc.scim_type
    out.detail = exc.detail


def _group_owner(engine: Engine, target: str, scim_id: str) -> str | None:
    with engine.connect() as conn:
        query = select(GLINK.c.group_key).where(GLINK.c.target == target, GLINK.c.scim_id == scim_id)
        return conn.execute(query).scalar()


@dataclass(frozen=True, slots=True)
class _Created:
    """A group POSTed: its id, version, and the members it was created with (None: none)."""

    id: str | None
    version: str | None
    first: list[str] | None


def _claim_group(engine: Engine, target: str, key: str, scim_id: str, display_name: str) -> str | None:
    """Link an existing SCIM group to a group rule unless another rule has it; return the rule that has it."""
    module = postgresql if engine.dialect.name == "postgresql" else sqlite
    row = {"target": target, "group_key": key, "scim_id": scim_id, "display_name": display_name, "updated_at": utcnow()}
    try:
        with engine.begin() as conn:
            conn.execute(module.insert(GLINK).values(**row).on_conflict_do_nothing(index_elements=[GLINK.c.target, GLINK.c.group_key]))
    except IntegrityError:
        pass  # the unique (target, scim_id): another rule has it
    return _group_owner(engine, target, scim_id)


def _member_ids(resource: dict[str, Any] | None) -> set[str]:
    members = (resource or {}).get("members") or []
    return {str(m["value"]) for m in members if isinstance(m, dict) and m.get("value")}


def _name(resource: dict[str, Any] | None) -> str | None:
    name = (resource or {}).get("displayName")
    return str(name) if name else None


# ---------------------------------------------------------------- the group step of a cycle


def due_for_compare(verified: dict[str, datetime | None], every: str | None, *, full: bool = False,
                    now: datetime | None = None) -> list[str]:  # fmt: skip
    """Linked groups whose members should be read from the target now."""
    if full:
        return sorted(verified)
    if every is None:
        return []
    now = now or utcnow()
    interval = timedelta(seconds=parse_duration(every))
    return sorted(key for key, at in verified.items() if at is None or now - at >= interval)


def plan_groups_once(
    engine: Engine, config: Config, name: str, mapping: AttributeMapping, expected: Plan | None = None
) -> GroupPlan:
    """What the group step of a cycle would do, from the state we hold; reads the target for nothing, writes nothing.

    ``expected``: the users plan the cycle sends first. A cycle plans groups once
    its users are sent, so joiners and rehires are members by then; with it, the
    group plan counts them as the cycle will (a joiner's account stands in as
    ``new:KEY`` until it has an id).
    """
    target = config.targets[name]
    assert target.groups is not None
    executor = GroupExecutor(engine, name, target, _no_client)
    executor.load()
    links = load_links(engine, name)
    if expected is not None:
        links = anticipated_links(links, expected)
    desired = desired_groups(
        load_groups(target.groups),
        mapping,
        read_source(config.sources[target.source]),
        links,
        remove_leavers=target.remove_leavers_from_groups,
        held=held_identities(engine, name),
    )
    return plan_groups(name, desired, executor.links, executor.state, delete_empty=target.delete_empty_groups)


def anticipated_links(links: dict[str, Link], plan: Plan) -> dict[str, Link]:
    """The account links as they will be once ``plan``'s user operations are sent. Pure."""
    after = dict(links)
    for decision in plan.decisions:
        key = decision.identity_key
        link = after.get(key)
        if decision.kind is Kind.CREATE and link is None:
            after[key] = Link(key, f"new:{key}", decision.payload_hash, active=True)
        elif decision.kind is Kind.ENABLE and link is not None:
            after[key] = link._replace(active=True)
        elif decision.kind is Kind.DISABLE and link is not None:
            after[key] = link._replace(active=False)
        elif decision.kind is Kind.DELETE:
            after.pop(key, None)
    return after


def _no_client() -> ScimClient:
    raise AssertionError("planning sends nothing")


async def _send_pages(engine: Engine, name: str, executor: GroupExecutor, report: GroupReport) -> None:
    while not executor.stopping.is_set():
        result = await executor.run(claim_groups(engine, name, limit=CLAIM_PAGE))
        report.statuses.update(result.statuses)
        report.done.update(result.done)
        report.skipped += result.skipped
        if not result.statuses or result.skipped:
            break


async def send_due_groups(engine: Engine, config: Config, name: str, *, stop: asyncio.Event | None = None) -> GroupReport:
    """Send a target's due group operations (retries) without planning anew."""
    session = TargetSession(config.targets[name], quirks=load_quirks(engine, name, config.targets[name]))
    executor = GroupExecutor(engine, name, config.targets[name], session.client, quirks=session.quirks)
    if stop is not None:
        executor.stopping = stop
    report = GroupReport()
    try:
        executor.load()
        await _send_pages(engine, name, executor, report)
    finally:
        await session.aclose()
    return report


async def sync_groups(
    engine: Engine,
    config: Config,
    name: str,
    mapping: AttributeMapping,
    run_id: str,
    *,
    client_factory: ClientFactory | None = None,
    stop: asyncio.Event | None = None,
    full: bool = False,
) -> GroupReport:
    """The group step of one cycle for one target: compare, plan, queue, send. Run after the users are sent.

    ``full`` reads every linked group's members from the target (otherwise only
    those not compared for ``group_reconcile_every``).
    """
    target = config.targets[name]
    assert target.groups is not None
    definitions = load_groups(target.groups)
    quirks = load_quirks(engine, name, target)
    session = TargetSession(target, quirks=quirks) if client_factory is None else None
    executor = GroupExecutor(engine, name, target, client_factory or session.client, quirks=quirks)  # type: ignore[union-attr]
    if stop is not None:
        executor.stopping = stop
    report = GroupReport()
    try:
        verified = executor.load()
        drifted: set[str] = set()
        compare = due_for_compare(verified, target.group_reconcile_every, full=full)
        if compare and admission(engine, name) is Admission.SEND:
            drifted = await executor.compare(compare)
            report.compared = len(compare)
            report.drifted = len(drifted)
        source = config.sources[target.source]
        links = load_links(engine, name)
        # The source is read off the event loop: a slow one stalls nothing else meanwhile.
        records = await read_off_loop(read_source(source))
        desired = desired_groups(
            definitions,
            mapping,
            records,
            links,
            remove_leavers=target.remove_leavers_from_groups,
            held=held_identities(engine, name),
        )
        plan = plan_groups(name, desired, executor.links, executor.state, drifted=drifted,
                           delete_empty=target.delete_empty_groups)  # fmt: skip
        report.planned = plan.counts()
        enqueue_groups(engine, run_id, name, plan, desired.identities, brake=member_brake(target),
                       deletes=delete_brake(target))  # fmt: skip
        report.held = _held_removals(engine, run_id, name)
        await _send_pages(engine, name, executor, report)
    finally:
        if session is not None:
            await session.aclose()
    report.calls = executor.calls
    log.info("groups", target=name, run_id=run_id, planned=report.planned, outcomes=dict(report.statuses),
             compared=report.compared, drifted=report.drifted, calls=report.calls)  # fmt: skip
    return report
