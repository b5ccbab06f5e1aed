"""SCIM payloads as data: canonical hashes, references, attribute-level differences.

Pure functions; the planner and the executor share them.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import replace
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson

from provisioner.functions import Unique
from provisioner.mapping import Ref
from provisioner.redaction import WRITE_ONLY, names_write_only

# Attributes that are not the account's data: never diffed, never patched.
_NOT_DATA = {"schemas", "id", "meta"}


def without(payload: Mapping[str, Any], paths: Iterable[tuple[str, ...]]) -> dict[str, Any]:
    """The payload without the attributes at ``paths``: ``("password",)`` or ``(extension urn, name)``.

    What an update sends when the mapping marks attributes ``when: create``;
    an extension left empty is dropped whole.
    """
    out = dict(payload)
    for path in paths:
        if len(path) == 1:
            out.pop(path[0], None)
        elif isinstance(out.get(path[0]), dict):
            inner = {k: v for k, v in out[path[0]].items() if k != path[1]}
            if inner:
                out[path[0]] = inner
            else:
                del out[path[0]]
                if isinstance(out.get("schemas"), list):
                    out["schemas"] = [s for s in out["schemas"] if s != path[0]]
    return out


def keep_omitted(
    previous: Mapping[str, Any] | None, payload: Mapping[str, Any], paths: Iterable[tuple[str, ...]]
) -> tuple[dict[str, Any], list[str]]:
    """The payload with, at each of ``paths`` it leaves empty, the value ``previous`` holds there.

    What an update sends for attributes the mapping marks ``omit_if_empty``:
    an empty value is no instruction to clear the target's, so a PATCH has no
    ``remove`` for it and a PUT carries the value as it is. ``paths``: ``("nickName",)``,
    ``(extension urn, name)``, ``("name", "givenName")``; ``previous``: the
    payload last applied, or the account read from the target. Returns the
    payload and the paths kept (as :func:`flatten` names them).
    """
    out = dict(payload)
    kept: list[str] = []
    if not previous:
        return out, kept
    for path in sorted(paths):
        have: Any = previous
        for name in path:
            have = have.get(name) if isinstance(have, Mapping) else None
        if have in (None, "", [], {}):
            continue
        if len(path) == 1:
            if path[0] not in out:
                out[path[0]] = have
                kept.append(path[0])
            continue
        inner = out.get(path[0])
        if isinstance(inner, Mapping) and path[1] in inner:
            continue
        out[path[0]] = {**(inner if isinstance(inner, Mapping) else {}), path[1]: have}
        if path[0].startswith("urn:"):
            kept.append(f"{path[0]}:{path[1]}")
            if isinstance(out.get("schemas"), list) and path[0] not in out["schemas"]:
                out["schemas"] = [*out["schemas"], path[0]]
        else:
            kept.append(f"{path[0]}.{path[1]}")
    return out, kept


def payload_hash(payload: Mapping[str, Any]) -> str:
    """A stable digest of a payload: key order does not matter, values do."""
    return hashlib.blake2b(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS), digest_size=16).hexdigest()


# How an unresolved reference is written in a queue row (a key no SCIM schema uses).
_REF_MARKER = "__provisioner_ref__"
# How a unique_username() value (its candidates, and once chosen its choice) is written in a queue row.
_UNIQUE_MARKER = "__provisioner_unique__"


def dumps(value: Any) -> str:
    """Compact JSON text for storage; unresolved references survive the round trip."""
    # Ref is a dataclass: orjson would serialize it as a plain object without the passthrough.
    option = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS
    return orjson.dumps(value, option=option, default=_encode_ref).decode()


class Packed(bytes):
    """A payload held as compressed :func:`dumps` JSON: a large plan's payloads, until the queue stores them.

    About a seventh of the memory of the same payload as Python objects (an
    initial load holds 100,000 of them at once); zlib's fastest level costs
    microseconds a payload. :meth:`text` gives the JSON (:func:`loads` it for the payload).
    It never holds a write-only value (see :func:`pack`): the queue stores its JSON as it is.
    """

    __slots__ = ()

    def text(self) -> str:
        """The payload as :func:`dumps` writes it."""
        return zlib.decompress(self).decode()

def pack(payload: dict[str, Any]) -> dict[str, Any] | Packed:
    """A payload as :class:`Packed` JSON; one that names a write-only attribute (``password``) stays as it is.

    The queue registers a write-only value as a secret and masks it before it
    stores the payload, from the objects; packed, it would have to unpack it
    again to look (zlib costs ~8 µs each time).
    """
    text = dumps(payload)
    if names_write_only(text):
        return payload
    return Packed(zlib.compress(text.encode(), 1))


def loads(text: str | None) -> Any:
    """Parse JSON text written by :func:`dumps` (None stays None)."""
    if text is None:
        return None
    value = orjson.loads(text)
    # Most payloads hold no reference and no unique_username(): they are not walked to find none.
    return _decode_refs(value) if _REF_MARKER in text or _UNIQUE_MARKER in text else value


def _encode_ref(value: Any) -> Any:
    if isinstance(value, Ref):
        return {_REF_MARKER: value.key}
    if isinstance(value, Unique):
        return {_UNIQUE_MARKER: {"candidates": list(value.candidates), "suffix": value.suffix,
                                 "numbered": value.numbered, "chosen": value.chosen}}  # fmt: skip
    raise TypeError(f"cannot store {type(value).__name__} as JSON")


def _decode_refs(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and _REF_MARKER in value:
            return Ref(value[_REF_MARKER])
        if len(value) == 1 and isinstance(value.get(_UNIQUE_MARKER), dict):
            unique = value[_UNIQUE_MARKER]
            return Unique(tuple(unique["candidates"]), unique["suffix"], unique["numbered"], unique["chosen"])
        return {k: _decode_refs(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_refs(v) for v in value]
    return value


def readable(value: Any, note: str = "resolved when sent") -> Any:
    """A payload for people: each unresolved reference shown as ``ref(KEY): note``."""
    if isinstance(value, Ref):
        return f"ref({value.key}): {note}"
    if isinstance(value, Unique):
        return value.chosen or f"{value}: the first one free, chosen when the account is created"
    if isinstance(value, dict):
        return {k: readable(v, note) for k, v in value.items()}
    if isinstance(value, list):
        return [readable(v, note) for v in value]
    return value


def refs_in(value: Any) -> set[str]:
    """The identity keys that a payload still refers to by reference."""
    if isinstance(value, Ref):
        return {value.key}
    if isinstance(value, dict):
        return set().union(*(refs_in(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(refs_in(v) for v in value)) if value else set()
    return set()


def resolve_refs(value: Any, lookup: Callable[[str], str | None], *, keep_unresolved: bool = False) -> tuple[Any, int]:
    """Replace every Ref with the SCIM id ``lookup`` gives.

    Returns the new value and how many references could not be resolved.
    Unresolved ones drop out — a complex value left without its ``value`` (a
    manager not yet created) is dropped whole — unless ``keep_unresolved``
    keeps them for a later try.
    """
    if isinstance(value, Ref):
        resolved = lookup(value.key)
        if resolved is not None:
            return resolved, 0
        return (value if keep_unresolved else None), 1
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        missing = 0
        for key, item in value.items():
            new, n = resolve_refs(item, lookup, keep_unresolved=keep_unresolved)
            missing += n
            if new is None and n and key == "value":
                return None, missing
            if new is not None and new != {} and new != []:
                out[key] = new
        return out, missing
    if isinstance(value, list):
        items = []
        missing = 0
        for item in value:
            new, n = resolve_refs(item, lookup, keep_unresolved=keep_unresolved)
            missing += n
            if new is not None:
                items.append(new)
        return items, missing
    return value, 0


def unchosen(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The payload with every top-level unique_username() value as the mapping renders it, its choice forgotten.

    What hashes compare: the planner's desired payload has no choice yet, a queue row's may.
    """
    return {k: replace(v, chosen=None) if isinstance(v, Unique) and v.chosen else v for k, v in payload.items()}


