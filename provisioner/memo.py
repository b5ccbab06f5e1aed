"""The render memo in the state database: what each identity's record last rendered to, per target.

``planner.RenderMemo`` says which records need no render; this module loads it
from the ``rendered_record`` table and saves what a cycle remembered, so that
a one-shot ``sync`` or ``plan`` skips unchanged records as a long-running
daemon does.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

import orjson
from sqlalchemy import Engine, delete, select

from provisioner.payload import loads, payload_hash, resolve_refs, unchosen, without
from provisioner.planner import Kind, RenderMemo
from provisioner.queue import LINK, OP
from provisioner.redaction import has_write_only
from provisioner.store import RenderedRecord, chunks, driver_rows, upsert

MEMO = RenderedRecord.__table__
# Rows written per statement: a 100,000-record first cycle never builds all its rows at once.
CHUNK = 1000


def load_memo(engine: Engine, target: str) -> RenderMemo:
    """Every remembered render of a target (references left as stored JSON until a record needs them)."""
    columns = (MEMO.c.identity_key, MEMO.c.digest, MEMO.c.refs, MEMO.c.payload_hash, MEMO.c.match_value)
    with engine.connect() as conn:
        rows = driver_rows(conn.execute(select(*columns).where(MEMO.c.target == target)))
    return RenderMemo({row[0]: row[1:] for row in rows})


def save_memo(engine: Engine, target: str, memo: RenderMemo, present: Collection[str] | None = None) -> int:
    """Write the entries remembered since the memo was loaded; return how many.

    With ``present`` (every identity key the source had), entries of identities
    no longer in the source are deleted, from the database and the memo.
    """
    keys = sorted(memo.changed)
    gone = sorted(memo.entries.keys() - present) if present is not None else []
    if not keys and not gone:
        return 0
    statement = upsert(MEMO, ("target", "identity_key"), ("digest", "payload_hash", "match_value", "refs"),
                       engine.dialect.name)  # fmt: skip
    with engine.begin() as conn:
        for chunk in chunks(keys, CHUNK):
            conn.execute(statement, [_row(target, key, memo.entries[key]) for key in chunk])
        for chunk in chunks(gone, CHUNK):
            conn.execute(delete(MEMO).where(MEMO.c.target == target, MEMO.c.identity_key.in_(chunk)))
    for key in gone:
        del memo.entries[key]
    memo.changed.clear()
    return len(keys)


def complete_entries(
    engine: Engine, target: str, run_id: str, memo: RenderMemo, create_only: Iterable[tuple[str, ...]]
) -> int:
    """Complete the entries of records planned with a reference to an account created in the same cycle.

    Such a record was rendered before its manager had an id, and sent once the
    manager had one: its entry's hash is not what the account got, and the next
    cycle would render it again. Its operation's payload (this run's, with the
    reference still unresolved) is resolved with the ids the links hold now and
    hashed: that is what rendering the same record through the same mapping would
    give now, so the entry is rewritten with it. Entries whose resolved
    references changed id since, or whose payload holds a write-only value (the
    queue keeps it masked), are left to the next render. Returns how many were
    completed; call :func:`save_memo` after.
    """
    keys = sorted(memo.unresolved)
    memo.unresolved.clear()
    if not keys:
        return 0
    create_only = frozenset(create_only)
    # The ids of the identities these entries refer to, not of every link: the payloads name no others.
    named: set[str] = set()
    for key in keys:
        entry = memo.entries.get(key)
        if entry is not None and isinstance(entry[1], tuple):
            named.update(ref for ref, _ in entry[1])
    with engine.connect() as conn:
        ids: dict[str, str] = {}
        for chunk in chunks(sorted(named), CHUNK):
            query = select(LINK.c.identity_key, LINK.c.scim_id).where(
                LINK.c.target == target, LINK.c.identity_key.in_(chunk)
            )
            ids.update(conn.execute(query).all())
        completed = 0
        for chunk in chunks(keys, CHUNK):
            query = select(OP.c.identity_key, OP.c.payload).where(
                OP.c.target == target, OP.c.run_id == run_id, OP.c.identity_key.in_(chunk), OP.c.status == "succeeded",
                OP.c.kind.in_((Kind.CREATE.value, Kind.UPDATE.value, Kind.ENABLE.value)),
            )  # fmt: skip
            for key, text in conn.execute(query):
                entry = memo.entries.get(key)
                if entry is None or text is None or not isinstance(entry[1], tuple):
                    continue
                digest, refs, _hash, match = entry
                if any(scim_id is not None and ids.get(ref) != scim_id for ref, scim_id in refs):
                    continue  # a reference resolved at planning points elsewhere now: render again
                # As the executor hashed what it applied: a unique_username() choice is no change.
                sendable = without(unchosen(resolve_refs(loads(text), ids.get)[0]), create_only)
                if has_write_only(sendable):
                    continue
                memo.entries[key] = (digest, tuple((ref, ids.get(ref)) for ref, _ in refs), payload_hash(sendable), match)
                memo.changed.add(key)
                completed += 1
    return completed


def _row(target: str, key: str, entry: Any) -> dict[str, Any]:
    digest, refs, desired, match = entry
    if refs is not None and not isinstance(refs, str):
        refs = orjson.dumps(refs).decode()
    return {"target": target, "identity_key": key, "digest": digest, "payload_hash": desired,
            "match_value": match, "refs": refs}  # fmt: skip
