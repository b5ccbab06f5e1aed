"""Provision on demand: ``provisioner sync --only KEY…`` plans and sends some identities now.

Entra's "provision on demand": a config author changes a mapping, or HR fixes
one record, and wants to see that person's account made now, step by step,
not at the next cycle of the whole population. For each target:

1. the source is read and the records of those keys are rendered (each
   payload printed, write-only values masked);
2. they are planned the way a cycle plans them — joiner, mover, rehire,
   leaver by the mapping's ``leaver_when``, unchanged, rejected — their
   references (``ref(manager_id)``) resolved against every account link, as
   in a full plan. Nobody else is planned: an identity missing
   from the records asked for is never a leaver, and a key that is not in the
   source is reported and left alone (a full cycle deprovisions leavers,
   behind its deletion brake);
3. the operations are queued and sent, only theirs (open operations of
   other identities wait for the next cycle), every HTTP request printed as
   it is answered, with the target's latency in milliseconds;
4. their group memberships: each group's plan as a cycle makes it, kept to
   these identities' additions and removals
   (:func:`provisioner.groups.only_members`), queued and sent the same way.

The outcome names only these identities: the exit code is 4 when any of
their operations failed or waits for a retry, or a record of theirs was
rejected or missing; 5 when a leaver of theirs is held by the deletion
brake; 0 otherwise. Other identities' failures do not count here.

It is not a cycle: the operations carry a run id of their own (``approve
RUN_ID`` releases a held leaver), but ``provisioner status``, the health and
the last-successful-cycle metric keep naming the last full cycle.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import Engine, select

from connectors import Exchange, ScimClient
from provisioner.config import Config
from provisioner.executor import Executor
from provisioner.group_executor import (
    GroupExecutor,
    claim_groups,
    enqueue_groups,
    held_identities,
)
from provisioner.groups import desired_groups, load_groups, only_members, plan_groups
from provisioner.mapping import AttributeMapping, MappingError
from provisioner.payload import readable
from provisioner.planner import Kind
from provisioner.queue import (
    OPEN,
    ClaimedOperation,
    Outcome,
    Selection,
    claim,
    load_links,
    retry_now,
)
from provisioner.quirks import load_quirks
from provisioner.redaction import mask_write_only
from provisioner.sources import BadRecord, IdentityRecord, read_source
from provisioner.store import Operation
from provisioner.sync import account_executor, new_run_id, plan_only, queue_plan
from provisioner.targets import TargetSession

Echo = Callable[[str], None]


@dataclass(slots=True)
class OnDemandReport:
    """What ``sync --only`` did in one target, for these identities only."""

    target: str
    run_id: str
    # Keys asked for that the source does not have.
    missing: list[str] = field(default_factory=list)
    rejected: int = 0
    held: int = 0
    # Operation statuses after sending, account and group operations of this run; "unchanged":
    # succeeded sending nothing (Outcome.unchanged), as a full cycle counts them.
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Nothing of these identities failed, waits, is held, rejected or missing."""
        return not (self.missing or self.rejected or self.held or set(self.statuses) - {"succeeded", "unchanged"})


async def sync_only(
    engine: Engine, config: Config, name: str, mapping: AttributeMapping, keys: Collection[str], echo: Echo
) -> OnDemandReport:
    """Plan and send the identities ``keys`` (and their group memberships) in target ``name``, printing each step.

    Raises SourceError (a UserError) when the source cannot be read.
    """
    target = config.targets[name]
    wanted = list(dict.fromkeys(keys))
    report = OnDemandReport(name, new_run_id())
    records = _records(config, name, set(wanted))
    found = {r.key for r in records}
    report.missing = [key for key in wanted if key not in found]
    for key in report.missing:
        echo(f"{name}: {key}: not in the source; nothing planned (a full sync handles leavers)")
    for record in records:
        _echo_render(echo, name, mapping, record)
    plan, active = plan_only(engine, config, name, mapping, records)
    decided = {d.identity_key: d for d in plan.decisions}
    for key in wanted:
        if key in decided:
            d = decided[key]
            echo(f"{name}: {key}: planned {d.kind.value} ({d.reason.value})")
        elif key in plan.settled:
            echo(f"{name}: {key}: planned nothing: the account already holds what the record renders to")
    for rejected in plan.rejected:
        echo(f"{name}: {rejected.identity_key}: rejected: {rejected.message}")
    queue_plan(engine, config, name, plan, report.run_id, active)
    report.rejected = len(plan.rejected)
    for key, kind in _send_again(engine, name, plan.present & found):
        echo(f"{name}: {key}: an earlier {kind} that failed or waits for a retry is sent now")
    unchanged = await _send_accounts(engine, config, name, mapping, found, echo)
    if target.groups is not None:
        await _send_groups(engine, config, name, mapping, found, report.run_id, echo)
    report.statuses = _statuses(engine, name, report.run_id, found, unchanged)
    report.held = report.statuses.pop("held", 0)
    if report.held:
        echo(f"{name}: {report.held} leaver operation(s) held by the deletion brake: provisioner approve {report.run_id}")
    return report


