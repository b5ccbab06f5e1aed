"""Target health: quarantine a target whose calls keep failing, pause one by hand.

A quarantined target is sent nothing but one probe per backoff interval
(doubling to a cap): a read of ``/ServiceProviderConfig``, then, if it answers,
one operation, the one tried least (so a probe is not the same failing
operation each time); its operations stay queued. The first success ends the
quarantine. A probe operation that fails again while the target answers the
read does not double the interval: the next probe is another operation's (a
group operation's too). A paused target is sent nothing until resumed.

The target is judged, not one operation: when the only failures of a round are
operations that had failed before (one bad record whose writes always fail),
the round asks the target for ``/ServiceProviderConfig``; if it answers, those
failures are the operations' own (they wait for their retries, then go to
review) and the round does not count against the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Engine, insert, select, update
from sqlmodel import Field as Column
from sqlmodel import SQLModel

from provisioner.redaction import redact
from provisioner.store import as_utc, utcnow


class QuarantinePolicy(BaseModel):
    """When a target counts as failing, and how often it is probed then."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Within one round of sending: this many calls, this share of them failing (transient or auth).
    min_calls: int = Field(default=10, ge=1)
    failure_share: float = Field(default=0.9, gt=0, le=1)
    # This many consecutive failures stop a round at once (a target that is down
    # must not get every queued operation times every retry).
    consecutive_failures: int = Field(default=20, ge=1)
    # Rounds in a row whose calls were refused as unauthenticated.
    auth_failures: int = Field(default=2, ge=1)
    # Rounds in a row in which every call failed (a target that is down sends few calls per round).
    failing_rounds: int = Field(default=3, ge=1)
    probe_interval: float = Field(default=60.0, gt=0)
    max_probe_interval: float = Field(default=3600.0, gt=0)


class TargetState(SQLModel, table=True):
    """What the engine knows of a target's health, kept across restarts."""

    __tablename__ = "target_state"

    target: str = Column(primary_key=True)
    paused: bool = False
    pause_note: str | None = None
    quarantined: bool = False
    quarantine_reason: str | None = None
    probe_interval: float = 0.0
    next_probe_at: datetime | None = None
    failing_since: datetime | None = None
    last_success_at: datetime | None = None
    last_error: str | None = None
    auth_failures: int = 0
    failed_rounds: int = 0
    updated_at: datetime = Column(default_factory=utcnow)


TABLE = TargetState.__table__


class Admission(StrEnum):
    """What a round of sending may do."""

    SEND = "send"
    PROBE = "probe"
    SKIP = "skip"


@dataclass(slots=True)
class Tally:
    """The calls of one round: how many succeeded, how many failed in a way that says the target is unwell."""

    succeeded: int = 0
    failed: int = 0
    auth_failed: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    # Failures of operations that had not failed before.
    new_failures: int = 0
    # Whether the target answered a read after the round's failures (None: it was not asked).
    answered: bool | None = None

    def add(self, *, ok: bool, unwell: bool, auth: bool, error: str | None, repeated: bool = False) -> None:
        """Count one operation's outcome; ``repeated``: that operation had failed before."""
        if ok:
            self.succeeded += 1
            self.consecutive_failures = 0
        elif unwell:
            self.failed += 1
            self.consecutive_failures += 1
            self.auth_failed += auth
            self.new_failures += not repeated
            self.last_error = error

    @property
    def only_repeated(self) -> bool:
        """Nothing succeeded, and every failure was an operation failing again (never a 401).

        Such a round may be a few bad operations rather than a sick target: ask the
        target a read before counting it (see :func:`observe`).
        """
        return bool(self.failed) and not self.succeeded and not self.new_failures and not self.auth_failed


def state(engine: Engine, target: str) -> TargetState | None:
    """The stored health of a target (None before its first round)."""
    with engine.connect() as conn:
        row = conn.execute(select(TABLE).where(TABLE.c.target == target)).mappings().first()
    return TargetState(**row) if row else None


def all_states(engine: Engine) -> dict[str, TargetState]:
    """Every target's stored health."""
    with engine.connect() as conn:
        return {row["target"]: TargetState(**row) for row in conn.execute(select(TABLE)).mappings()}


