"""One sync cycle: source → plan → queue → executor, per target.

A cycle plans, writes the plan to the queue, then sends every due operation
(the executor orders them so that a manager's account exists before the
accounts that refer to it).
"""

from __future__ import annotations

import asyncio
import gc
import secrets
import time
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import structlog
from sqlalchemy import Engine, insert, update

from provisioner.config import Config, ScimSourceConfig, SqlSourceConfig, TargetConfig
from provisioner.delta import DeltaRead, start_read
from provisioner.errors import ConfigError, SourceError, UserError
from provisioner.executor import ClientFactory, Executor
from provisioner.group_executor import send_due_groups, sync_groups
from provisioner.groups import GroupPlan, load_groups
from provisioner.mapping import AttributeMapping, MappingError, load_mapping
from provisioner.memo import complete_entries, load_memo, save_memo
from provisioner.payload import changed_paths, dumps, keep_chosen, keep_omitted, nothing_to_send, readable
from provisioner.planner import Kind, Plan, RenderMemo, brake_trips, plan_records, plan_target
from provisioner.queue import (
    Rejections,
    claim,
    count_status,
    enqueue,
    load_link_states,
    load_links,
)
from provisioner.redaction import WRITE_ONLY
from provisioner.sources import BadRecord, IdentityRecord, read_off_loop, read_source, source_columns
from provisioner.store import Run, utcnow
from provisioner.quirks import load_quirks
from provisioner.targets import TargetSession

log = structlog.get_logger("provisioner.sync")

# Operations claimed and sent at a time.
CLAIM_PAGE = 1000

E = TypeVar("E", bound=Executor)


@dataclass(slots=True)
class TargetReport:
    """What a cycle did in one target."""

    target: str
    run_id: str
    planned: dict[str, int] = field(default_factory=dict)
    done: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    unchanged: int = 0
    rejected: int = 0
    held: int = 0
    skipped: int = 0
    status: str | None = None  # the run's status once the cycle finished (``interrupted``, ``succeeded``, …)

    @property
    def failed(self) -> int:
        """Operations that need review, including records that could not be mapped."""
        return self.statuses["failed"] + self.rejected

    @property
    def deferred(self) -> int:
        """Operations waiting for a later cycle: a retry, or not sent (target down, paused, quarantined)."""
        return self.statuses["retry_wait"] + self.skipped

    def summary(self) -> dict[str, int]:
        """The counts an operator reads first."""
        return {
            "created": self.done["create"],
            "updated": self.done["update"],
            "enabled": self.done["enable"],
            "disabled": self.done["disable"],
            "deleted": self.done["delete"],
            # With the operations that found nothing to send (an emptied omit_if_empty attribute).
            "unchanged": self.unchanged + self.done["unchanged"],
            "failed": self.failed,
            "deferred": self.deferred,
            "held": self.held,
            "groups_created": self.done["group_create"],
            "group_updates": self.done["group_members"] + self.done["group_delete"],
        }


def new_run_id() -> str:
    """A sortable, unique run id: time first, then randomness."""
    return f"{utcnow():%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def selected_targets(config: Config, names: list[str] | None) -> list[str]:
    """The targets to work on: the named ones (which must exist), else every enabled one."""
    if names:
        unknown = [n for n in names if n not in config.targets]
        if unknown:
            raise ConfigError(f"unknown target {unknown[0]!r} (configured: {', '.join(sorted(config.targets))})")
        return names
    return [name for name, target in config.targets.items() if target.enabled]