def _records(config: Config, name: str, keys: set[str]) -> list[IdentityRecord | BadRecord]:
    """The source's records of these keys (bad ones too: they are rejected, never guessed)."""
    source = config.sources[config.targets[name].source]
    return [record for record in read_source(source) if record.key in keys]


def _echo_render(echo: Echo, name: str, mapping: AttributeMapping, record: IdentityRecord | BadRecord) -> None:
    if isinstance(record, BadRecord):
        echo(f"{name}: {record.key}: cannot be read: {record.origin}: {record.reason}")
        return
    try:
        rendered = mapping.render(record.attributes)
    except MappingError as exc:
        echo(f"{name}: {record.key}: cannot be rendered: {exc}")
        return
    if not rendered.payload:
        echo(f"{name}: {record.key}: rendered no account: {'out of scope' if not rendered.in_scope else 'a leaver'}")
        return
    shown = readable(mask_write_only(rendered.payload), "resolved when sent")
    echo(f"{name}: {record.key}: rendered {orjson.dumps(shown, default=str).decode()}")


class _Echoing(list[Exchange]):
    """A client's history that prints each HTTP exchange as it is recorded: method, path, status, latency."""

    def __init__(self, echo: Echo, name: str, base_url: str) -> None:
        super().__init__()
        self._echo = echo
        self._name = name
        self._base = base_url.rstrip("/")

    def append(self, exchange: Exchange) -> None:
        super().append(exchange)
        path = exchange.url.removeprefix(self._base) or "/"
        status = exchange.status if exchange.status is not None else f"no answer ({exchange.error})"
        self._echo(f"{self._name}:   {exchange.method} {path} → {status} in {exchange.duration_ms:.0f} ms")


def _echoing_clients(session: TargetSession, echo: Echo, name: str) -> Callable[[], ScimClient]:
    def client() -> ScimClient:
        made = session.client()
        made.history = _Echoing(echo, name, session.config.base_url)
        return made

    return client


class _EchoingExecutor(Executor):
    """The cycle's executor, saying which operation it sends and how each ended."""

    echo: Echo = print
    # Ids of the operations that succeeded sending nothing (Outcome.unchanged).
    unchanged: set[int]

    async def _apply(self, client: ScimClient, op: ClaimedOperation, links: dict[str, Any]) -> Outcome:
        self.echo(f"{self.target}: {op.identity_key}: sending {op.kind.value}")
        return await super()._apply(client, op, links)

    def _log(self, op: ClaimedOperation, outcome: Outcome, started: float) -> None:
        super()._log(op, outcome, started)
        took = (time.perf_counter() - started) * 1000
        detail = outcome.error or outcome.note or ""
        if outcome.unchanged:
            self.unchanged.add(op.id)
        done = "unchanged" if outcome.unchanged else f"{op.kind.value} {outcome.status}"
        self.echo(f"{self.target}: {op.identity_key}: {done} in {took:.0f} ms" + (f": {detail}" if detail else ""))


async def _send_accounts(
    engine: Engine, config: Config, name: str, mapping: AttributeMapping, keys: set[str], echo: Echo
) -> set[int]:
    """Send the open account operations of ``keys``; returns the ids of those that succeeded sending nothing."""
    target = config.targets[name]
    session = TargetSession(target, quirks=load_quirks(engine, name, target))
    executor = account_executor(engine, config, name, mapping, session, _echoing_clients(session, echo, name),
                                _EchoingExecutor)  # fmt: skip
    executor.echo = echo
    executor.unchanged = set()
    try:
        while True:
            result = await executor.run(claim(engine, name, identities=keys))
            if not result.finished or result.skipped or result.unreachable:
                if result.skipped:
                    echo(f"{name}: {result.skipped} operation(s) not sent: the target is paused or quarantined")
                break
    finally:
        await session.aclose()
    return executor.unchanged