def admission(engine: Engine, target: str, now: datetime | None = None) -> Admission:
    """Whether a round may send everything, one probe, or nothing."""
    current = state(engine, target)
    if current is None:
        return Admission.SEND
    if current.paused:
        return Admission.SKIP
    if not current.quarantined:
        return Admission.SEND
    now = now or utcnow()
    due = current.next_probe_at is None or as_utc(current.next_probe_at) <= now
    return Admission.PROBE if due else Admission.SKIP


def observe(
    engine: Engine, target: str, tally: Tally, policy: QuarantinePolicy, now: datetime | None = None
) -> str | None:
    """Record a round's calls; return "quarantined" or "recovered" when the target's state changed."""
    now = now or utcnow()
    current = state(engine, target) or TargetState(target=target)
    changes: dict[str, object] = {"updated_at": now}
    transition = None
    if tally.answered and tally.only_repeated and not current.quarantined:
        # The target answers; what keeps failing are those operations, each on its own way to review.
        _write(engine, target, {**changes, "last_error": tally.last_error})
        return None
    if tally.succeeded:
        changes.update(failing_since=None, last_success_at=now, auth_failures=0, failed_rounds=0)
        if not tally.failed:
            # A round without a failed call: an old 401 is history, not the target's last error.
            changes["last_error"] = None
        if current.quarantined:
            changes.update(quarantined=False, quarantine_reason=None, probe_interval=0.0, next_probe_at=None)
            transition = "recovered"
    if tally.failed:
        changes["last_error"] = tally.last_error
        if not tally.succeeded and current.failing_since is None:
            changes["failing_since"] = now
        auth_rounds = current.auth_failures + 1 if tally.auth_failed and not tally.succeeded else 0
        failed_rounds = current.failed_rounds + 1 if not tally.succeeded else 0
        changes.update(auth_failures=auth_rounds, failed_rounds=failed_rounds)
        reason = _reason(tally, policy, auth_rounds, failed_rounds)
        if current.quarantined and not tally.succeeded and tally.answered and tally.only_repeated:
            # The target answers; the probe failed as it failed before, on its own. The next
            # probe stays due, for another operation (its own retry schedule keeps this one away).
            pass
        elif current.quarantined and not tally.succeeded:
            interval = min(max(current.probe_interval, policy.probe_interval) * 2, policy.max_probe_interval)
            changes.update(probe_interval=interval, next_probe_at=now + timedelta(seconds=interval))
        elif reason and not current.quarantined:
            changes.update(
                quarantined=True,
                quarantine_reason=reason,
                probe_interval=policy.probe_interval,
                next_probe_at=now + timedelta(seconds=policy.probe_interval),
            )
            transition = "quarantined"
    _write(engine, target, changes)
    return transition


def set_paused(engine: Engine, target: str, paused: bool, note: str | None = None) -> None:
    """Pause (send nothing) or resume a target by hand."""
    _write(engine, target, {"paused": paused, "pause_note": note if paused else None, "updated_at": utcnow()})


def _reason(tally: Tally, policy: QuarantinePolicy, auth_rounds: int, failed_rounds: int) -> str | None:
    total = tally.succeeded + tally.failed
    if auth_rounds >= policy.auth_failures:
        return f"authentication refused in {auth_rounds} rounds in a row"
    if failed_rounds >= policy.failing_rounds:
        return f"every call failed in {failed_rounds} rounds in a row"
    if tally.consecutive_failures >= policy.consecutive_failures:
        return f"{tally.consecutive_failures} calls in a row failed"
    if total >= policy.min_calls and tally.failed / total >= policy.failure_share:
        return f"{tally.failed} of {total} calls failed"
    return None


def _write(engine: Engine, target: str, changes: dict[str, object]) -> None:
    # Error text quotes what a target answered, which may echo a credential.
    for column in ("last_error", "quarantine_reason", "pause_note"):
        if isinstance(changes.get(column), str):
            changes[column] = redact(str(changes[column]))
    with engine.begin() as conn:
        if conn.execute(update(TABLE).where(TABLE.c.target == target).values(**changes)).rowcount == 0:
            conn.execute(insert(TABLE).values(target=target, **changes))


