"""Sending claimed operations to a target and recording what happened.

Operations run concurrently per target (one SCIM client per worker, bounded
by ``max_concurrency``), never two at once for the same account. Each outcome
is written with the account link it leaves, in one transaction.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from datetime import datetime
from typing import Any, Literal

import structlog
from sqlalchemy import Engine

from connectors import (
    AuthError,
    Capabilities,
    Conflict,
    Exchange,
    NotFound,
    PermanentError,
    PreconditionFailed,
    Quirks,
    ScimClient,
    ScimError,
    ScimResult,
    TransientError,
    resource_matches,
)
from provisioner import metrics
from provisioner.config import TargetConfig
from provisioner.quarantine import Admission, Tally, admission, observe, state
from provisioner.quirks import DROPPED_NOTE, load_quirks
from provisioner.targets import discover
from provisioner.functions import Unique
from provisioner.payload import (
    flatten,
    keep_chosen,
    keep_omitted,
    nothing_to_send,
    owed_references,
    patch_operations,
    payload_hash,
    refs_in,
    resolve_refs,
    settle_references,
    unchosen,
    with_paths,
    without,
)
from provisioner.rebase import rebase_operations
from provisioner.planner import Kind
from provisioner.queue import (
    CallRecord,
    ClaimedOperation,
    GroupCommit,
    LinkState,
    Outcome,
    give_up_if_too_old,
    linked_identity,
    load_link_states,
    record_many,
    release,
    remember_payload,
)
from provisioner.reactions import (
    USERNAME_IMMUTABLE,
    Step,
    dropped,
    on_user_error,
    replace_all,
    unsupported_extensions,
    user_write_method,
    without_extensions,
    without_username,
)
from provisioner.redaction import MASK, WRITE_ONLY, register_write_only

log = structlog.get_logger("provisioner.executor")

ClientFactory = Callable[[], ScimClient]
# Identity keys -> {attribute: value} of their write-only attributes, rendered from the source now.
WriteOnlySource = Callable[[list[str]], dict[str, dict[str, Any]]]
# 412 rounds: refetch the version and resend, at most this often before review.
PRECONDITION_ROUNDS = 3
# A unique_username() value taken between its lookup and the create (a 409): choices tried at most.
CONFLICT_ROUNDS = 3


@dataclass(slots=True)
class ExecutionReport:
    """What one execution round did: outcomes by status, and operations done by kind.

    ``done["unchanged"]``: operations that succeeded sending nothing (see ``Outcome.unchanged``).
    """

    statuses: Counter[str] = field(default_factory=Counter)
    done: Counter[str] = field(default_factory=Counter)
    finished: set[int] = field(default_factory=set)
    # Claimed but not sent: stopped, paused, quarantined, or the breaker tripped. Still queued.
    skipped: int = 0
    # The target could not be reached at all this round.
    unreachable: bool = False


class Executor:
    """Runs the due operations of one target."""

    def __init__(
        self,
        engine: Engine,
        target: str,
        config: TargetConfig,
        client_factory: ClientFactory,
        *,
        endpoint: str = "Users",
        match_attribute: str = "userName",
        quirks: Quirks | None = None,
        write_only: WriteOnlySource | None = None,
        create_only: frozenset[tuple[str, ...]] = frozenset(),
        omit_if_empty: frozenset[tuple[str, ...]] = frozenset(),
        uses_refs: bool = True,
    ) -> None:
        self.engine = engine
        # The target's deviations, declared and learned (shared with its clients when they come from one session).
        self.quirks = quirks if quirks is not None else load_quirks(engine, target, config)
        self.target = target
        self.config = config
        self.endpoint = endpoint
        self.match_attribute = match_attribute
        # userName is caseExact false (RFC 7643 §4.1.1); other match attributes (externalId) compare exactly.
        self.match_case_exact = match_attribute.casefold() != "username"
        # Attributes sent on create only (the mapping's `when: create`): never on adopt or update.
        self.create_only = create_only
        # Attributes whose empty value keeps the target's (the mapping's `omit_if_empty`): never removed.
        self.omit_if_empty = omit_if_empty
        # Whether payloads may hold references (the mapping calls ref()): without, none is looked for.
        self.uses_refs = uses_refs
        self.client_factory = client_factory
        # Write-only values (password) by identity key, rendered from the source for the operations that need them.
        self.write_only = write_only
        self.write_only_values: dict[str, dict[str, Any]] = {}
        # unique_username() values chosen by this executor's creates (casefolded): never chosen twice.
        self._chosen: set[str] = set()
        self.capabilities: Capabilities | None = None
        # Which schemas the target's resource type lists (None: not asked yet; False: it did not say).
        self._extensions: Callable[[str], bool] | Literal[False] | None = None
        # Set to stop taking new operations; those in flight finish and are recorded.
        self.stopping = asyncio.Event()
        self._series: dict[Any, Any] = {}
        # Bound once: the module's lazy logger builds a new bound logger at every call, even one that writes nothing.
        self._debug = log.bind().debug

    async def run(self, operations: list[ClaimedOperation]) -> ExecutionReport:
        """Send every operation, at most ``max_concurrency`` at a time, and record each outcome.

        A paused target, or a quarantined one between probes, is sent nothing; a
        quarantined one due for a probe is sent one operation first, and the rest
        only if that one succeeds.
        """
        report = ExecutionReport()
        if not operations:
            return report
        gate = admission(self.engine, self.target)
        if gate is Admission.SKIP:
            release(self.engine, [op.id for op in operations])
            report.skipped = len(operations)
            return report
        by_key: dict[str, list[ClaimedOperation]] = {}
        for op in operations:
            by_key.setdefault(op.identity_key, []).append(op)
        links = load_link_states(self.engine, self.target, _keys_needed(by_key) if self.uses_refs else list(by_key))
        # The accounts that attributes owed by these accounts refer to (a disable sends them).
        owed = {ref for key in by_key if key in links for ref in refs_in(links[key].owed)} - links.keys()
        if owed:
            links.update(load_link_states(self.engine, self.target, list(owed)))
        self._load_write_only(operations)
        clients = [self.client_factory() for _ in range(min(self.config.max_concurrency, len(by_key)))]
        tally = Tally()
        commits = GroupCommit(self.engine, self.target)
        try:
            if self.capabilities is None:
                try:
                    self.capabilities = await discover(clients[0], self.config, update_method=self.config.update_method)
                except (TransientError, AuthError) as exc:
                    # The target cannot even describe itself: send nothing; every operation waits
                    # for a later round with the reason on its row, where operators look.
                    log.warning("target unreachable", target=self.target, error=str(exc))
                    tally.add(ok=False, unwell=True, auth=isinstance(exc, AuthError), error=str(exc))
                    self._defer_all(operations, exc, report)
                    return report
            waves = _waves(by_key, links) if self.uses_refs else [list(by_key)]
            if gate is Admission.PROBE:
                if not await target_answers(clients[0], tally):
                    return report
                probe = min(waves[0], key=lambda key: _tried(by_key[key]))
                waves = [[probe], *([key for key in wave if key != probe] for wave in waves)]
            for number, wave in enumerate(waves):
                if self._must_stop(tally) or (gate is Admission.PROBE and number > 0 and not tally.succeeded):
                    break
                work: asyncio.Queue[list[ClaimedOperation]] = asyncio.Queue()
                for key in wave:
                    work.put_nowait(by_key[key])
                await asyncio.gather(*(self._worker(client, work, links, report, tally, commits) for client in clients))
                # The wave's outcomes are written and counted before the next wave, or the probe, is judged.
                commits.close()
            if tally.only_repeated:
                await target_answers(clients[0], tally)
        finally:
            commits.flush()  # an outcome handed in as the round was stopped is written, not released
            await asyncio.gather(*(client.aclose() for client in clients))
            # Whatever was claimed but not started (a stop, a breaker, a probe) goes back as it was.
            unstarted = [op.id for op in operations if op.id not in report.finished]
            release(self.engine, unstarted)
            report.skipped = len(unstarted)
            self._observe(tally)
        return report

    def _defer_all(self, operations: list[ClaimedOperation], exc: ScimError, report: ExecutionReport) -> None:
        outcomes: list[tuple[str, Outcome]] = []
        for op in operations:
            outcome = _outcome(op, "failed" if give_up_if_too_old(op) else "retry_wait", exc)
            outcome.attempt = op.attempts
            outcomes.append((op.identity_key, outcome))
        # One transaction for the whole claim: these outcomes carry no link, nothing can conflict.
        if outcomes:
            record_many(self.engine, self.target, outcomes)
        for _, outcome in outcomes:
            report.finished.add(outcome.operation_id)
            report.statuses[outcome.status] += 1
        report.unreachable = True

    def _must_stop(self, tally: Tally) -> bool:
        return self.stopping.is_set() or tally.consecutive_failures >= self.config.quarantine.consecutive_failures

    def _observe(self, tally: Tally) -> None:
        judge(self.engine, self.target, self.config, tally)

    async def _worker(
        self,
        client: ScimClient,
        work: asyncio.Queue[list[ClaimedOperation]],
        links: dict[str, LinkState],
        report: ExecutionReport,
        tally: Tally,
        commits: GroupCommit,
    ) -> None:
        while not work.empty() and not self._must_stop(tally):
            ops = work.get_nowait()
            for op in ops:
                started = time.perf_counter()
                client.history.clear()
                outcome = await self._apply(client, op, links)
                outcome.calls = call_records(client.history, outcome.status == "succeeded", self.config.call_bodies)
                outcome.attempt = op.attempts
                if outcome.http_status is None and outcome.calls:
                    outcome.http_status = outcome.calls[-1].http_status
                # This cycle's later operations see the account as it now is in the target (a report's
                # create names a manager created a moment ago), recorded or not yet.
                if outcome.drop_link:
                    links.pop(op.identity_key, None)
                elif outcome.link is not None:
                    links[op.identity_key] = outcome.link
                # Sent: never given back as unstarted, even if its outcome cannot be written.
                report.finished.add(op.id)
                commits.hand_in(op.identity_key, outcome, partial(self._recorded, op, outcome, started, report, tally))

    def _recorded(
        self, op: ClaimedOperation, outcome: Outcome, started: float, report: ExecutionReport, tally: Tally
    ) -> None:
        """Count an operation whose outcome is committed: the round's tally, metrics, the report, its log line."""
        tally_outcome(tally, outcome, repeated=op.failed_before)
        self._measure(op, outcome)
        report.statuses[outcome.status] += 1
        if outcome.status == "succeeded":
            report.done["unchanged" if outcome.unchanged else op.kind.value] += 1
        self._log(op, outcome, started)

    async def _apply(self, client: ScimClient, op: ClaimedOperation, links: dict[str, LinkState]) -> Outcome:
        return await self._attempt(client, op, links)

    async def _attempt(self, client: ScimClient, op: ClaimedOperation, links: dict[str, LinkState]) -> Outcome:
        try:
            return await self._send(client, op, links)
        except NotFound as exc:
            if op.kind in (Kind.DISABLE, Kind.DELETE):
                # Nothing left to deprovision: the account is already gone from the target.
                return _outcome(op, "succeeded", exc, drop_link=True, note="account not found in the target")
            return _outcome(op, "failed", exc)
        except UsernameImmutable as exc:
            # The rest of the change was applied; the rename never will be: review, no retries.
            return _outcome(op, "failed", exc)
        except (TransientError, AuthError) as exc:
            status = "failed" if give_up_if_too_old(op) else "retry_wait"
            outcome = _outcome(op, status, exc)
            if status == "retry_wait" and client.retry.defers(exc):
                outcome.retry_after = put_off(client, exc)
            return outcome
        except PermanentError as exc:
            return _outcome(op, "failed", exc)

    async def _send(self, client: ScimClient, op: ClaimedOperation, links: dict[str, LinkState]) -> Outcome:
        link = links.get(op.identity_key)
        if link is None and op.kind in (Kind.DISABLE, Kind.DELETE) and (op.payload or {}).get("id"):
            return await self._deprovision_unowned(client, op, str(op.payload["id"]))  # type: ignore[index]
        if op.kind is Kind.DELETE:
            if link is None:
                return Outcome(op.id, "succeeded", note="no account linked; nothing to delete")
            await self._fresh(client, link, lambda etag: client.delete(self.endpoint, link.scim_id, etag=etag))
            return Outcome(op.id, "succeeded", drop_link=True)

        def scim_id(key: str) -> str | None:
            return links[key].scim_id if key in links else None

        if op.kind is Kind.DISABLE:
            if link is None:
                return Outcome(op.id, "succeeded", note="no account linked; nothing to disable")
            return await self._disable(client, op, link, scim_id)
        # A link carries the id of the account reconciliation found; it is not part of what is sent.
        account = str(op.payload["id"]) if op.kind is Kind.LINK and (op.payload or {}).get("id") else None
        source = {k: v for k, v in (op.payload or {}).items() if k != "id"} if account else (op.payload or {})
        # References to accounts created earlier in this cycle resolve now; the rest drop out, and
        # the account owes them: its link keeps them until a later write can send them.
        payload, owed = source, None
        if self.uses_refs:
            payload, _ = resolve_refs(source, scim_id)
            owed = owed_references(without(source, self.create_only), scim_id) or None
        outcome = await self._provision(client, op, link, account, payload)
        if outcome.link is not None:
            outcome.link = replace(outcome.link, owed=self._sendable(owed))
        return outcome

    def _sendable(self, owed: dict[str, Any] | None) -> dict[str, Any] | None:
        """Owed attributes but those of an extension the target does not list (they are never sent)."""
        supports = self._extensions
        if not owed or not supports:
            return owed
        kept = {p: v for p, v in owed.items() if not p.startswith("urn:") or supports(p.rpartition(":")[0])}
        return kept or None

    async def _provision(
        self,
        client: ScimClient,
        op: ClaimedOperation,
        link: LinkState | None,
        account: str | None,
        payload: dict[str, Any],
    ) -> Outcome:
        """Create, adopt or update the account so that it holds ``payload`` (references resolved)."""
        # Write-only values are stored masked: rendered again from the source now, or left out.
        payload = self._with_write_only(op.identity_key, payload)
        # The hash is the desired payload's: an extension held back is not a change to send every cycle.
        # Like the planner's, it leaves out create-only attributes: a change of them alone is no update.
        applied_hash = payload_hash(without(unchosen(payload), self.create_only))
        payload = await self._supported(client, payload)
        if link is None:
            if account is not None:
                existing = await self._found_account(client, account, payload)
                if existing is not None:
                    return await self._adopt(client, op, existing, payload, applied_hash, "adopted the account reconciliation found")
            if any(isinstance(v, Unique) for v in payload.values()):
                return await self._create_unique(client, op, payload, applied_hash)
            return await self._create(client, op, payload, applied_hash)
        payload = keep_chosen(link.applied, without(payload, self.create_only))
        if self.omit_if_empty:
            payload, kept = keep_omitted(link.applied, payload, self.omit_if_empty)
            if op.kind is Kind.UPDATE and link.active and nothing_to_send(link.applied, payload, kept):
                # Only omit_if_empty attributes went empty: the target keeps its values, nothing to send.
                state = replace(link, applied=payload, applied_hash=applied_hash)
                return Outcome(op.id, "succeeded", note=f"kept {', '.join(kept)} (omit_if_empty); nothing to send",
                               link=state, unchanged=True)  # fmt: skip
        try:
            result = await self._update(client, link, payload, enable=op.kind is Kind.ENABLE)
        except NotFound:
            if self.config.on_missing == "review":
                raise
            # The account vanished from the target: provision it again.
            outcome = await self._create(client, op, payload, applied_hash)
            outcome.note = "account was missing in the target; created again"
            return outcome
        state = _linked(link, result, active=_active(payload), applied=payload, applied_hash=applied_hash)
        return await self._verify(client, link.scim_id, payload, result, Outcome(op.id, "succeeded", link=state))

    async def _disable(
        self, client: ScimClient, op: ClaimedOperation, link: LinkState, scim_id: Callable[[str], str | None]
    ) -> Outcome:
        """Disable the account, sending with it what it owes that resolves now (a manager created since).

        A leaver gets no update: without this, a report created before its
        manager's account existed and leaving before the next update would keep
        no manager for good, though the link says nothing is left to send.
        """
        resolved, still = settle_references(link.owed, scim_id)
        if not resolved:
            result = await self._set_active(client, link, active=False)
            return Outcome(op.id, "succeeded", link=_linked(link, result, active=False))
        applied = with_paths(link.applied or {}, resolved)
        result = await self._set_active(client, link, active=False, owed=resolved, applied=applied)
        # The hash is of what the account holds now, as an update computes it (applied has no create-only attributes).
        state = _linked(link, result, active=False, applied=applied, applied_hash=payload_hash(applied))
        return Outcome(op.id, "succeeded", link=replace(state, owed=still or None))

    async def _deprovision_unowned(self, client: ScimClient, op: ClaimedOperation, scim_id: str) -> Outcome:
        """Disable or delete an account no identity owns, by its id (a reconciliation's reaction); no link."""
        owner = linked_identity(self.engine, self.target, scim_id)
        if owner is not None:
            # Adopted since the reconciliation found it unowned: it is someone's account now.
            return Outcome(op.id, "succeeded", note=f"account is now linked to identity {owner}; left as it is")
        found = LinkState(scim_id, True, None, None, None, None)
        if op.kind is Kind.DELETE:
            await self._fresh(client, found, lambda etag: client.delete(self.endpoint, scim_id, etag=etag))
            return Outcome(op.id, "succeeded", note="unmatched account deleted")
        await self._set_active(client, found, active=False)
        return Outcome(op.id, "succeeded", note="unmatched account disabled")

    async def _found_account(self, client: ScimClient, scim_id: str, payload: dict[str, Any]) -> dict[str, Any] | None:
        """The account reconciliation found for a link, read by its id; None when gone or no longer matching.

        By id, not by filter: a target whose filters compare userName case-sensitively
        (against RFC 7643 §4.1.1) finds nothing for an account whose case differs.
        """
        value = payload.get(self.match_attribute)
        if not isinstance(value, str) or not value:
            return None
        try:
            result = await client.get(self.endpoint, scim_id)
        except NotFound:
            return None
        resource = result.resource or {}
        if not resource.get("id") or not resource_matches(resource, self.match_attribute, value,
                                                           case_exact=self.match_case_exact):
            return None
        return resource

    async def _create_unique(
        self, client: ScimClient, op: ClaimedOperation, payload: dict[str, Any], applied_hash: str
    ) -> Outcome:
        """Create an account whose unique_username() values are chosen now, against the target.

        Each choice is written to the queue row before the POST: a retry (the
        answer lost, a 503) sends the same value, and adopts the account the first
        try made rather than making a second one. A 409 on a fresh choice means
        someone took the value since it was looked up: the next one is tried.
        """
        for _ in range(CONFLICT_ROUNDS):
            retried = all(v.chosen for v in payload.values() if isinstance(v, Unique))
            chosen = {name: await self._choose(client, op, name, value)
                      for name, value in payload.items() if isinstance(value, Unique)}  # fmt: skip
            stored = {k: replace(v, chosen=chosen[k]) if k in chosen else v for k, v in (op.payload or {}).items()}
            remember_payload(self.engine, op.id, stored)
            try:
                return await self._create(client, op, {**payload, **chosen}, applied_hash, adopt_on_conflict=retried)
            except Conflict:
                if retried:
                    raise
                payload = {k: replace(v, chosen=None) if isinstance(v, Unique) else v for k, v in payload.items()}
        raise Conflict(f"unique_username: {CONFLICT_ROUNDS} values in a row were taken between lookup and create")

    async def _choose(self, client: ScimClient, op: ClaimedOperation, name: str, unique: Unique) -> str:
        """The first value of ``unique`` that no account of the target holds, but one linked to this identity.

        Looked up with ``filter=name eq "value"`` (RFC 7644 §3.4.2.2, escaped), the
        answer checked by :meth:`~connectors.ScimClient.find`; compared without case
        (RFC 7643 §4.1.1 userName, and a value free only in its case is not free).
        Values chosen by this round's other creates are skipped: two joiners who both
        render ``jane.doe`` get ``jane.doe`` and ``jane.doe2``. Raises PermanentError
        when every value is taken.
        """
        if unique.chosen:
            self._chosen.add(unique.chosen.casefold())
            return unique.chosen
        tried = 0
        for value in unique.values():
            if value.casefold() in self._chosen:
                continue
            self._chosen.add(value.casefold())  # before the lookup: a concurrent create skips it meanwhile
            tried += 1
            found = await client.find(self.endpoint, name, value, case_exact=False)
            owners = {linked_identity(self.engine, self.target, str(r.get("id"))) for r in found}
            if not found or owners == {op.identity_key}:
                return value
        raise PermanentError(f"unique_username: every {name} tried is taken in the target ({tried} looked up, "
                             f"{unique.candidates[0]}{unique.suffix} to the last numbered one)")  # fmt: skip

    async def _create(
        self,
        client: ScimClient,
        op: ClaimedOperation,
        payload: dict[str, Any],
        applied_hash: str,
        *,
        adopt_on_conflict: bool = True,
    ) -> Outcome:
        """POST the account; adopt an existing one when the target already has it (``adopt_on_conflict``: on a 409)."""
        if self._match_first(op):
            existing = await self._find_existing(client, payload, required=False)
            if existing is not None:
                return await self._adopt(client, op, existing, payload, applied_hash, "matched an existing account")
        try:
            result = await self._post(client, payload)
        except Conflict as conflict:
            if not adopt_on_conflict:
                raise
            try:
                existing = await self._find_existing(client, payload, required=True)
                assert existing is not None
                return await self._adopt(
                    client, op, existing, payload, applied_hash, "409 on create: adopted the existing account"
                )
            except ScimError as exc:
                raise _after_conflict(conflict, exc) from exc
        if isinstance(result, dict):
            note = "the create's answer was lost; adopted the account it made"
            return await self._adopt(client, op, result, payload, applied_hash, note)
        # What an update compares with: create-only attributes are never compared, so never removed.
        applied = without(payload, self.create_only)
        state = LinkState(result.id or "", _active(payload), result.version, result.location, applied_hash, applied)
        return await self._verify(client, state.scim_id, payload, result, Outcome(op.id, "succeeded", link=state))

    async def _post(self, client: ScimClient, payload: dict[str, Any]) -> ScimResult | dict[str, Any]:
        try:
            return await client.create(self.endpoint, payload)
        except TransientError as exc:
            if not exc.ambiguous:
                raise
            # No answer (or a garbled one): the account may exist now. Look before posting again.
            existing = await self._find_existing(client, payload, required=False)
            if existing is not None:
                return existing
            return await client.create(self.endpoint, payload)

    def _match_first(self, op: ClaimedOperation) -> bool:
        # A retried create may have succeeded the first time with its answer lost.
        if op.kind is Kind.LINK:
            return True  # adopting the account the match attribute finds is the point
        policy = self.config.match_before_create
        return policy == "always" or (policy == "retries" and op.attempts > 1)

    async def _find_existing(self, client: ScimClient, payload: dict[str, Any], *, required: bool) -> dict[str, Any] | None:
        value = payload.get(self.match_attribute)
        if not isinstance(value, str) or not value:
            if required:
                raise Conflict(f"the target reports a conflict, and '{self.match_attribute}' has no value to look it up by")
            return None
        found = await self._verified_find(client, value)
        if len(found) == 1 and found[0].get("id"):
            return found[0]
        if not found and not required:
            return None
        raise Conflict(
            f"{self.match_attribute} eq {value!r} matches {len(found)} accounts in the target; "
            "expected exactly one to adopt"
        )

    async def _supported(self, client: ScimClient, payload: dict[str, Any]) -> dict[str, Any]:
        """The payload without schema extensions the target does not list in /ResourceTypes (RFC 7643 §6).

        ``unsupported_attributes: omit`` leaves them out with one warning per target
        and extension; ``refuse`` fails the operation naming the extension, for review.
        """
        if not any(name.startswith("urn:") for name in payload):
            return payload
        if self._extensions is None:
            seen = len(client.history)
            try:
                types = await client.resource_types()
            except (PermanentError, TransientError) as exc:
                log.info("resource types unknown", target=self.target, error=str(exc))
                types = {}
            del client.history[seen:]  # discovery, not this operation's call
            found = types.get(self.endpoint)
            self._extensions = found.supports if found is not None else False
        unsupported = unsupported_extensions(payload, self._extensions or None)
        if not unsupported:
            return payload
        if self.config.unsupported_attributes == "refuse":
            raise PermanentError(f"the target's /ResourceTypes lists no {', '.join(unsupported)} for {self.endpoint} "
                                 "(unsupported_attributes: refuse)")  # fmt: skip
        for urn in unsupported:
            if (self.target, urn) not in _WARNED:
                _WARNED.add((self.target, urn))
                log.warning("schema extension not supported by the target; left out of payloads",
                            target=self.target, endpoint=self.endpoint, extension=urn)  # fmt: skip
        return without_extensions(payload, unsupported)

    async def _verified_find(self, client: ScimClient, value: str) -> list[dict[str, Any]]:
        """Accounts whose match attribute really equals ``value``, once each: a lookup result is a claim.

        userName compares case-insensitively (RFC 7643 §4.1.1), other attributes exactly.
        """
        # find() keeps only results that really match, once each by id.
        return await client.find(self.endpoint, self.match_attribute, value, case_exact=self.match_case_exact)

    async def _adopt(
        self,
        client: ScimClient,
        op: ClaimedOperation,
        existing: dict[str, Any],
        payload: dict[str, Any],
        applied_hash: str,
        note: str,
    ) -> Outcome:
        scim_id = str(existing["id"])
        owner = linked_identity(self.engine, self.target, scim_id)
        if owner is not None and owner != op.identity_key:
            raise Conflict(f"account {scim_id} ({self.match_attribute}) is already linked to identity {owner}")
        version = (existing.get("meta") or {}).get("version")
        found = LinkState(scim_id, bool(existing.get("active", True)), version, None, None, None)
        payload = without(payload, self.create_only)  # adopting is not creating
        # What the account holds where the record is empty and the mapping says omit_if_empty: kept.
        payload, _ = keep_omitted(existing, payload, self.omit_if_empty)
        result = await self._write(client, found, payload, None, adopting=True)
        state = _linked(found, result, active=_active(payload), applied=payload, applied_hash=applied_hash)
        outcome = Outcome(op.id, "succeeded", note=note, link=state)
        return await self._verify(client, found.scim_id, payload, result, outcome)

    async def _update(
        self, client: ScimClient, link: LinkState, payload: dict[str, Any], *, enable: bool
    ) -> ScimResult:
        operations = None
        if link.applied is not None and (self._use_patch() or not self.quirks.put):
            # Write-only values are stored masked: set on create (and by every PUT), not re-sent by PATCH.
            applied = {**link.applied, **{k: payload[k] for k in WRITE_ONLY if link.applied.get(k) == MASK and k in payload}}
            operations = patch_operations(applied, payload)
            if enable and not any(o.get("path") == "active" for o in operations):
                operations.append({"op": "replace", "path": "active", "value": True})
            if not operations:
                operations = None
        # The account is to be active (a mover's, a rehire's) unless the mapping says otherwise.
        desired = {"active": True, **payload} if enable or link.active else payload
        return await self._write(client, link, payload, operations, adopting=False, desired=desired)

    async def _write(
        self,
        client: ScimClient,
        link: LinkState,
        payload: dict[str, Any],
        operations: list[dict[str, Any]] | None,
        *,
        adopting: bool,
        desired: dict[str, Any] | None = None,
    ) -> ScimResult:
        """Write the desired state (``operations``: only what changed) as the target takes it.

        PUT where the target has it, else PATCH (``replace`` of each attribute when
        the change is not known); a PUT answered 405/501 is learned (``put: false``)
        and sent as PATCH. A userName the target will not change (scimType
        ``mutability``) fails the operation at once, after the rest was applied.
        """
        method = user_write_method(put=self.quirks.put, patch=self._use_patch(), knows_applied=operations is not None,
                                   adopting=adopting)  # fmt: skip
        renames = _renames_username(link.applied, payload)
        try:
            return await self._send_write(client, link, method, payload, operations, desired)
        except (PermanentError, TransientError) as exc:
            step = on_user_error(method, exc.status, exc.scim_type, adopting=adopting, renames_username=renames)
            if step is Step.USE_PATCH:
                self.quirks.learn("put", False, f"PUT /{self.endpoint}/{{id}} answered {exc.status}")
                return await self._write(client, link, payload, operations, adopting=adopting, desired=desired)
            if step is Step.DROP_USERNAME:
                kept_ops, kept = without_username(operations, payload, (link.applied or {}).get("userName"))
                if kept_ops != []:
                    await self._send_write(client, link, method, kept, kept_ops)
                raise UsernameImmutable(USERNAME_IMMUTABLE, status=exc.status, scim_type=exc.scim_type,
                                        detail=exc.detail, request=exc.request) from exc  # fmt: skip
            raise

    async def _send_write(
        self,
        client: ScimClient,
        link: LinkState,
        method: str,
        payload: dict[str, Any],
        operations: list[dict[str, Any]] | None,
        desired: dict[str, Any] | None = None,
    ) -> ScimResult:
        if method == "put":
            return await self._fresh(client, link, lambda etag: client.replace(self.endpoint, link.scim_id, payload, etag=etag))
        if operations is None:
            # Every attribute replaced (no PUT): a 412 sends the same request on the fresh version.
            ops = replace_all(payload)
            return await self._fresh(client, link, lambda etag: client.patch(self.endpoint, link.scim_id, ops, etag=etag))
        # A difference: a 412 is rebased on the fresh resource toward ``desired``.
        return await self._fresh(
            client, link, lambda etag: client.patch(self.endpoint, link.scim_id, operations, etag=etag), desired
        )

    async def _verify(
        self, client: ScimClient, scim_id: str, payload: dict[str, Any], result: ScimResult, outcome: Outcome
    ) -> Outcome:
        """Compare what the target answered (or, when its answers cannot be trusted, holds) with what was sent.

        An attribute sent but not stored marks the operation ("target dropped title")
        and is counted: never a silent success.
        """
        stored = result.resource if isinstance(result.resource, dict) and result.resource else None
        if self.quirks.verify_writes:
            stored = (await client.get(self.endpoint, scim_id)).resource
        lost = dropped(payload, stored)
        if lost:
            for name in lost:
                metrics.UNSTORED.labels(self.target, name).inc()
            text = f"{DROPPED_NOTE} {', '.join(lost)}"
            outcome.note = f"{outcome.note}; {text}" if outcome.note else text
            log.warning("target did not store attributes", target=self.target, scim_id=scim_id, attributes=lost)
        return outcome

    async def _set_active(
        self,
        client: ScimClient,
        link: LinkState,
        *,
        active: bool,
        owed: dict[str, Any] | None = None,
        applied: dict[str, Any] | None = None,
    ) -> ScimResult:
        """Set ``active``, and the ``owed`` attributes ({path: value}) with it; ``applied``: the payload that leaves."""
        if self._use_patch() or not self.quirks.put:
            operations = [{"op": "replace", "path": "active", "value": active}]
            operations += [{"op": "replace", "path": path, "value": value} for path, value in (owed or {}).items()]
            desired = {**(applied or link.applied or {}), "active": active}
            return await self._fresh(
                client, link, lambda etag: client.patch(self.endpoint, link.scim_id, operations, etag=etag), desired
            )
        current = applied or link.applied
        if current is None:
            current = (await client.get(self.endpoint, link.scim_id)).resource or {}
        body = {k: v for k, v in current.items() if k not in ("id", "meta")}
        return await self._fresh(
            client, link, lambda etag: client.replace(self.endpoint, link.scim_id, {**body, "active": active}, etag=etag)
        )

    async def _fresh(
        self,
        client: ScimClient,
        link: LinkState,
        send: Callable[[str | None], Awaitable[ScimResult]],
        desired: dict[str, Any] | None = None,
    ) -> ScimResult:
        """Send with If-Match; on 412, read the resource again and send what it still lacks.

        ``desired``: the state a PATCH is to leave (payload and ``active``). After a
        412 someone else changed the resource: the PATCH sent on the fresh version is
        the whole difference between ``desired`` and the fresh resource on the
        attributes the mapping owns (:func:`provisioner.rebase.rebase_operations`),
        not our own small change again, so that recording ``desired`` as applied is
        true. Without ``desired`` (a PUT of the whole resource, a DELETE) the same
        request is sent with the fresh version.
        """
        etag = self._if_match(link)
        versions = [etag]
        for _ in range(PRECONDITION_ROUNDS):
            try:
                return await send(etag)
            except PreconditionFailed:
                fresh = await client.get(self.endpoint, link.scim_id)
                etag = fresh.version
                versions.append(etag)
                if desired is not None:
                    owned = flatten(link.applied or {}).keys()
                    operations = rebase_operations(desired, fresh.resource or {}, owned)
                    if not operations:
                        return fresh  # the target holds the desired state already
                    send = _patch_sender(client, self.endpoint, link.scim_id, operations)
        try:
            return await send(etag)
        except PreconditionFailed as exc:
            exc.message = f"{exc.message}; still stale after {PRECONDITION_ROUNDS} refetches (versions tried: {versions})"
            raise

    def _with_write_only(self, key: str, payload: dict[str, Any]) -> dict[str, Any]:
        masked = [k for k in WRITE_ONLY if payload.get(k) == MASK]
        if not masked:
            return payload
        values = self.write_only_values.get(key, {})
        restored = {k: v for k, v in payload.items() if k not in masked}
        restored.update({k: values[k] for k in masked if k in values})
        return restored

    def _load_write_only(self, operations: list[ClaimedOperation]) -> None:
        keys = [op.identity_key for op in operations
                if isinstance(op.payload, dict) and any(op.payload.get(k) == MASK for k in WRITE_ONLY)]  # fmt: skip
        missing = [key for key in keys if key not in self.write_only_values]
        if missing and self.write_only is not None:
            try:
                found = self.write_only(missing)
            except Exception as exc:  # noqa: BLE001 - without them the operations are sent without their password
                log.warning("write-only values could not be rendered; sent without them", target=self.target,
                            error=str(exc), identities=len(missing))  # fmt: skip
                return
            for values in found.values():
                register_write_only(values)
            self.write_only_values.update(found)

    def _use_patch(self) -> bool:
        return bool(self.capabilities and self.capabilities.patch)

    def _if_match(self, link: LinkState) -> str | None:
        return link.etag if self.capabilities and self.capabilities.etag else None

    def _measure(self, op: ClaimedOperation, outcome: Outcome) -> None:
        # Labelled series looked up once per executor: labels() costs more than inc() and observe().
        series = self._series
        key = (op.kind.value, outcome.status)
        if key not in series:
            series[key] = metrics.OPERATIONS.labels(self.target, *key)
        series[key].inc()
        for call in outcome.calls:
            if call.method:
                if call.method not in series:
                    series[call.method] = metrics.REQUEST_SECONDS.labels(self.target, call.method)
                series[call.method].observe(call.duration_ms / 1000)

    def _log(self, op: ClaimedOperation, outcome: Outcome, started: float) -> None:
        # One line per failure; a success is counted in the cycle's line and in `progress`, and
        # told one by one at debug level only (a JSON line costs about as much as recording the outcome).
        event = self._debug if outcome.status == "succeeded" else log.warning
        event(
            "operation",
            target=self.target,
            identity_key=op.identity_key,
            kind=op.kind.value,
            reason=op.reason.value,
            status=outcome.status,
            attempt=op.attempts,
            http_status=outcome.http_status,
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
            error=outcome.error,
        )