async def _send_groups(
    engine: Engine, config: Config, name: str, mapping: AttributeMapping, keys: set[str], run_id: str, echo: Echo
) -> None:
    target = config.targets[name]
    assert target.groups is not None
    session = TargetSession(target, quirks=load_quirks(engine, name, target))
    executor = GroupExecutor(engine, name, target, _echoing_clients(session, echo, name), quirks=session.quirks)
    try:
        executor.load()
        links = load_links(engine, name)
        desired = desired_groups(load_groups(target.groups), mapping, read_source(config.sources[target.source]), links,
                                 remove_leavers=target.remove_leavers_from_groups, held=held_identities(engine, name))  # fmt: skip
        full = plan_groups(name, desired, executor.links, executor.state, delete_empty=target.delete_empty_groups)
        members = {link.scim_id: key for key, link in links.items() if key in keys}
        plan = only_members(full, members, executor.links)
        if not plan.decisions:
            echo(f"{name}: groups: no membership of theirs to change")
            return
        for d in plan.decisions:
            who = ", ".join(members[i] for i in d.add)
            gone = ", ".join(members[i] for i in d.remove)
            echo(f"{name}: group {d.display_name}: planned {d.kind.value}"
                 + (f" +[{who}]" if who else "") + (f" -[{gone}]" if gone else ""))  # fmt: skip
        enqueue_groups(engine, run_id, name, plan, desired.identities, partial=True)
        groups = [d.group_key for d in plan.decisions]
        while True:
            result = await executor.run(claim_groups(engine, name, groups=groups))
            if not result.statuses or result.skipped:
                break
        names = {d.group_key: d.display_name for d in plan.decisions}
        for key, status, error in _group_outcomes(engine, name, run_id, groups):
            echo(f"{name}: group {names.get(key, key)}: {status}" + (f": {error}" if error else ""))
    finally:
        await session.aclose()


def _group_outcomes(engine: Engine, name: str, run_id: str, groups: Iterable[str]) -> list[tuple[str, str, str | None]]:
    op = Operation.__table__
    query = select(op.c.identity_key, op.c.status, op.c.last_error).where(
        op.c.target == name, op.c.run_id == run_id, op.c.identity_key.in_(list(groups)), op.c.kind.like("group_%")
    )
    with engine.connect() as conn:
        return [(row[0], row[1], row[2]) for row in conn.execute(query)]


def _statuses(
    engine: Engine, name: str, run_id: str, keys: set[str], unchanged: Collection[int] = ()
) -> dict[str, int]:
    """Statuses of this run's operations (their accounts and groups) and of their accounts' still open ones.

    The operations ``unchanged`` (ids) count as "unchanged", not "succeeded": they sent nothing.
    """
    op = Operation.__table__
    accounts = op.c.identity_key.in_(list(keys)) & op.c.kind.in_([k.value for k in Kind]) & op.c.status.in_(OPEN)
    query = select(op.c.id, op.c.status).where(op.c.target == name, (op.c.run_id == run_id) | accounts)
    counts: dict[str, int] = {}
    with engine.connect() as conn:
        for op_id, status in conn.execute(query):
            shown = "unchanged" if op_id in unchanged and status == "succeeded" else status
            counts[shown] = counts.get(shown, 0) + 1
    return counts



def _send_again(engine: Engine, name: str, keys: Iterable[str]) -> list[tuple[str, str]]:
    """Earlier operations of these identities that failed or wait for a retry, made due now: asked for, sent now.

    Rejections (a record that could not be mapped, no payload) are not: the plan decides them anew.
    """
    op = Operation.__table__
    query = select(op.c.id, op.c.identity_key, op.c.kind).where(
        op.c.target == name, op.c.identity_key.in_(list(keys)), op.c.status.in_(("failed", "retry_wait")),
        op.c.kind.in_([k.value for k in Kind]), op.c.payload.is_not(None),
    )  # fmt: skip
    with engine.connect() as conn:
        rows = [(row[0], row[1], row[2]) for row in conn.execute(query)]
    if rows:
        retry_now(engine, Selection(ids=tuple(row[0] for row in rows), target=name))
    return [(key, kind) for _, key, kind in rows]
