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


def unique_keys(
    records: Iterable[IdentityRecord | BadRecord], key_name: str = "key", unit: str | None = "line"
) -> Iterator[IdentityRecord | BadRecord]:
    """The records in source order, each record of a key several of them share turned into a BadRecord.

    A BadRecord of the source that names a key counts as one of that key's
    records (the key's other records are not used either) and is passed on as it
    is. Each duplicate's ``text`` is a digest of all the records of its key, so
    that a resolved rejection comes back when any of them changes. Its reason
    names the key's column (``key_name``) and where the others are:
    ``employee_id 'E1001' appears 2 times (also at line 53); none of them is used``,
    ``unit`` being what a ``file:N`` origin counts (``line``, ``row``; None: the
    others' whole origins are named).
    """
    # Where each key's first record starts in the spool; the records of a shared key, all of them.
    first: dict[str, int] = {}
    shared: dict[str, list[int]] = {}
    origins: dict[int, str] = {}
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
        # Duplicates are rare: their digests and origins are read from the spool, not kept for every record.
        together = {key: _digest(spool, offsets, origins) for key, offsets in shared.items()}
        spool.seek(0)
        for line in spool:
            item = orjson.loads(line)
            if item[0] == _BAD:
                yield BadRecord(item[1], item[3], item[2], item[4])
            elif item[1] in together:
                offsets = shared[item[1]]
                others = [origins[at] for at in offsets if origins[at] != item[2]]
                reason = _duplicate(key_name, item[1], len(offsets), item[2], others, unit)
                yield BadRecord(item[1], reason, item[2], together[item[1]])
            else:
                yield IdentityRecord(item[1], item[3], item[2])


def _digest(spool: IO[bytes], offsets: list[int], origins: dict[int, str]) -> str:
    """One digest of the records at these spool offsets, whatever their order or their lines.

    Their origins are put in ``origins`` (offset -> origin) on the way.
    """
    digests = []
    for offset in offsets:
        spool.seek(offset)
        item = orjson.loads(spool.readline())
        origins[offset] = item[2]
        text = record_text(item[3]) if item[0] == _RECORD else (item[4] or item[3])
        digests.append(hashlib.blake2b(text.encode(), digest_size=16).digest())
    return hashlib.blake2b(b"".join(sorted(digests)), digest_size=16).hexdigest()


def _spool_error(exc: OSError) -> SourceError:
    return SourceError(
        f"cannot keep the source's snapshot in a temporary file in {tempfile.gettempdir()} "
        f"({exc.strerror or exc}); set TMPDIR to a writable folder with room for it"
    )


# Where the other records of a shared key are: this many named, the rest counted.
SHOWN_OTHERS = 5


def _duplicate(key_name: str, key: str, count: int, origin: str, others: list[str], unit: str | None) -> str:
    """``employee_id 'E1' appears 3 times (also at lines 7, 9); none of them is used``.

    The others' positions are in parentheses on purpose: rows above them come
    and go, and ``queue.rejection_cause`` leaves them out when it compares a
    rejection with the last cycle's, as it does the leading ``file:line``.
    At most :data:`SHOWN_OTHERS` are named: a key a thousand rows share
    (a placeholder value) makes a thousand messages, not a million positions.
    """
    shown = others[:SHOWN_OTHERS]
    more = f" and {len(others) - len(shown)} more" if len(others) > len(shown) else ""
    where = origin.rpartition(":")[0]
    numbers = [o.rpartition(":")[2] for o in shown]
    if unit and where and all(o.rpartition(":")[0] == where for o in shown) and all(n.isdigit() for n in numbers):
        at = f"{unit}{'s' if len(others) > 1 else ''} {', '.join(numbers)}{more}"
    else:
        at = ", ".join(shown) + more
    also = f" (also at {at})" if others else ""
    return f"{key_name} '{key}' appears {count} times{also}; none of them is used"