def keep_chosen(applied: Mapping[str, Any] | None, payload: Mapping[str, Any]) -> dict[str, Any]:
    """An update's payload: each unique_username() value is the one the account was created with.

    Never a new choice for an existing account; left out when what was applied is not known.
    """
    kept: dict[str, Any] = {}
    for name, value in payload.items():
        if not isinstance(value, Unique):
            kept[name] = value
        elif applied is not None and isinstance(applied.get(name), str):
            kept[name] = applied[name]
    return kept


def flatten(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Attribute paths as SCIM PATCH names them, down to simple values or multi-valued lists.

    ``name.givenName``, ``urn:…:enterprise:2.0:User:department``,
    ``urn:…:User:manager`` (a complex value kept whole), ``emails`` (a list kept whole).
    """
    flat: dict[str, Any] = {}
    for key, value in payload.items():
        if key in _NOT_DATA:
            continue
        if key.startswith("urn:") and isinstance(value, dict):
            for sub, sub_value in value.items():
                flat[f"{key}:{sub}"] = sub_value
        elif isinstance(value, dict):
            for sub, sub_value in value.items():
                flat[f"{key}.{sub}"] = sub_value
        else:
            flat[key] = value
    return flat


def changed_paths(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """The attribute paths whose values differ between two payloads, sorted."""
    before = flatten(old or {})
    after = flatten(new)
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


def nothing_to_send(applied: Mapping[str, Any] | None, payload: Mapping[str, Any], kept: Iterable[str]) -> bool:
    """Whether an update of an active account sends nothing: only ``omit_if_empty`` attributes went empty.

    ``kept``: the paths :func:`keep_omitted` kept, whose values the target
    keeps; ``payload``: the update with them kept; ``applied``: the payload last
    applied, where write-only values (RFC 7643 §4.1.1, returned "never") are
    masked, so a difference there is no change. The executor then records the
    new hash and sends nothing; a plan's description counts the update unchanged.
    """
    return bool(kept) and all(path in WRITE_ONLY for path in changed_paths(applied, payload))


def patch_operations(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[dict[str, Any]]:
    """PATCH operations (RFC 7644 §3.5.2) that turn ``old`` into ``new``, changed attributes only."""
    before = flatten(old)
    after = flatten(new)
    operations: list[dict[str, Any]] = []
    for path in sorted(before.keys() | after.keys()):
        if path not in after:
            operations.append({"op": "remove", "path": path})
        elif before.get(path) != after[path]:
            operations.append({"op": "replace", "path": path, "value": after[path]})
    return operations


def owed_references(payload: Mapping[str, Any], lookup: Callable[[str], str | None]) -> dict[str, Any]:
    """The attributes of ``payload`` that hold a reference ``lookup`` cannot resolve now, references kept.

    Keys are attribute paths as :func:`flatten` names them
    (``urn:…:enterprise:2.0:User:manager``). :func:`resolve_refs` leaves these
    attributes out of what is sent (a manager whose account does not exist
    yet): the account owes them, and :func:`settle_references` tells when they can be sent.
    """
    return {
        path: value
        for path, value in flatten(payload).items()
        if any(lookup(key) is None for key in refs_in(value))
    }


def settle_references(
    owed: Mapping[str, Any] | None, lookup: Callable[[str], str | None]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Owed attributes (see :func:`owed_references`) split into (resolved now, still owed).

    An attribute is resolved when every reference in it is: resolved ones have
    SCIM ids in place of their references, ready for a PATCH ``replace``.
    """
    resolved: dict[str, Any] = {}
    still: dict[str, Any] = {}
    for path, value in (owed or {}).items():
        new, missing = resolve_refs(value, lookup)
        if missing:
            still[path] = value
        else:
            resolved[path] = new
    return resolved, still


def with_paths(payload: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """The payload with attributes set at paths as :func:`flatten` names them (an extension set joins ``schemas``)."""
    out = dict(payload)
    for path, value in values.items():
        if path.startswith("urn:"):
            parent, _, name = path.rpartition(":")
            if isinstance(out.get("schemas"), list) and parent not in out["schemas"]:
                out["schemas"] = [*out["schemas"], parent]
        elif "." in path:
            parent, _, name = path.partition(".")
        else:
            out[path] = value
            continue
        out[parent] = {**(out.get(parent) or {}), name: value}
    return out
