"""A target's health: one definition, read from the queue and the target's state.

Everything that says whether a target is well reads it from here: the exit
code of ``provisioner sync``, ``provisioner status`` (and ``--json``),
``/healthz``, the ``provisioner_target_ok`` metric and the alert facts.

A target is ``ok`` when nothing of it waits for anyone: no open failed
operation (rejected records included — a row the source cannot give, a key
several records share, a record the mapping cannot render: each is one open
failed row per identity and reason), no operation waiting for a retry, nothing
held by a brake (leavers, group member removals), its last cycle neither
refused nor cut short by a stop, and it is neither quarantined nor paused.
Otherwise its status is the most urgent of these, in this order::

    quarantined > paused > refused > held > failed > waiting > ok

A cycle interrupted by a stop (SIGTERM, Ctrl-C; run status ``interrupted``)
is not a safety stop: the operator restarted the process. Its work was left
undone, though, so the target ``waits`` until a later cycle completes. So
does a cycle still ``running`` in the run table whose process is gone
(``kill -9``; read as ``abandoned``; SQLite state only, see
:func:`provisioner.lock.holder_gone`).

The exit code of ``sync`` and ``status`` (:func:`exit_code`) reads the same
health: 5 for a safety stop, 4 for anything else not ok, 0 when all are ok.

Work from earlier cycles counts as much as this cycle's: a row left in
``retry_wait`` by a 401 an hour ago still waits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Engine, and_, case, func, select

from provisioner.lifecycle import EXIT_NOT_OK, EXIT_OK, EXIT_SAFETY_STOP
from provisioner.lock import holder_gone
from provisioner.quarantine import TargetState, all_states
from provisioner.store import Operation, Run, as_utc

Status = Literal["ok", "waiting", "failed", "held", "refused", "paused", "quarantined"]
# Most urgent first.
SEVERITY: tuple[Status, ...] = ("quarantined", "paused", "refused", "held", "failed", "waiting", "ok")

OP = Operation.__table__
RUN = Run.__table__
# Account operations the mapping could not render: recorded failed, with no payload to send.
_RENDERED_KINDS = ("create", "update", "enable")
# Run statuses that stop a target short of its work: a refused cycle (a safety stop) and a crashed one.
_REFUSED_RUNS = ("refused", "error")
# The note of a run whose process ended without finishing it (run status ``abandoned``, never stored).
ABANDONED = "its process ended before the cycle finished (killed or crashed); the next start picks up its work"


@dataclass(frozen=True, slots=True)
class TargetHealth:
    """How one target is, and why.

    Counts are operations in the queue now (any cycle's): ``failed`` open for
    review (of which ``rejected`` are rejected records: unreadable, a shared key, unrenderable),
    ``retry_wait`` waiting for a retry, ``pending`` queued to send, ``held``
    held by a brake: ``held_kinds`` says which (``disable``/``delete``: leavers
    held by the deletion brake; ``group_members``/``group_delete``: group member
    removals held by the member brake).
    """

    target: str
    status: Status
    failed: int = 0
    rejected: int = 0
    retry_wait: int = 0
    pending: int = 0
    held: int = 0
    held_kinds: dict[str, int] = field(default_factory=dict)
    paused: bool = False
    quarantined: bool = False
    quarantine_reason: str | None = None
    # The last failed call, until a later round succeeds (secrets masked when stored).
    last_error: str | None = None
    last_run_id: str | None = None
    last_run_status: str | None = None
    last_run_started_at: datetime | None = None
    last_run_error: str | None = None
    # One short phrase per reason the target is not ok, most urgent first.
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """Nothing of this target waits for anyone."""
        return self.status == "ok"

    @property
    def waiting(self) -> int:
        """Operations that still have to happen or be reviewed: failed, retry_wait and held."""
        return self.failed + self.retry_wait + self.held

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: timestamps as ISO 8601 with their UTC offset."""
        data = asdict(self)
        data["ok"] = self.ok
        data["problems"] = list(self.problems)
        if self.last_run_started_at is not None:
            data["last_run_started_at"] = as_utc(self.last_run_started_at).isoformat()
        return data


def assess(
    target: str,
    counts: dict[str, int],
    rejected: int = 0,
    state: TargetState | None = None,
    last_run: dict[str, Any] | None = None,
    held_kinds: dict[str, int] | None = None,
) -> TargetHealth:
    """The health of one target from what was read about it; purely computational.

    ``counts``: open operations by status; ``rejected``: how many of the failed
    ones are rejected records; ``state``: the target_state row;
    ``last_run``: the latest row of the ``run`` table; ``held_kinds``: the
    held operations by kind (``disable``, ``group_members``, …).
    """
    run = last_run or {}
    failed, retry_wait, held = counts.get("failed", 0), counts.get("retry_wait", 0), counts.get("held", 0)
    paused = bool(state and state.paused)
    quarantined = bool(state and state.quarantined)
    refused = run.get("status") in _REFUSED_RUNS
    interrupted = run.get("status") in ("interrupted", "abandoned")
    problems: list[tuple[Status, str]] = []
    if quarantined:
        problems.append(("quarantined", f"quarantined: {state.quarantine_reason or 'calls keep failing'}"))  # type: ignore[union-attr]
    if paused:
        problems.append(("paused", f"paused: {state.pause_note or 'by an operator'}"))  # type: ignore[union-attr]
    if refused:
        problems.append(("refused", f"last cycle {run['status']}: {run.get('error') or 'see the log'}"))
    if held:
        problems.append(("held", f"{held_phrase(held_kinds or {})} awaiting approval: "
                                 "provisioner plan --held, then approve RUN_ID or reject RUN_ID"))
    if failed:
        of_which = f" ({rejected} of them rejected records)" if rejected else ""
        problems.append(("failed", f"{failed} failed operations wait for review{of_which}"))
    if retry_wait:
        problems.append(("waiting", f"{retry_wait} operations wait for a retry"))
    if interrupted:
        problems.append(("waiting", f"last cycle {run['status']}: {run.get('error') or 'stopped before it finished'}"))
    status: Status = min((s for s, _ in problems), key=SEVERITY.index, default="ok")
    return TargetHealth(
        target=target,
        status=status,
        failed=failed,
        rejected=rejected,
        retry_wait=retry_wait,
        pending=counts.get("pending", 0),
        held=held,
        held_kinds=dict(held_kinds or {}),
        paused=paused,
        quarantined=quarantined,
        quarantine_reason=state.quarantine_reason if state else None,
        last_error=state.last_error if state else None,
        last_run_id=run.get("id"),
        last_run_status=run.get("status"),
        last_run_started_at=run.get("started_at"),
        last_run_error=run.get("error"),
        problems=tuple(text for _, text in problems),
    )


def target_health(
    engine: Engine,
    names: list[str],
    *,
    states: dict[str, TargetState] | None = None,
    runs: dict[str, dict[str, Any]] | None = None,
) -> dict[str, TargetHealth]:
    """The health of these targets, read in four queries whatever their number.

    ``states`` (:func:`provisioner.quarantine.all_states`) and ``runs`` (:func:`last_runs`):
    given by a caller that has read them already, they are not read again.
    """
    counts, rejected, held = _open_counts(engine)
    states = all_states(engine) if states is None else states
    runs = last_runs(engine) if runs is None else runs
    if any(run["status"] == "running" for run in runs.values()) and holder_gone(str(engine.url)):
        # The process running those cycles is gone (kill -9, a crash): they run no more.
        runs = {name: _abandoned(run) if run["status"] == "running" else run for name, run in runs.items()}
    return {
        name: assess(name, counts.get(name, {}), rejected.get(name, 0), states.get(name), runs.get(name),
                     held.get(name, {}))  # fmt: skip
        for name in names
    }


# What a held row of each kind is, said to an operator (singular, plural).
_HELD_NAMES = {
    "disable": ("leaver disable", "leaver disables"),
    "delete": ("leaver delete", "leaver deletes"),
    "group_members": ("group member removal", "group member removals"),
    "group_delete": ("group delete", "group deletes"),
}


def held_phrase(kinds: dict[str, int]) -> str:
    """What is held, by kind: ``'1 leaver disable, 2 group member removals'``.

    Accounts deprovisioned (held by the deletion brake) and group member
    removals (held by the member brake) are counted apart: they are different
    decisions for an operator.
    """
    order = list(_HELD_NAMES) + sorted(k for k in kinds if k not in _HELD_NAMES)
    parts = []
    for kind in order:
        count = kinds.get(kind, 0)
        if count:
            one, many = _HELD_NAMES.get(kind, (f"{kind} operation", f"{kind} operations"))
            parts.append(f"{count} {one if count == 1 else many}")
    return ", ".join(parts) or "nothing"


def exit_code(healths: dict[str, TargetHealth]) -> int:
    """The exit code of ``sync`` and ``status`` alike: 5, 4 or 0 (README, "Exit codes").

    5 (a safety stop) when a target's last cycle was refused or a brake holds
    anything of it (leavers, group member removals), whatever else it is; 4 when any target is
    not ok otherwise (failed, waiting, interrupted, crashed, paused,
    quarantined); 0 when every target is ok.
    """
    if any(h.held or h.last_run_status == "refused" for h in healths.values()):
        return EXIT_SAFETY_STOP
    if any(not h.ok for h in healths.values()):
        return EXIT_NOT_OK
    return EXIT_OK


def _abandoned(run: dict[str, Any]) -> dict[str, Any]:
    return {**run, "status": "abandoned", "error": ABANDONED}


def overall(healths: dict[str, TargetHealth]) -> Status:
    """The most urgent status of several targets (``ok`` when there are none)."""
    return min((h.status for h in healths.values()), key=SEVERITY.index, default="ok")


def _open_counts(engine: Engine) -> tuple[dict[str, dict[str, int]], dict[str, int], dict[str, dict[str, int]]]:
    """Open operations by target and status, rejected records by target, held ones by target and kind.

    One query: the held count is the sum of the held kinds, never a second count that could differ.
    """
    is_rejected = and_(OP.c.status == "failed", OP.c.payload.is_(None), OP.c.kind.in_(_RENDERED_KINDS))
    held_kind = case((OP.c.status == "held", OP.c.kind), else_=None)
    query = (
        select(OP.c.target, OP.c.status, held_kind, func.count(), func.sum(case((is_rejected, 1), else_=0)))
        .where(OP.c.status.in_(("pending", "running", "retry_wait", "failed", "held")))
        .group_by(OP.c.target, OP.c.status, held_kind)
    )
    counts: dict[str, dict[str, int]] = {}
    rejected: dict[str, int] = {}
    held: dict[str, dict[str, int]] = {}
    with engine.connect() as conn:
        for target, status, kind, count, rejects in conn.execute(query):
            by_status = counts.setdefault(target, {})
            by_status[status] = by_status.get(status, 0) + int(count)
            rejected[target] = rejected.get(target, 0) + int(rejects or 0)
            if kind is not None:
                held.setdefault(target, {})[kind] = int(count)
    return counts, rejected, held


def last_runs(engine: Engine) -> dict[str, dict[str, Any]]:
    """The latest run of every target, as a row of ``run``: target name -> column -> value."""
    latest = select(RUN.c.target, func.max(RUN.c.started_at).label("started")).group_by(RUN.c.target).subquery()
    query = select(RUN).join(latest, (RUN.c.target == latest.c.target) & (RUN.c.started_at == latest.c.started))
    with engine.connect() as conn:
        return {row["target"]: dict(row) for row in conn.execute(query).mappings()}


def cycle_succeeded(report: Any) -> bool:
    """Whether a cycle counts as successful (``provisioner_last_successful_cycle_timestamp_seconds``).

    A successful cycle read its source, wrote its plan to the queue and found
    the target taking work: none of the operations it sent waits for a retry
    (a 5xx, a timeout, a 401), and none was left unsent because the target is
    paused or quarantined or stopped answering. Operations that failed alone
    — a rejected record, a 400 on one account — do not make it
    unsuccessful: they wait in the review queue and make the target's health
    ``failed``, which is a different question. A cycle stopped before it
    finished (run status ``interrupted``: stopped during planning or between
    pages) returns its report but never counts: it left work queued. A
    refused or crashed cycle raises before it has a report, and never counts.
    ``report`` is a ``provisioner.sync.TargetReport``.
    """
    return report.status != "interrupted" and report.statuses["retry_wait"] == 0 and report.skipped == 0
