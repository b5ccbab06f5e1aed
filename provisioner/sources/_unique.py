"""One record per key: a key that several records of a snapshot share is none of theirs.

A source may hand out the same key twice (two HR rows for one employee
number, a view that joins one row too many). Which of them is the person is a
guess, and a guess that can flip from one cycle to the next (rows reordered)
moves an account between two people. So every record with a shared key becomes
a :class:`BadRecord` naming the key — each with its own ``file:line`` — and
goes to review; the records with a key of their own go on.

A record can only be known to be unique once the whole snapshot is read, so the
snapshot is read once into a spool — an anonymous temporary file (mode 0600,
already unlinked: nothing of it outlives the process) — while only the keys stay
in memory; the records are then streamed back from it. Every kind of source is
read once per pass: a file replaced, a table changed or an HR system edited
meanwhile cannot make the two passes disagree.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO

import orjson

from provisioner.errors import SourceError
from provisioner.sources._records import BadRecord, IdentityRecord, record_text

_RECORD, _BAD = 0, 1


def unique_keys(records: Iterable[IdentityRecord | BadRecord]) -> Iterator[IdentityRecord | BadRecord]:
    """The records in source order, each record of a key several of them share turned into a BadRecord.

    A BadRecord of the source that names a key counts as one of that key's
    records (the key's other records are not used either) and is passed on as it
    is. Each duplicate's ``text`` is a digest of all the records of its key, so
    that a resolved rejection comes back when any of them changes.
    """
    # Where each key's first record starts in the spool; the records of a shared key, all of them.
    first: dict[str, int] = {}
    shared: dict[str, list[int]] = {}
    try:
        spool = tempfile.TemporaryFile()
    except OSError as exc:
        raise _spool_error(exc) from None
    with spool:
        offset = 0
        for record in records:
            if isinstance(record, IdentityRecord):
                line = orjson.dumps((_RECORD, record.key, record.origin, record.attributes))
            else:
                line = orjson.dumps((_BAD, record.key, record.origin, record.reason, record.text))
            try:
                spool.write(line + b"\n")
            except OSError as exc:  # a full disk: no partial snapshot is ever planned
                raise _spool_error(exc) from None
            if record.key:
                at = first.setdefault(record.key, offset)
                if at != offset:
                    shared.setdefault(record.key, [at]).append(offset)
            offset += len(line) + 1
        first.clear()
        # Duplicates are rare: their digests are made from the spool, not for every record on the way in.
        together = {key: _digest(spool, offsets) for key, offsets in shared.items()}
        spool.seek(0)
        for line in spool:
            item = orjson.loads(line)
            if item[0] == _BAD:
                yield BadRecord(item[1], item[3], item[2], item[4])
            elif item[1] in together:
                yield BadRecord(item[1], _duplicate(item[1], len(shared[item[1]])), item[2], together[item[1]])
            else:
                yield IdentityRecord(item[1], item[3], item[2])


def _digest(spool: IO[bytes], offsets: list[int]) -> str:
    """One digest of the records at these spool offsets, whatever their order or their lines."""
    digests = []
    for offset in offsets:
        spool.seek(offset)
        item = orjson.loads(spool.readline())
        text = record_text(item[3]) if item[0] == _RECORD else (item[4] or item[3])
        digests.append(hashlib.blake2b(text.encode(), digest_size=16).digest())
    return hashlib.blake2b(b"".join(sorted(digests)), digest_size=16).hexdigest()


def _spool_error(exc: OSError) -> SourceError:
    return SourceError(
        f"cannot keep the source's snapshot in a temporary file in {tempfile.gettempdir()} "
        f"({exc.strerror or exc}); set TMPDIR to a writable folder with room for it"
    )


def _duplicate(key: str, count: int) -> str:
    # The other records' positions are left out on purpose: the message is compared from one
    # cycle to the next (queue.rejection_cause), and rows above them come and go.
    return f"duplicate key '{key}': {count} records of the source have it; none is used until only one does"
