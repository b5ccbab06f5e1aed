"""Delta reads of a SCIM source: a cycle reads and plans only the users changed since the last one.

A SCIM source with ``delta: true`` is read, most cycles, with
``filter=meta.lastModified gt "<watermark>"`` (RFC 7644 §3.4.2.2; ANDed in
parentheses with the source's own ``filter``). The records it returns are
planned the way ``provisioner sync --only`` plans its keys
(:func:`provisioner.sync.plan_only`): their references resolve against
every account link, and nobody the read left out is a leaver. A changed record that says so
(``active: false``, the mapping's ``leaver_when``) is one.

The watermark is the highest ``meta.lastModified`` (RFC 7643 §3.1) in the
HR system's answers, never this host's clock (the two clocks differ), less
``delta_overlap`` (60 s) for changes stamped in the same instant or by a
clock a little behind: those records are read twice, which only plans them
twice (an unchanged one plans nothing). It is saved per target and source
(:class:`provisioner.store.SourceWatermark`) only once the cycle's plan is
queued: a cycle that crashes before reads the same changes again, none is
skipped.

A user deleted from the HR system is in no delta: only a full read (the
whole population, through the source's own ``filter``) finds them gone and
makes them a leaver, behind the deletion brake as always. A full read is
made when there is no watermark yet (the first cycle, or a server whose
resources carry no ``meta.lastModified``) and when the last one was queued
``full_every`` (``1d``) ago or more.

An HR system that ignores the filter and answers with everyone is still
right: every record is planned against its own link, and the cycle plans
what a full read would, less its leavers by absence.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select

from provisioner.config import ScimSourceConfig, parse_duration
from provisioner.sources import BadRecord, IdentityRecord
from provisioner.store import SourceWatermark, as_utc, upsert, utcnow

_TABLE = SourceWatermark.__table__  # type: ignore[attr-defined]


@dataclass(slots=True)
class DeltaRead:
    """One cycle's read of a delta source: full or since a watermark, and the highest lastModified seen."""

    target: str
    source_name: str
    source: ScimSourceConfig
    # The lower bound sent in the filter; None: a full read.
    since: datetime | None
    # The watermark saved by the last cycle.
    previous: datetime | None
    seen: datetime | None = None

    @property
    def full(self) -> bool:
        """Whether this cycle reads the whole population."""
        return self.since is None

    def config(self) -> ScimSourceConfig:
        """The source as this cycle reads it: its filter narrowed to changes since the watermark."""
        wanted: dict[str, Any] = {}
        if self.source.attributes is not None and not any(a.split(".")[0] == "meta" for a in self.source.attributes):
            wanted["attributes"] = [*self.source.attributes, "meta.lastModified"]
        if self.since is not None:
            changed = f'meta.lastModified gt "{_text(self.since)}"'
            wanted["filter"] = f"({self.source.filter}) and ({changed})" if self.source.filter else changed
        return self.source.model_copy(update=wanted) if wanted else self.source

    def watch(self, records: Iterable[IdentityRecord | BadRecord]) -> Iterator[IdentityRecord | BadRecord]:
        """The records, passed on unchanged, noting the highest ``meta.lastModified`` among them."""
        for record in records:
            if isinstance(record, IdentityRecord):
                stamp = last_modified(record.attributes)
                if stamp is not None and (self.seen is None or stamp > self.seen):
                    self.seen = stamp
            yield record

    def save(self, engine: Engine) -> None:
        """Record where the reads stand; call only once this cycle's plan is queued.

        A full read's highest stamp replaces the watermark (it is the whole truth now);
        a delta's only moves it forward.
        """
        mark = self.seen if self.full else max(filter(None, (self.seen, self.previous)), default=None)
        row = {"target": self.target, "source": self.source_name, "watermark": _text(mark) if mark else None,
               "full_read_at": utcnow() if self.full else None}  # fmt: skip
        # A delta keeps the time of the last full read (none yet: a first row without one).
        updated = ("watermark", "full_read_at") if self.full else ("watermark",)
        with engine.begin() as conn:
            conn.execute(upsert(_TABLE, ("target", "source"), updated, engine.dialect.name), row)


def start_read(engine: Engine, target: str, source_name: str, source: ScimSourceConfig) -> DeltaRead:
    """This cycle's read of ``source`` for ``target``: full (no watermark, or ``full_every`` passed) or a delta."""
    with engine.connect() as conn:
        query = select(_TABLE.c.watermark, _TABLE.c.full_read_at).where(*_where(target, source_name))
        row = conn.execute(query).first()
    previous = _parse(row[0]) if row and row[0] else None
    full_read_at = as_utc(row[1]) if row and row[1] else None
    since = None
    if previous is not None and full_read_at is not None:
        if utcnow() - full_read_at < timedelta(seconds=parse_duration(source.full_every)):
            since = previous - timedelta(seconds=parse_duration(source.delta_overlap))
    return DeltaRead(target, source_name, source, since, previous)


def last_modified(attributes: dict[str, Any]) -> datetime | None:
    """A record's ``meta.lastModified`` (RFC 7643 §3.1, an xsd:dateTime) in UTC; None when absent or not one."""
    meta = attributes.get("meta")
    value = meta.get("lastModified") if isinstance(meta, dict) else None
    return _parse(value) if isinstance(value, str) else None


def _parse(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    # An xsd:dateTime without an offset is read as UTC; one with an offset is turned to UTC, as stored.
    return as_utc(moment).astimezone(UTC)


def _text(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _where(target: str, source_name: str) -> tuple[Any, Any]:
    return _TABLE.c.target == target, _TABLE.c.source == source_name