def load_target_mapping(config: Config, name: str) -> AttributeMapping:
    """Compile a target's mapping (and check its groups file) before anything is sent.

    Also checks that the mapping reads only columns the source has, where the
    source says for certain: a CSV header, a SQL query's result columns. A
    database that cannot be reached now is the cycle's to report (it refuses
    and alerts), not a reason to refuse to start; a SCIM source's columns come
    from schemas that do not list every type of a multi-valued attribute, so
    only ``check`` compares them.
    """
    target = config.targets[name]
    mapping = load_mapping(target.mapping)
    if target.groups is not None:
        load_groups(target.groups)
    source = config.sources[target.source]
    if isinstance(source, ScimSourceConfig):
        return mapping
    try:
        columns = source_columns(source)
    except SourceError:
        if isinstance(source, SqlSourceConfig):
            return mapping
        raise
    # An empty file has no header to check; the planner refuses it as an empty source.
    if columns:
        missing = mapping.missing_columns(columns)
        if missing:
            where = next(where for name, where in mapping.names if name == missing[0])
            raise ConfigError(
                f"{where}: reads column '{missing[0]}', which {source.describe()} does not have "
                f"(columns: {', '.join(sorted(columns))})"
            )
    return mapping


# Cycles under way in this process (several targets run at once): the heap stays frozen until the last ends.
_frozen = 0


@contextmanager
def settled_heap() -> Iterator[None]:
    """Leave the objects alive when a cycle starts out of the collector's full passes until it ends.

    Those objects (modules, config, compiled mappings, caches: ~135,000 after
    the imports) outlive the cycle, while the cycle allocates per identity
    (links, memo entries, the plan, each request's objects), which sets off full
    collections that walked all of them again, ~60 ms each, to find no garbage
    there (``gc.freeze``). Objects made during the cycle are collected as usual;
    a reference cycle among the frozen ones waits until the end (``gc.unfreeze``).
    Nested and concurrent cycles share one freeze.
    """
    global _frozen
    if _frozen == 0:
        gc.freeze()
    _frozen += 1
    try:
        yield
    finally:
        _frozen -= 1
        if _frozen == 0:
            gc.unfreeze()


def plan_once(
    engine: Engine,
    config: Config,
    name: str,
    mapping: AttributeMapping,
    memo: RenderMemo | None = None,
    *,
    pack: bool = False,
    records: Iterable[IdentityRecord | BadRecord] | None = None,
) -> tuple[Plan, int]:
    """Plan one target against the current links; writes nothing. Also returns the active account count.

    ``memo``: what earlier cycles rendered (RenderMemo); the state database's when None.
    ``pack``: payloads held as packed JSON (``plan_target``), for a plan that is only queued.
    ``records``: the whole source, already being read; None: the target's source is read.
    """
    target = config.targets[name]
    source = config.sources[target.source]
    with settled_heap():
        links = load_links(engine, name)
        if memo is None:
            memo = load_memo(engine, name)
        if records is None:
            records = read_source(source)
        plan = plan_target(name, mapping, records, links, target.leaver, source.min_records, memo, pack=pack)
    return plan, sum(link.active for link in links.values())


def plan_only(
    engine: Engine, config: Config, name: str, mapping: AttributeMapping, records: list[IdentityRecord | BadRecord]
) -> tuple[Plan, int]:
    """Plan these records in target ``name`` as a full plan decides them; writes nothing.

    Their references (``ref(manager_id)``) resolve against every account link,
    as in a full plan: an unchanged identity whose manager is not planned is
    still unchanged. Nobody else is planned: an identity without a record here
    is never a leaver. ``sync --only`` plans its keys so, a cycle its delta read.
    Also returns the target's active account count, which :func:`queue_plan` needs.
    """
    links = load_links(engine, name)
    plan = plan_records(name, mapping, records, links, config.targets[name].leaver)
    return plan, sum(link.active for link in links.values())