# (target, extension URN) already warned about in this process: one warning each, not one per account.
_WARNED: set[tuple[str, str]] = set()


class UsernameImmutable(PermanentError):
    """The target refuses to change userName (scimType ``mutability``, RFC 7644 §3.12); retrying cannot help."""


def _renames_username(applied: dict[str, Any] | None, payload: dict[str, Any]) -> bool:
    """Whether the write changes userName (unknown applied state: it may)."""
    if "userName" not in payload:
        return False
    return applied is None or applied.get("userName") != payload["userName"]


def judge(engine: Engine, target: str, config: TargetConfig, tally: Tally) -> None:
    """Record a round's calls in the target's health; log and measure a quarantine that starts or ends."""
    transition = observe(engine, target, tally, config.quarantine)
    if transition == "quarantined":
        log.error("target quarantined", target=target, failed=tally.failed, succeeded=tally.succeeded,
                  last_error=tally.last_error)  # fmt: skip
    elif transition == "recovered":
        log.info("target recovered from quarantine", target=target)
    current = state(engine, target)
    unwell = current is not None and (current.quarantined or current.paused)
    metrics.QUARANTINED.labels(target).set(1 if unwell else 0)


def _patch_sender(
    client: ScimClient, endpoint: str, scim_id: str, operations: list[dict[str, Any]]
) -> Callable[[str | None], Awaitable[ScimResult]]:
    return lambda etag: client.patch(endpoint, scim_id, operations, etag=etag)


