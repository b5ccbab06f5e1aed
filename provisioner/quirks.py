"""A target's quirks: declared in its config, learned from its answers, kept across restarts.

One :class:`connectors.Quirks` per target and round of sending, shared by all
its clients and executors. It starts from the RFC defaults, then what was
learned earlier (table ``target_quirk``), then what the config declares
(``quirks:``; the operator's word wins at start). Whatever is learned while
sending (a 501 for a PATCH form, a read-back that contradicts a 200) is
logged once and written to ``target_quirk`` with its reason, so that the next
start does not pay for the same lesson and ``provisioner status`` shows it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import Any

import orjson
import structlog
from sqlalchemy import Engine, func, select

from connectors import Quirks
from provisioner.config import TargetConfig
from provisioner.store import Operation, TargetQuirk, as_utc, upsert, utcnow

log = structlog.get_logger("provisioner.quirks")

QUIRK = TargetQuirk.__table__
OP = Operation.__table__
NAMES = frozenset(f.name for f in fields(Quirks) if f.name != "on_learn")


@dataclass(frozen=True, slots=True)
class Learned:
    """One quirk learned from a target's answers."""

    target: str
    name: str
    value: Any
    reason: str
    learned_at: datetime


def learned(engine: Engine, target: str | None = None) -> list[Learned]:
    """Quirks learned per target (all targets when ``target`` is None), by target and name."""
    query = select(QUIRK).order_by(QUIRK.c.target, QUIRK.c.name)
    if target is not None:
        query = query.where(QUIRK.c.target == target)
    with engine.connect() as conn:
        return [
            Learned(r["target"], r["name"], orjson.loads(r["value"]), r["reason"], as_utc(r["learned_at"]))
            for r in conn.execute(query).mappings()
        ]


def remember(engine: Engine, target: str, name: str, value: Any, reason: str) -> None:
    """Write (or overwrite) one learned quirk of a target."""
    now = utcnow()
    row = {"target": target, "name": name, "value": orjson.dumps(value).decode(), "reason": reason, "learned_at": now}
    with engine.begin() as conn:
        conn.execute(upsert(QUIRK, ("target", "name"), ("value", "reason", "learned_at"), engine.dialect.name), row)


def load_quirks(engine: Engine, target: str, config: TargetConfig) -> Quirks:
    """The target's quirks for this round: defaults, then learned, then declared; new lessons are persisted.

    A learned value that is no longer a quirk, or not one of its values (an older
    version's), is ignored with a warning.
    """
    quirks = Quirks()
    # The older option for the same thing, a declaration too, but one a lesson may overrule.
    quirks.member_removal = config.group_member_removal
    for item in learned(engine, target):
        if item.name not in NAMES:
            continue
        try:
            quirks = replace(quirks, **{item.name: item.value})
        except ValueError as exc:
            log.warning("learned quirk ignored", target=target, quirk=item.name, error=str(exc))
    quirks = replace(quirks, **config.quirks.declared())

    def on_learn(name: str, value: Any, reason: str) -> None:
        log.warning("target quirk learned", target=target, quirk=name, value=value, reason=reason)
        remember(engine, target, name, value, reason)

    quirks.on_learn = on_learn
    return quirks


def describe(item: Learned) -> str:
    """One line for ``provisioner status``: the option to paste, and why it was learned."""
    value = orjson.dumps(item.value).decode()
    return f"learned quirks.{item.name}: {value} ({item.reason}; {item.learned_at:%Y-%m-%d %H:%M} UTC)"


# The note an operation carries when the target accepted a write without storing all of it.
DROPPED_NOTE = "target dropped"


def unstored_writes(engine: Engine, *, since: datetime | None = None) -> dict[str, int]:
    """Per target, operations succeeded whose write the target did not fully store (their note says what).

    ``since``: only operations finished at or after it (UTC).
    """
    query = (
        select(OP.c.target, func.count())
        .where(OP.c.status == "succeeded", OP.c.note.like(f"%{DROPPED_NOTE}%"))
        .group_by(OP.c.target)
    )
    if since is not None:
        query = query.where(OP.c.finished_at >= since)
    with engine.connect() as conn:
        return {target: count for target, count in conn.execute(query)}