def queue_plan(
    engine: Engine,
    config: Config,
    name: str,
    plan: Plan,
    run_id: str,
    active: int,
    present: Collection[str] | None = None,
) -> Rejections:
    """Queue a plan, its leavers behind the target's deletion brake over its ``active`` linked accounts.

    ``present``: every identity key the source had, for a plan of the whole
    source: open rejections of identities gone from it close. A plan of some
    records (:func:`plan_only`) has none: it would close the open rejections of
    everyone not planned. Returns what became of the plan's rejections.
    """
    target = config.targets[name]

    def brake(leavers: int) -> bool:
        return brake_trips(leavers, active, target.max_deprovision, target.max_deprovision_share)

    rejections = Rejections()
    enqueue(engine, run_id, name, plan.decisions, plan.rejected, brake=brake, settled=plan.settled,
            record_hashes=plan.record_hashes, rejections=rejections, present=present)  # fmt: skip
    return rejections


async def sync_target(
    engine: Engine,
    config: Config,
    name: str,
    mapping: AttributeMapping,
    *,
    stop: asyncio.Event | None = None,
    memo: RenderMemo | None = None,
) -> TargetReport:
    """Run one cycle for one target and return what it did; ``stop`` ends it early, losing nothing.

    ``memo``: what earlier cycles rendered (see RenderMemo); the state database's when None.
    What this cycle renders is saved to the state database either way.
    """
    with settled_heap():
        return await _cycle(engine, config, name, mapping, stop, memo)


async def _cycle(
    engine: Engine,
    config: Config,
    name: str,
    mapping: AttributeMapping,
    stop: asyncio.Event | None,
    memo: RenderMemo | None,
) -> TargetReport:
    report = TargetReport(name, new_run_id())
    _start_run(engine, report.run_id, name, utcnow())
    try:
        # The source is read off the event loop: a slow query or HR endpoint would stall every other
        # target, /healthz's heartbeat and the metrics meanwhile. The caller holds the target's locks.
        read, records = _open_read(engine, config, name)
        records = await read_off_loop(records)
        memo = _plan_into_queue(engine, config, name, mapping, report, memo, read, records)
        await _send(engine, config, name, mapping, report, stop)
        if memo is not None and memo.unresolved:
            # Records sent with a manager created in this cycle: remembered with what they got.
            complete_entries(engine, name, report.run_id, memo, mapping.create_only)
            save_memo(engine, name, memo)
        if config.targets[name].groups is not None:
            # After the users: a member's account exists before it is added to a group.
            groups = await sync_groups(engine, config, name, mapping, report.run_id, stop=stop)
            report.statuses.update(groups.statuses)
            report.done.update(groups.done)
            report.skipped += groups.skipped
            # Member removals the brake held (group_members: exact) hold the cycle as leavers do.
            report.held = count_status(engine, name, "held")
    except UserError as exc:
        # A safety stop, or a source that cannot be read: nothing was planned; alerts say why.
        _finish_run(engine, report, status="refused", error=str(exc))
        raise
    except (asyncio.CancelledError, KeyboardInterrupt):
        # A stop (SIGTERM past the shutdown grace, Ctrl-C), not a failure: what was left waits in the queue.
        _interrupted(engine, report)
        raise
    except BaseException:
        _finish_run(engine, report, status="error")
        raise
    if stop is not None and stop.is_set() and count_status(engine, name, "pending"):
        # Asked to stop: the cycle sent what was in flight and left the rest queued, unfinished.
        _interrupted(engine, report)
        return report
    log.info("cycle", target=name, run_id=report.run_id, planned=report.planned, outcomes=dict(report.statuses))
    _finish_run(engine, report)
    return report


async def send_due(
    engine: Engine, config: Config, name: str, mapping: AttributeMapping, *, stop: asyncio.Event | None = None
) -> TargetReport:
    """Send a target's due operations (retries, approved leavers) without planning anew."""
    report = TargetReport(name, new_run_id())
    await _send(engine, config, name, mapping, report, stop)
    if config.targets[name].groups is not None:
        groups = await send_due_groups(engine, config, name, stop=stop)
        report.statuses.update(groups.statuses)
        report.done.update(groups.done)
    return report