async def target_answers(client: ScimClient, tally: Tally) -> bool:
    """Whether the target answers a read of ``/ServiceProviderConfig``: the health of the target, not of an operation.

    A failure to answer is counted in the round's ``tally`` like a failed operation.
    """
    try:
        await client.capabilities()
    except (TransientError, AuthError) as exc:
        tally.answered = False
        tally.add(ok=False, unwell=True, auth=isinstance(exc, AuthError), error=str(exc))
        return False
    finally:
        client.history.clear()  # the read is the target's, not any operation's
    tally.answered = True
    return True


def _tried(ops: list[ClaimedOperation]) -> tuple[bool, int, datetime]:
    """How an account's operations rank as a probe: never failed first, then fewest tries, then longest waiting."""
    return (any(op.failed_before for op in ops), max(op.attempts for op in ops), min(op.created_at for op in ops))


def put_off(client: ScimClient, exc: ScimError) -> float:
    """Seconds an operation waits in the queue because the target asked (Retry-After, RFC 9110 §10.2.3).

    The other workers are slowed down for as long as they would wait in place
    (RFC 6585 §4: 429 means the target as a whole is loaded), not for the whole
    wait: the cycle goes on with the other operations.
    """
    assert exc.retry_after is not None
    if exc.status == 429:
        client.limiter.slow_down(client.retry.wait_in_place)
    return exc.retry_after


