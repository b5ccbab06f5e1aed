"""Deciding what to do for each identity in a target. Purely computational, no side effects.

:func:`decide` is the decision table — joiner, mover, leaver, rehire, noop —
as a ladder of early returns over (desired state, account link).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, NamedTuple

import orjson

from provisioner.errors import SafetyStop
from provisioner.lifecycle import Reason
from provisioner.mapping import AttributeMapping, MappingError
from provisioner.payload import pack as packed, payload_hash, readable, refs_in, resolve_refs, without
from provisioner.redaction import mask_write_only
from provisioner.sources import BadRecord, IdentityRecord


class Kind(StrEnum):
    """What is sent to the target."""

    CREATE = "create"
    UPDATE = "update"
    DISABLE = "disable"
    ENABLE = "enable"
    DELETE = "delete"
    # Adopt the account the match attribute finds (reconciliation's reaction to an unlinked account).
    LINK = "link"


class Link(NamedTuple):
    """What we know of an identity's account in a target, as last applied.

    A named tuple rather than a frozen dataclass: a plan loads one per account
    (100,000 of them), and a tuple is built in less than half the time.
    """

    identity_key: str
    scim_id: str
    applied_hash: str | None
    active: bool
    etag: str | None = None
    # Identities that attributes the account was written without refer to (a manager created
    # later): the account owes those attributes until a write sends them.
    owes: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Desired:
    """What the source says an identity's account should be.

    ``payload`` is None when the identity must not have an active account:
    gone from the source, out of scope, or a leaver by the mapping's rule.
    """

    identity_key: str
    payload: dict[str, Any] | None
    # Of the payload without its create-only attributes: a first password never makes an update.
    payload_hash: str | None = None
    # Attributes sent on create only (the mapping's `when: create`), as payload.without takes them.
    create_only: frozenset[tuple[str, ...]] = frozenset()


@dataclass(frozen=True, slots=True)
class Decision:
    """One operation the planner wants sent."""

    identity_key: str
    kind: Kind
    reason: Reason
    # A Packed payload in a plan made with ``pack`` (see plan_target).
    payload: dict[str, Any] | None = None
    payload_hash: str | None = None


LeaverAction = Literal["disable", "delete"]


def compared(payload: Mapping[str, Any], create_only: Iterable[tuple[str, ...]]) -> dict[str, Any]:
    """What the planner compares of a desired payload: all of it but its create-only attributes.

    ``create_only``: the mapping's ``when: create`` paths (``("password",)``,
    ``(extension urn, name)``). Those are sent on create only, so neither a
    change of them nor a target's different value is ever a reason to update
    (a first password, a nickName chosen once). Reconciliation compares the
    same attributes (:func:`provisioner.reconcile.comparable`).
    """
    return without(payload, create_only) if create_only else dict(payload)


def decide(
    desired: Desired, link: Link | None, leaver: LeaverAction = "disable", *, owed_now: bool = False
) -> Decision | None:
    """The operation that moves ``link`` to ``desired``, or None when nothing needs doing.

    ``owed_now``: the account owes attributes whose references resolve now (a
    report created before its manager's account existed). An update sends them
    anyway (its payload hash differs); a disabled leaver's account is disabled
    again, which sends them.
    """
    key = desired.identity_key
    if desired.payload is None:
        if link is None:
            return None  # a leaver we never provisioned
        if leaver == "delete":
            return Decision(key, Kind.DELETE, Reason.LEAVER)
        if not link.active and not owed_now:
            return None  # already disabled, owing nothing that can be sent
        return Decision(key, Kind.DISABLE, Reason.LEAVER)
    if link is None:
        return Decision(key, Kind.CREATE, Reason.JOINER, desired.payload, desired.payload_hash)
    # Attributes set only on create (`when: create`, a first password) are never sent again.
    payload = without(desired.payload, desired.create_only) if desired.create_only else desired.payload
    if not link.active:
        return Decision(key, Kind.ENABLE, Reason.REHIRE, payload, desired.payload_hash)
    if link.applied_hash == desired.payload_hash:
        return None
    return Decision(key, Kind.UPDATE, Reason.MOVER, payload, desired.payload_hash)


class Rejection(NamedTuple):
    """A record held for review instead of planned: ``message`` is ``file:line: why``."""

    identity_key: str
    message: str
    kind: Kind
    reason: Reason


# RFC 7643 §2.2: string attributes compare without case unless the schema says caseExact;
# of the User attributes a mapping can match on, externalId (§3.1) is the case-exact one.
CASE_EXACT = frozenset({"externalId"})


def match_key(attribute: str, value: str) -> str:
    """A match value as the target compares it: ``Ana@X `` and ``ana@x`` are one userName, two externalIds.

    RFC 7643 §2.2: caseExact is false unless the schema says otherwise; see ``CASE_EXACT``.
    """
    return value if attribute in CASE_EXACT else value.strip().casefold()


@dataclass(slots=True)
class Plan:
    """Everything one planning pass decided for one target."""

    target: str
    decisions: list[Decision] = field(default_factory=list)
    # Records held for review: (identity key, file:line: why, what kind it would have been).
    rejected: list[Rejection] = field(default_factory=list)
    # A digest of each rejected record as read: a resolved rejection stays silent until it changes.
    record_hashes: dict[str, str] = field(default_factory=dict)
    # Every identity key the source had (``<file:line>`` for a line without one): a rejection of
    # an identity no longer there has nothing left to review.
    present: set[str] = field(default_factory=set)
    unchanged: int = 0
    unresolved_refs: int = 0
    source_records: int = 0
    # Identities already as they should be: any operation still open for them is stale.
    settled: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """How many operations of each kind, plus unchanged and rejected."""
        # LINK is reconciliation's, never a cycle's: a plan does not list it.
        counts = {kind.value: 0 for kind in Kind if kind is not Kind.LINK}
        for decision in self.decisions:
            counts[decision.kind.value] = counts.get(decision.kind.value, 0) + 1
        counts["unchanged"] = self.unchanged
        counts["rejected"] = len(self.rejected)
        return counts


def plan_target(
    target: str,
    mapping: AttributeMapping,
    records: Iterable[IdentityRecord | BadRecord],
    links: Mapping[str, Link],
    leaver: LeaverAction = "disable",
    min_records: int = 1,
    memo: RenderMemo | None = None,
    *,
    pack: bool = False,
) -> Plan:
    """Decide every operation for one target from the whole source and the current links.

    A record that cannot be rendered is rejected, never mistaken for a leaver;
    an identity linked in the target but absent from the source is a leaver.
    ``memo`` (see RenderMemo; the state database keeps one per target) skips
    rendering records unchanged since a render whose result the target already has.
    ``pack``: each decision's payload is held as :class:`~provisioner.payload.Packed`
    JSON, a third of the memory, for a caller that only queues the plan.
    Raises SafetyStop when the source has no usable records (and accounts are
    linked) or fewer than ``min_records``.
    """
    plan, refs = _decide_records(target, mapping, records, links, leaver, memo, pack)
    active = sum(link.active for link in links.values())
    if plan.source_records == 0 and active:
        raise SafetyStop(
            f"target {target}: the source has no usable records; refusing to deprovision {active} linked accounts"
        )
    if plan.source_records < min_records:
        raise SafetyStop(
            f"target {target}: the source has {plan.source_records} usable records, fewer than its "
            f"min_records ({min_records}); is the export truncated?"
        )
    # Nearly always every linked identity is still in the source: one set difference says so.
    if links.keys() - plan.present:
        for key, link in links.items():
            if key not in plan.present:
                _add(plan, key, decide(Desired(key, None), link, leaver, owed_now=_owed_now(link, links)))
    plan.decisions = order_by_references(plan.decisions, refs)
    return plan


def plan_records(
    target: str,
    mapping: AttributeMapping,
    records: Iterable[IdentityRecord | BadRecord],
    links: Mapping[str, Link],
    leaver: LeaverAction = "disable",
) -> Plan:
    """Decide the operations of some of the source's records (``sync --only``, a delta read) as a full plan would.

    ``links`` are still every account, so that references to identities not
    planned resolve as in a full plan; but a linked identity without a record
    here is not a leaver, and no record here is no safety stop.
    """
    plan, refs = _decide_records(target, mapping, records, links, leaver, None, False)
    plan.decisions = order_by_references(plan.decisions, refs)
    return plan


def _decide_records(
    target: str,
    mapping: AttributeMapping,
    records: Iterable[IdentityRecord | BadRecord],
    links: Mapping[str, Link],
    leaver: LeaverAction,
    memo: RenderMemo | None,
    pack: bool,
) -> tuple[Plan, dict[str, set[str]]]:
    """Each record's decision or rejection, identities sharing a match value held; not yet ordered.

    Also returns, for :func:`order_by_references`, the identities each
    decision's payload refers to, by identity key (none: no entry).
    """
    plan = Plan(target)
    if memo is not None and mapping.volatile:
        memo = None  # what it renders changes with the time: nothing to remember
    salt: bytes = mapping.digest
    seen: set[str] = set()
    # The identities each decision's payload refers to, for ordering the plan (a packed payload is opaque).
    payload_refs: dict[str, set[str]] = {}
    # (key, match value, origin, payload hash) of each record that gets an account: duplicates are
    # found once every record is read, and taken out of the plan before anything is written.
    matched: list[tuple[str, str, str, str | None]] = []
    for record in records:
        if isinstance(record, BadRecord):
            key = record.key or f"<{record.origin}>"
            digest = _text_digest(record.text or record.reason)
            _reject(plan, key, f"{record.origin}: {record.reason}", links.get(record.key), digest)
            seen.add(record.key)
            plan.present.add(key)
            continue
        if record.key in seen:
            _reject(plan, record.key, f"{record.origin}: duplicate identity key '{record.key}'", links.get(record.key),
                    _digest(record))  # fmt: skip
            continue
        seen.add(record.key)
        plan.source_records += 1
        link = links.get(record.key)
        if memo is not None and memo.settled(record, link, links, salt):
            match = memo.match_of(record.key)
            if match is not None:
                matched.append((record.key, match, record.origin, link.applied_hash if link else None))
            _add(plan, record.key, None)
            continue
        try:
            desired, refs = _desired(record, mapping, links, plan)
        except MappingError as exc:
            _reject(plan, record.key, f"{record.origin}: {exc}", link, _digest(record))
            continue
        match = _match_value(desired.payload, mapping.match)
        if match is not None:
            matched.append((record.key, match, record.origin, desired.payload_hash))
        decision = decide(desired, link, leaver, owed_now=_owed_now(link, links))
        if decision is not None and decision.payload is not None:
            if refs:
                payload_refs[record.key] = refs_in(decision.payload)
            if pack:
                decision = Decision(decision.identity_key, decision.kind, decision.reason,
                                    packed(decision.payload), decision.payload_hash)  # type: ignore[arg-type]  # fmt: skip
        _add(plan, record.key, decision)
        if memo is not None:
            memo.remember(record, desired.payload_hash, refs, links, match, salt)
    plan.present.update(seen)
    _hold_shared_match_values(plan, matched, mapping.match, links)
    return plan, payload_refs


def _hold_shared_match_values(
    plan: Plan, matched: list[tuple[str, str, str, str | None]], attribute: str, links: Mapping[str, Link]
) -> None:
    """Take identities whose match value another one has out of the plan, as rejections.

    Before any write: otherwise two accounts for one person on a target that
    does not enforce uniqueness, or whichever record came first winning the
    account, a different one each cycle. The digest kept is the payload hash:
    the rejection stays silenced (once resolved) until what the record renders to changes.
    """
    # Nearly always every value is distinct: one set says so without building the groups.
    distinct = {match_key(attribute, match) for _k, match, _o, _h in matched}
    if len(distinct) == len(matched):
        return
    shared = shared_match_values(((key, match) for key, match, _o, _h in matched), attribute)
    if not shared:
        return
    settled = set(plan.settled) & shared.keys()
    plan.unchanged -= len(settled)
    plan.settled = [key for key in plan.settled if key not in shared]
    plan.decisions = [d for d in plan.decisions if d.identity_key not in shared]
    for key, match, origin, payload_hash in matched:
        if key in shared:
            others = ", ".join(shared[key])
            why = f"{attribute} {match} is also rendered for identit{'ies' if ',' in others else 'y'} {others}"
            _reject(plan, key, f"{origin}: {why}", links.get(key), payload_hash or _text_digest(match))


def shared_match_values(values: Iterable[tuple[str, str | None]], attribute: str) -> dict[str, list[str]]:
    """Identities whose match value another identity of the snapshot also has: key -> the others' keys.

    Values are compared the way the target compares them (RFC 7643 §2.2
    ``caseExact``): ``ana@x`` and ``Ana@X `` are one userName, two externalIds.
    """
    by_value: dict[str, list[str]] = {}
    for key, value in values:
        if value is not None:
            by_value.setdefault(match_key(attribute, value), []).append(key)
    shared: dict[str, list[str]] = {}
    for keys in by_value.values():
        if len(keys) > 1:
            for key in keys:
                shared[key] = sorted(k for k in keys if k != key)
    return shared


def order_by_references(decisions: list[Decision], refs: Mapping[str, set[str]]) -> list[Decision]:
    """Decisions with every account another one refers to (a manager) before the ones referring to it.

    The queue is sent in this order, page by page, so a report's manager exists
    by the time the report is created. A reference cycle keeps the source order.
    ``refs``: the identities each decision's payload refers to, by identity key
    (collected while planning: a packed payload cannot be walked).
    """
    payload_refs = {d.identity_key: refs.get(d.identity_key, set()) for d in decisions if d.payload is not None}
    if not any(payload_refs.values()):
        return decisions
    depth: dict[str, int] = {}

    def depth_of(key: str, visiting: set[str]) -> int:
        if key in depth:
            return depth[key]
        if key in visiting:
            return 0
        visiting.add(key)
        refs = payload_refs.get(key, set()) & payload_refs.keys()
        depth[key] = 1 + max((depth_of(ref, visiting) for ref in refs - {key}), default=-1)
        visiting.discard(key)
        return depth[key]

    try:
        for key in payload_refs:
            depth_of(key, set())
    except RecursionError:
        return decisions  # a reporting chain thousands deep: keep the source order
    return sorted(decisions, key=lambda d: depth.get(d.identity_key, 0))


def brake_trips(leavers: int, active_accounts: int, max_count: int | None, max_share: float | None) -> bool:
    """Whether deprovisioning ``leavers`` accounts at once must wait for an operator.

    Over ``max_count``, or over ``max_share`` of the active linked accounts; a
    single leaver never trips the share (small directories would hold every one).
    """
    if max_count is not None and leavers > max_count:
        return True
    return max_share is not None and leavers > max(1, math.ceil(max_share * active_accounts))


def preview_record(mapping: AttributeMapping, record: IdentityRecord, links: Mapping[str, Link]) -> dict[str, Any]:
    """What one record becomes, for a config author: the payload, or why there is none."""
    try:
        rendered = mapping.render(record.attributes)
    except MappingError as exc:
        return {"origin": record.origin, "error": str(exc)}
    if not rendered.payload:
        why = "out of scope" if not rendered.in_scope else "a leaver (leaver_when)"
        return {"origin": record.origin, "account": f"none: {why}"}
    payload, unresolved = resolve_refs(rendered.payload, lambda key: links[key].scim_id if key in links else None,
                                       keep_unresolved=True)  # fmt: skip
    link = links.get(record.key)
    return {
        "origin": record.origin,
        "account": f"linked to {link.scim_id}" if link else "not in the target yet: would be created",
        "unresolved_references": unresolved,
        "payload": readable(mask_write_only(payload), "not in the target yet"),
    }


# A memo entry: (record digest keyed with the mapping's, references, payload hash, match value).
# References are ((identity key, SCIM id or None), …), or their JSON as stored, parsed when first needed.
MemoEntry = tuple[str, "tuple[tuple[str, str | None], ...] | str | None", "str | None", "str | None"]


@dataclass(slots=True)
class RenderMemo:
    """What the last render of each identity gave, so that an unchanged record is not rendered again.

    An entry holds a digest of the record keyed with the mapping's digest
    (``AttributeMapping.digest``: the mapping as parsed and the engine code that
    renders it), the SCIM ids its references resolved to, and the payload hash.
    That is a fact about a pure function, true whatever was sent since. A record
    whose digest and references are the same, and whose account already has
    that payload applied (active, the same hash), needs no render: rendering it
    would decide nothing. Everything else renders: a new or changed record, a
    changed mapping, a manager whose account changed id, an account relinked,
    disabled, deleted or never updated (an update that failed leaves the old
    hash). A record that gets no account (out of scope, a leaver) and has none
    is settled too. A mapping whose renders the record alone does not decide
    (``now()``) is never remembered.

    The state database keeps it (``provisioner.memo``), so any cycle skips what
    an earlier one rendered; ``changed`` holds the keys remembered since it was
    loaded or saved, ``unresolved`` those remembered with a reference to an
    account not created yet.
    """

    entries: dict[str, MemoEntry] = field(default_factory=dict)
    changed: set[str] = field(default_factory=set)
    unresolved: set[str] = field(default_factory=set)

    def settled(self, record: IdentityRecord, link: Link | None, links: Mapping[str, Link], salt: bytes = b"") -> bool:
        """Whether the record is unchanged and its account already holds what it renders to."""
        entry = self.entries.get(record.key)
        if entry is None:
            return False
        digest, refs, desired_hash, _match = entry
        if link is None:
            # Out of scope or a leaver, and never provisioned: still nothing to do.
            return desired_hash is None and refs is None and digest == _digest_hex(record, salt)
        if not link.active or link.applied_hash is None:
            return False
        if desired_hash != link.applied_hash or digest != _digest_hex(record, salt):
            return False
        if refs is None:
            return True
        for key, scim_id in orjson.loads(refs) if isinstance(refs, str) else refs:
            ref = links.get(key)
            if (ref.scim_id if ref is not None else None) != scim_id:
                return False
        return True

    def remember(
        self,
        record: IdentityRecord,
        desired_hash: str | None,
        refs: set[str],
        links: Mapping[str, Link],
        match: str | None = None,
        salt: bytes = b"",
    ) -> None:
        """Keep what this record rendered to: its payload hash, match value, and the ids its references had then."""
        resolved = tuple((k, links[k].scim_id if k in links else None) for k in sorted(refs)) or None
        entry = (_digest_hex(record, salt), resolved, desired_hash, match)
        if resolved is not None and any(scim_id is None for _k, scim_id in resolved):
            self.unresolved.add(record.key)
        old = self.entries.get(record.key)
        if old is not None and isinstance(old[1], str) and resolved is not None:
            old = (old[0], tuple((k, v) for k, v in orjson.loads(old[1])), old[2], old[3])
        if old != entry:
            self.entries[record.key] = entry
            self.changed.add(record.key)

    def match_of(self, key: str) -> str | None:
        """The match value (userName) the identity's last render gave: duplicates are found without rendering."""
        entry = self.entries.get(key)
        return entry[3] if entry is not None else None


def _digest_hex(record: IdentityRecord, salt: bytes) -> str:
    """The record's digest, keyed with the mapping's: the same record through another mapping differs."""
    hasher = _keyed(salt).copy()
    hasher.update(orjson.dumps(record.attributes, option=orjson.OPT_SORT_KEYS, default=_typed))
    return hasher.hexdigest()


@functools.lru_cache(maxsize=16)
def _keyed(salt: bytes) -> Any:
    """A blake2b keyed with the mapping's digest, to copy per record: keying it each time costs a third more."""
    return hashlib.blake2b(digest_size=16, key=salt[:64])


def _typed(value: Any) -> list[str]:
    """A value JSON has no form for (a database's Decimal), with its type: 1.0 and "1.0" differ."""
    return [type(value).__qualname__, str(value)]


def _digest_bytes(record: IdentityRecord) -> bytes:
    return hashlib.blake2b(orjson.dumps(record.attributes, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()


def _digest(record: IdentityRecord) -> str:
    return _digest_bytes(record).hex()


def _match_value(payload: dict[str, Any] | None, attribute: str) -> str | None:
    """The payload's match value as text, or None when the identity gets no account or has no such value."""
    if not payload:
        return None
    value = payload.get(attribute)
    return value if isinstance(value, str) else None


def _text_digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _reject(plan: Plan, key: str, message: str, link: Link | None, digest: str) -> None:
    plan.rejected.append(Rejection(key, message, *_would_be(link)))
    plan.record_hashes[key] = digest


def _desired(
    record: IdentityRecord, mapping: AttributeMapping, links: Mapping[str, Link], plan: Plan
) -> tuple[Desired, set[str]]:
    """The desired state of one record, and the identities its payload refers to."""
    rendered = mapping.render(record.attributes)
    if not rendered.payload:
        return Desired(record.key, None), set()
    if not mapping.uses_refs:
        return Desired(record.key, rendered.payload, payload_hash(compared(rendered.payload, mapping.create_only)),
                       create_only=mapping.create_only), set()  # fmt: skip

    def scim_id(key: str) -> str | None:
        link = links.get(key)
        return link.scim_id if link is not None else None

    # The hash is of what would be sent now; the payload keeps unresolved references so that
    # the executor can resolve them once the accounts they name are created in this cycle.
    payload, unresolved = resolve_refs(rendered.payload, scim_id, keep_unresolved=True)
    plan.unresolved_refs += unresolved
    sendable = resolve_refs(payload, scim_id)[0] if unresolved else payload
    desired = Desired(record.key, payload, payload_hash(compared(sendable, mapping.create_only)), mapping.create_only)
    return desired, refs_in(rendered.payload)


def _owed_now(link: Link | None, links: Mapping[str, Link]) -> bool:
    """Whether the account owes attributes whose references all name linked accounts now."""
    return link is not None and bool(link.owes) and link.owes <= links.keys()


def _add(plan: Plan, key: str, decision: Decision | None) -> None:
    if decision is None:
        plan.unchanged += 1
        plan.settled.append(key)
    else:
        plan.decisions.append(decision)


def _would_be(link: Link | None) -> tuple[Kind, Reason]:
    return (Kind.CREATE, Reason.JOINER) if link is None else (Kind.UPDATE, Reason.MOVER)