def _open_read(
    engine: Engine, config: Config, name: str
) -> tuple[DeltaRead | None, Iterator[IdentityRecord | BadRecord]]:
    """The target's source read, not started: a delta read (and its state) for a SCIM source with ``delta``."""
    target = config.targets[name]
    source = config.sources[target.source]
    if isinstance(source, ScimSourceConfig) and source.delta:
        read = start_read(engine, name, target.source, source)
        return read, read.watch(read_source(read.config()))
    return None, read_source(source)


def _plan_into_queue(
    engine: Engine,
    config: Config,
    name: str,
    mapping: AttributeMapping,
    report: TargetReport,
    memo: RenderMemo | None,
    read: DeltaRead | None,
    records: Iterable[IdentityRecord | BadRecord],
) -> RenderMemo | None:
    """Plan the records read and queue the plan; returns the render memo a whole plan used (loaded if not given).

    A delta read's plan renders every record it read (:func:`plan_only`): it
    neither loads nor fills a memo, and returns ``memo`` as given.
    """
    if read is not None and not read.full:
        _plan_changes_into_queue(engine, config, name, mapping, report, read, list(records))
        return memo
    if memo is None:
        memo = load_memo(engine, name)
    # Packed: an initial load's plan is its 100,000 payloads, held until they are queued.
    plan, active = plan_once(engine, config, name, mapping, memo, pack=True, records=records)
    if plan.unresolved_refs:
        # Usually managers created in this same cycle (sent first); otherwise a reference to nobody.
        log.info("references to accounts not in the target yet", target=name, count=plan.unresolved_refs)
    rejections = _queue_cycle_plan(engine, config, name, report, plan, active, read, memo)
    for key, message in rejections.new:
        log.warning("record rejected", target=name, run_id=report.run_id, identity=key, reason=message)
    # Counted once per record and cause; one an operator resolved stays out until the record changes.
    report.rejected = len(rejections.new) + rejections.open
    if rejections.open or rejections.silenced:
        log.info("records still rejected", target=name, open=rejections.open, resolved=rejections.silenced)
    if report.held:
        log.warning(
            "cycle held",
            target=name,
            run_id=report.run_id,
            leavers=report.held,
            active_accounts=active,
            hint="provisioner plan --held, then provisioner approve RUN_ID or reject RUN_ID",
        )
    return memo


def _plan_changes_into_queue(
    engine: Engine,
    config: Config,
    name: str,
    mapping: AttributeMapping,
    report: TargetReport,
    read: DeltaRead,
    records: list[IdentityRecord | BadRecord],
) -> None:
    """A delta read's records planned and queued as ``sync --only`` does: nobody else is planned or a leaver."""
    plan, active = plan_only(engine, config, name, mapping, records)
    _queue_cycle_plan(engine, config, name, report, plan, active, read, None)
    # Unlike a whole plan's, every rejection of the records read is logged and counted, resolved ones too.
    for key, message, _kind, _reason in plan.rejected:
        log.warning("record rejected", target=name, run_id=report.run_id, identity=key, reason=message)
    report.rejected = len(plan.rejected)
    log.info("delta read", target=name, run_id=report.run_id, since=str(read.since), records=len(records))


def _queue_cycle_plan(
    engine: Engine,
    config: Config,
    name: str,
    report: TargetReport,
    plan: Plan,
    active: int,
    read: DeltaRead | None,
    memo: RenderMemo | None,
) -> Rejections:
    """Queue a cycle's plan and count it in ``report``, then save where the next cycle starts from.

    ``memo``: a whole plan's renders, saved with it (and its ``present`` closes the
    rejections of identities gone from the source); None for a delta's plan of
    the records read. ``read``: the delta read, whose watermark is saved.
    """
    report.planned = plan.counts()
    report.unchanged = plan.unchanged
    present = plan.present if memo is not None else None
    rejections = queue_plan(engine, config, name, plan, report.run_id, active, present)
    # After the plan is queued: a crash in between loses only renders, which the next cycle makes
    # again, and reads the same changes again.
    if memo is not None:
        save_memo(engine, name, memo, plan.present)
    if read is not None:
        read.save(engine)
    # Held operations of earlier cycles still wait too: the target stays held until approved.
    report.held = count_status(engine, name, "held")
    return rejections