def _keys_needed(by_key: dict[str, list[ClaimedOperation]]) -> list[str]:
    """The accounts operated on, and the accounts their payloads refer to."""
    keys = set(by_key)
    for ops in by_key.values():
        for op in ops:
            keys |= refs_in(op.payload)
    return list(keys)


def _waves(by_key: dict[str, list[ClaimedOperation]], links: dict[str, LinkState]) -> list[list[str]]:
    """Accounts in the order their references need: a manager's account before their reports'.

    An account waits for those it refers to that are not linked yet but are
    created in this batch; a reference cycle is sent as it is and resolved next cycle.
    """
    waiting = {
        key: ({ref for op in ops for ref in refs_in(op.payload)} | refs_in(links[key].owed if key in links else None))
        & by_key.keys() - links.keys() - {key}
        for key, ops in by_key.items()
    }
    waves: list[list[str]] = []
    done: set[str] = set()
    while waiting:
        ready = [key for key, needs in waiting.items() if needs <= done] or list(waiting)
        waves.append(ready)
        done.update(ready)
        for key in ready:
            del waiting[key]
    return waves


def _active(payload: dict[str, Any]) -> bool:
    """Whether the account is left active by this payload: a leaver's kept create is sent ``active: false``."""
    return payload.get("active") is not False


