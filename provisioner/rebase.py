"""After a 412: what is left to send, against the resource as the target holds it now.

A 412 (RFC 7644 §3.14, RFC 9110 §13.1.1) says someone changed the resource
since we read its version. Re-sending our own small change on the new version
would keep their change on attributes we own, while we record our desired state
as applied: the account would stay wrong and the next cycle would see nothing to
do. So the engine reads the resource again and sends the whole difference
between the desired state and that fresh resource, on the attributes the
mapping owns (SailPoint's connector does the same: its 412 retry refetches the
resource to work on the latest version).

Pure functions; the executors do the reading and sending.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from provisioner.payload import flatten


def rebase_operations(
    desired: Mapping[str, Any], fresh: Mapping[str, Any], owned: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """PATCH operations (RFC 7644 §3.5.2) that make ``fresh`` hold ``desired``.

    ``desired``: the payload as it must be (with ``active``); ``fresh``: the
    resource just read; ``owned``: further attribute paths the mapping owns
    (as :func:`provisioner.payload.flatten` names them, e.g. those of the payload
    last applied) that the desired payload leaves empty: they are removed if the
    target holds a value. Attributes neither desired nor owned are someone
    else's and left alone. A desired value is held when the fresh one has at
    least what it asks for: sub-attributes the target adds (``$ref``,
    ``primary``) and the order of a multi-valued attribute do not count.
    Returns ``[]`` when nothing is left to send.
    """
    want = flatten(desired)
    have = flatten(fresh)
    operations: list[dict[str, Any]] = []
    for path in sorted(want.keys() | set(owned)):
        if path not in want:
            if have.get(path) not in (None, "", [], {}):
                operations.append({"op": "remove", "path": path})
        elif not holds(have.get(path), want[path]):
            operations.append({"op": "replace", "path": path, "value": want[path]})
    return operations


def holds(have: Any, want: Any) -> bool:
    """Whether a value read from the target holds what we want of it (see :func:`rebase_operations`)."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(holds(have.get(k), v) for k, v in want.items())
    if isinstance(want, list):
        if not isinstance(have, list) or len(have) != len(want):
            return False
        left = list(have)
        for item in want:
            match = next((i for i, candidate in enumerate(left) if holds(candidate, item)), None)
            if match is None:
                return False
            left.pop(match)
        return True
    return have == want