async def _send(
    engine: Engine,
    config: Config,
    name: str,
    mapping: AttributeMapping,
    report: TargetReport,
    stop: asyncio.Event | None,
) -> None:
    target = config.targets[name]
    if stop is not None and stop.is_set():
        return
    # A cycle with nothing due (nothing changed) makes no client: no TLS context, no connection.
    page = claim(engine, name, limit=CLAIM_PAGE)
    if not page:
        return
    # With the page just claimed, which is no longer pending.
    due = len(page) + count_status(engine, name, "pending")
    session = TargetSession(target, quirks=load_quirks(engine, name, target))
    executor = account_executor(engine, config, name, mapping, session)
    if stop is not None:
        executor.stopping = stop
    sent = 0
    started = time.monotonic()
    try:
        # Page by page: an initial load of 100,000 accounts never sits in memory at once. The executor
        # sends or gives back every operation it is handed; a page is claimed only to be handed over.
        while True:
            result = await executor.run(page)
            report.done.update(result.done)
            report.statuses.update(result.statuses)
            report.skipped += result.skipped
            sent += len(result.finished)
            if due > CLAIM_PAGE and result.finished:
                rate = sent / max(time.monotonic() - started, 1e-6)
                log.info("progress", target=name, sent=sent, due=due, per_second=round(rate, 1),
                         eta_seconds=round(max(due - sent, 0) / rate) if rate else None)  # fmt: skip
            if not result.finished or result.skipped or result.unreachable:
                break  # nothing due, or the target stopped taking work (paused, quarantined, breaker)
            if executor.stopping.is_set():
                break  # asked to stop: the rest stays queued, unclaimed
            page = claim(engine, name, limit=CLAIM_PAGE)
    finally:
        await session.aclose()


def account_executor(
    engine: Engine,
    config: Config,
    name: str,
    mapping: AttributeMapping,
    session: TargetSession,
    clients: ClientFactory | None = None,
    kind: type[E] = Executor,  # type: ignore[assignment]
) -> E:
    """The executor of target ``name``'s account operations, as ``mapping`` shapes them.

    Its clients come from ``session`` (``clients``: another factory of them, say
    one that prints each exchange); ``kind``: an Executor subclass.
    """
    return kind(engine, name, config.targets[name], clients or session.client, endpoint=mapping.endpoint,
                match_attribute=mapping.match, quirks=session.quirks,
                write_only=lambda keys: render_write_only(config, name, mapping, keys),
                create_only=mapping.create_only, omit_if_empty=mapping.omit_if_empty,
                uses_refs=mapping.uses_refs)  # fmt: skip


def render_write_only(config: Config, name: str, mapping: AttributeMapping, keys: list[str]) -> dict[str, dict[str, Any]]:
    """The write-only attribute values (``password``) of some identities, rendered from the source now.

    The queue never stores them (RFC 7643 §4.1.1: returned "never"); an operation
    that needs one gets it from the record as it is when the operation is sent.
    A record gone from the source, or that cannot be rendered, gives none.
    """
    wanted = set(keys)
    found: dict[str, dict[str, Any]] = {}
    for record in read_source(config.sources[config.targets[name].source]):
        if isinstance(record, BadRecord) or record.key not in wanted or record.key in found:
            continue
        try:
            payload = mapping.render(record.attributes).payload or {}
        except MappingError:
            continue
        values = {k: payload[k] for k in WRITE_ONLY if isinstance(payload.get(k), str)}
        if values:
            found[record.key] = values
    return found


# The note of a run cut short by a stop (run status ``interrupted``).
INTERRUPTED = "stopped before the cycle finished; the next cycle sends what it left queued"