def _linked(
    link: LinkState,
    result: ScimResult,
    *,
    active: bool,
    applied: dict[str, Any] | None = None,
    applied_hash: str | None = None,
) -> LinkState:
    return LinkState(
        scim_id=link.scim_id,
        active=active,
        etag=result.version or None,
        location=result.location or link.location,
        applied_hash=applied_hash if applied is not None else link.applied_hash,
        applied=applied if applied is not None else link.applied,
        owed=link.owed,
    )


def _outcome(op: ClaimedOperation, status: str, exc: ScimError, *, drop_link: bool = False, note: str | None = None) -> Outcome:
    return Outcome(
        op.id,
        status,
        note=note,
        error=str(exc),
        http_status=exc.status,
        scim_type=exc.scim_type,
        detail=exc.detail,
        drop_link=drop_link,
    )


def _after_conflict(conflict: Conflict, exc: ScimError) -> ScimError:
    """The error of a failed adoption, still saying that the create was answered 409 (RFC 7644 §3.3).

    A transient failure keeps its class (the operation waits for a retry); a
    permanent one is reported as the conflict it started from, with the HTTP
    status, ``scimType`` and detail of the 409.
    """
    said = f"409 on create ({conflict}); adopting the existing account failed: {exc}"
    if isinstance(exc, (TransientError, AuthError)):
        exc.message = said
        Exception.__init__(exc, said)
        return exc
    return Conflict(said, status=conflict.status or 409, scim_type=conflict.scim_type, detail=conflict.detail,
                    request=conflict.request, response_body=conflict.response_body)  # fmt: skip


