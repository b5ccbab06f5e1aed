"""How one target deviates from RFC 7643/7644, declared in its config or learned from its answers.

One :class:`Quirks` per target, shared by every :class:`~connectors.ScimClient`
of that target (like its limiter): what one worker learns, all of them use.
The defaults are what an RFC-conformant target needs; a field only moves away
from its default when the config says so or when the target showed it (a
filter answered with resources that do not match, ``count`` refused, a 501).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

log = logging.getLogger("connectors")

# Called with (name, value, reason) each time a quirk changes by learning.
LearnListener = Callable[[str, Any, str], None]


@dataclass(slots=True)
class Quirks:
    """One target's deviations; every field's default is the RFC-conformant behaviour.

    - ``filter``: ``"server"`` sends ``filter=`` (RFC 7644 §3.4.2.2); ``"client"`` pages
      through the endpoint and matches client-side, because the target ignores or mangles filters.
    - ``page_count``: send ``count=`` when paging (RFC 7644 §3.4.2.4); False when the target rejects it.
    - ``put``: PUT is supported (RFC 7644 §3.5.1); False: adopt and update with PATCH only.
    - ``member_removal``: how a group member is removed: a ``members[value eq "id"]`` path
      (RFC 7644 §3.5.2.2), a ``members`` value list, or GET + PUT of the member list.
    - ``group_members_returned``: ``GET /Groups/{id}`` returns ``members``.
    - ``group_create_with_members``: a group must be created with its members.
    - ``member_value``: what the target puts in ``members[].value``: the member's ``id`` or ``userName``.
    - ``verify_writes``: read the resource back after each write and compare.

    ``on_learn`` (optional, not compared) hears every change made by :meth:`learn`.
    """

    filter: Literal["server", "client"] = "server"
    page_count: bool = True
    put: bool = True
    member_removal: Literal["filter", "list", "put"] = "filter"
    group_members_returned: bool = True
    group_create_with_members: bool = False
    member_value: Literal["id", "userName"] = "id"
    verify_writes: bool = False
    on_learn: LearnListener | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in _NAMES:
            _check(name, getattr(self, name))

    def learn(self, name: str, value: Any, reason: str) -> None:
        """Set quirk ``name`` to ``value`` because of ``reason`` (one line, no personal data).

        The listener is called only when the value changes: a quirk learned again by
        another worker, or seen again on the next call, is not news. Raises
        ``ValueError`` for a name that is not a quirk.
        """
        if name not in _NAMES:
            raise ValueError(f"{name!r} is not a target quirk; known: {', '.join(sorted(_NAMES))}")
        _check(name, value)
        if getattr(self, name) == value:
            return
        setattr(self, name, value)
        log.warning("target quirk learned: %s = %r (%s)", name, value, reason)
        if self.on_learn is not None:
            self.on_learn(name, value, reason)

    def as_dict(self) -> dict[str, Any]:
        """Every quirk by name (the listener left out), as a config ``quirks:`` block spells it."""
        return {name: getattr(self, name) for name in sorted(_NAMES)}


_NAMES = frozenset(f.name for f in fields(Quirks) if f.name != "on_learn")

# The values a quirk that is not a plain flag may take.
_CHOICES: dict[str, tuple[str, ...]] = {
    "filter": ("server", "client"),
    "member_removal": ("filter", "list", "put"),
    "member_value": ("id", "userName"),
}


def _check(name: str, value: Any) -> None:
    allowed = _CHOICES.get(name, (True, False))
    # `is` for the flags: 1 and 0 are not booleans here.
    if not any(value is choice or (isinstance(choice, str) and value == choice) for choice in allowed):
        raise ValueError(f"quirk {name} must be one of {', '.join(map(str, allowed))}, not {value!r}")