def _start_run(engine: Engine, run_id: str, target: str, started: datetime) -> None:
    with engine.begin() as conn:
        conn.execute(insert(Run.__table__).values(id=run_id, target=target, started_at=started, status="running"))


def _finish_run(engine: Engine, report: TargetReport, status: str | None = None, error: str | None = None) -> None:
    if status is None:
        status = "held" if report.held else "failed" if report.failed else "deferred" if report.deferred else "succeeded"
    report.status = status
    with engine.begin() as conn:
        conn.execute(
            update(Run.__table__)
            .where(Run.__table__.c.id == report.run_id)
            .values(finished_at=utcnow(), status=status, counts=dumps(report.summary()), error=error)
        )


def _interrupted(engine: Engine, report: TargetReport) -> None:
    """Finish a run cut short by a stop as ``interrupted``, and say what it had planned and done."""
    _finish_run(engine, report, status="interrupted", error=INTERRUPTED)
    log.warning("cycle interrupted", target=report.target, run_id=report.run_id, planned=report.planned,
                outcomes=dict(report.statuses))  # fmt: skip


def _describe_groups(plan: GroupPlan) -> dict[str, object]:
    return {
        "counts": plan.counts(),
        "operations": [
            {"group": d.display_name, "kind": d.kind.value, "reason": d.reason.value,
             "add": len(d.add), "remove": len(d.remove)}  # fmt: skip
            for d in plan.decisions
        ],
    }


def describe_plan(
    engine: Engine,
    plan: Plan,
    active: int,
    target: TargetConfig,
    group_plan: GroupPlan | None = None,
    omit_if_empty: frozenset[tuple[str, ...]] = frozenset(),
) -> dict[str, object]:
    """A plan as an operator reads it: counts, each operation with the attributes it changes.

    ``omit_if_empty``: the mapping's attributes whose empty value keeps the target's, not a change.
    An update whose only changes are such attributes going empty sends nothing (the
    executor records the new hash, "nothing to send"): it is counted unchanged, not listed.
    """
    updates = [d.identity_key for d in plan.decisions if d.kind in (Kind.UPDATE, Kind.ENABLE)]
    states = load_link_states(engine, plan.target, updates) if updates else {}
    operations = []
    counts = plan.counts()
    for decision in plan.decisions:
        item: dict[str, object] = {
            "identity_key": decision.identity_key,
            "kind": decision.kind.value,
            "reason": decision.reason.value,
        }
        if decision.kind in (Kind.UPDATE, Kind.ENABLE) and decision.payload is not None:
            state = states.get(decision.identity_key)
            applied = state.applied if state else None
            # What the update sends: the userName the account was created with, values kept by omit_if_empty.
            payload = keep_chosen(applied, decision.payload)
            payload, kept = keep_omitted(applied, payload, omit_if_empty) if omit_if_empty else (payload, [])
            changes = changed_paths(applied, payload)
            # As the executor decides it: only omitted attributes went empty.
            if decision.kind is Kind.UPDATE and state and state.active and nothing_to_send(applied, payload, kept):
                counts[Kind.UPDATE.value] -= 1
                counts["unchanged"] += 1
                continue
            item["userName"] = payload.get("userName")
            item["changes"] = changes
        elif decision.payload is not None:
            # A unique_username() is shown as its candidates until the create chooses one.
            item["userName"] = readable(decision.payload.get("userName"))
        operations.append(item)
    leavers = sum(d.kind in (Kind.DISABLE, Kind.DELETE) for d in plan.decisions)
    return {
        "target": plan.target,
        "counts": counts,
        "would_hold_leavers": brake_trips(leavers, active, target.max_deprovision, target.max_deprovision_share),
        "operations": operations,
        "groups": _describe_groups(group_plan) if group_plan is not None else None,
        "rejected": [{"identity_key": key, "reason": reason} for key, reason, _kind, _why in plan.rejected],
    }