def tally_outcome(tally: Tally, outcome: Any, *, repeated: bool) -> None:
    """Count an operation's outcome (an account's or a group's) in the round's tally."""
    tally.add(
        ok=outcome.status == "succeeded",
        # Put off because the target asked us to wait: a busy target, not a failing one.
        unwell=(outcome.status == "retry_wait" and outcome.retry_after is None) or outcome.http_status == 401,
        auth=outcome.http_status == 401,
        error=outcome.error,
        repeated=repeated,
    )


def call_records(history: list[Exchange], succeeded: bool, bodies: str) -> list[CallRecord]:
    """An operation's HTTP round trips as the queue keeps them (``bodies``: ``call_bodies`` of the target).

    Under ``failures``, the calls of an operation that succeeded at once keep
    their method, URL, status and timing, not their bodies: what was sent is
    the operation's payload, what came back is the account, readable from the
    target. An operation with a call that failed on the way (a retried 503, a
    412 and what was sent after it) keeps every body, as one that did not
    succeed.
    """
    keep = bodies == "all" or not succeeded or any(x.error is not None or not 200 <= (x.status or 0) < 300
                                                       for x in history)  # fmt: skip
    return [call_record(x, bodies=keep) for x in history]


def call_record(exchange: Exchange, *, bodies: bool = True) -> CallRecord:
    """An HTTP round trip as the queue keeps it: bodies with secret attributes masked (or left out)."""
    error = exchange.error
    return CallRecord(
        started_at=exchange.started_at,
        duration_ms=exchange.duration_ms,
        method=exchange.method,
        url=exchange.url,
        http_status=exchange.status,
        scim_type=error.scim_type if error else None,
        detail=error.detail if error else None,
        error=str(error) if error else None,
        # Write-only attributes are masked by name, and secrets' values, where the body is stored (queue).
        request_body=exchange.request_body if bodies else None,
        response_body=exchange.response_body if bodies else None,
    )



