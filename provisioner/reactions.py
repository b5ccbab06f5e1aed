"""How the engine reacts to a target's answers: one decision table per resource kind.

Purely computational, no side effects: each function turns what was sent and
what came back (a status, a ``scimType``, a body, a read-back) into what to do
next, as a flat ladder of early returns. The executors send and record; they
ask these tables what an answer means. A target's answer is a claim, never a
fact: lookup results are matched against what was asked, a 200 can be
contradicted by a read-back, and a 501/405 says "use another form" (RFC 9110
§15.6.2, §15.5.6), not "try again later".

Users (:func:`user_write_method`, :func:`on_user_error`) and groups
(:func:`next_removal_form`, :func:`on_member_removal`, :func:`group_members`),
plus the check both share (:func:`dropped`); lookup results are checked by ``connectors.resource_matches``.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any, Literal

WriteMethod = Literal["put", "patch"]
RemovalForm = Literal["filter", "list", "put"]

# RFC 9110 §15.6.2 Not Implemented, §15.5.6 Method Not Allowed: the form, not the moment, is wrong.
UNSUPPORTED_STATUSES = frozenset({405, 501})
# A 400 whose scimType names the request's form (RFC 7644 §3.12): the target cannot read this form.
FORM_SCIM_TYPES = frozenset({"invalidPath", "invalidFilter", "invalidSyntax"})
# Sent to the target but never expected back (RFC 7643 §7: returned "never", or set by the server).
_NOT_ECHOED = frozenset({"schemas", "id", "meta", "password"})
USERNAME_IMMUTABLE = "the target does not allow changing userName (mutability)"


class Step(StrEnum):
    """What to do after an answer."""

    DONE = "done"
    # The error means what it always meant: transient waits, permanent goes to review.
    RAISE = "raise"
    # PUT is not supported by this target: learn put=False, send the same change as PATCH.
    USE_PATCH = "use_patch"
    # userName cannot change (scimType mutability): fail now, apply the rest without userName.
    DROP_USERNAME = "drop_username"
    # This member-removal form is unsupported or was ignored: learn the next form and use it.
    NEXT_FORM = "next_form"
    # Every form was tried and the member is still there.
    GIVE_UP = "give_up"


# ---------------------------------------------------------------- lookups and writes, any kind


def dropped(sent: dict[str, Any], stored: dict[str, Any] | None) -> list[str]:
    """Attributes sent with a value that the target's answer (or read-back) does not hold.

    Only presence is compared: targets normalise values (case, phone formats),
    and that is not loss. Complex attributes and schema extensions are compared
    sub-attribute by sub-attribute (``name.givenName``, ``…:User.department``).
    ``stored`` None (a 204, no body): nothing can be said; returns [].
    """
    if stored is None:
        return []
    missing: list[str] = []
    for name, value in sent.items():
        if name in _NOT_ECHOED or value is None or value == "" or value == []:
            continue
        held = _get(stored, name)
        if held is None or held == "" or held == []:
            missing.append(name)
        elif isinstance(value, dict) and isinstance(held, dict):
            missing.extend(f"{name}.{sub}" for sub in dropped(value, held))
    return missing


def _get(resource: dict[str, Any], name: str) -> Any:
    if name in resource:
        return resource[name]
    # Attribute names are case-insensitive (RFC 7643 §2.1).
    folded = name.casefold()
    return next((v for k, v in resource.items() if k.casefold() == folded), None)


def unsupported_extensions(payload: dict[str, Any], supports: Callable[[str], bool] | None) -> list[str]:
    """Schema extensions (URN keys, RFC 7643 §3.3) of a payload that the target's resource type does not list.

    ``supports`` None: the target did not say (no /ResourceTypes); nothing is held back.
    """
    if supports is None:
        return []
    return [name for name in payload if name.startswith("urn:") and not supports(name)]


def without_extensions(payload: dict[str, Any], urns: list[str]) -> dict[str, Any]:
    """The payload without those extensions, in its body and in ``schemas``."""
    body = {k: v for k, v in payload.items() if k not in urns}
    if isinstance(body.get("schemas"), list):
        body["schemas"] = [s for s in body["schemas"] if s not in urns]
    return body


# ---------------------------------------------------------------- users


def user_write_method(*, put: bool, patch: bool, knows_applied: bool, adopting: bool) -> WriteMethod:
    """How to write a user's whole desired state (an adoption) or a change (an update).

    ``put``: the target's quirk (False: no PUT, learned or declared). ``patch``:
    the target supports PATCH (discovery or ``update_method``). An update with
    the last applied payload known sends only the difference as PATCH; an
    adoption writes every attribute, by PUT where the target has it, else as a
    PATCH ``replace`` of each attribute (RFC 7644 §3.5.2.3).
    """
    if not put:
        return "patch"
    if adopting:
        return "put"
    if patch and knows_applied:
        return "patch"
    return "put"


def on_user_error(
    method: WriteMethod, status: int | None, scim_type: str | None, *, adopting: bool, renames_username: bool
) -> Step:
    """What a refused user write means.

    - 405/501 to a PUT: the target has no PUT (RFC 9110 §15.5.6, §15.6.2); PATCH instead.
    - 404 to the PUT of an adoption: the account was found a moment ago, so it is
      the method that is missing (some targets answer 404 for unknown routes).
    - ``scimType: mutability`` (RFC 7644 §3.12) on a write that changes userName:
      the target will never take it; no retry helps.
    """
    if method == "put" and status in UNSUPPORTED_STATUSES:
        return Step.USE_PATCH
    if method == "put" and adopting and status == 404:
        return Step.USE_PATCH
    if scim_type == "mutability" and renames_username:
        return Step.DROP_USERNAME
    return Step.RAISE


def replace_all(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """PATCH operations that set every attribute of a desired payload (RFC 7644 §3.5.2.3 ``replace``).

    For targets without PUT. ``schemas`` is the resource's, not an attribute to replace.
    """
    return [{"op": "replace", "path": name, "value": value} for name, value in payload.items() if name != "schemas"]


def without_username(
    operations: list[dict[str, Any]] | None, payload: dict[str, Any], current: str | None
) -> tuple[list[dict[str, Any]] | None, dict[str, Any]]:
    """The same write without the rename (the target refuses to change userName).

    PATCH operations lose their userName operation; a PUT body keeps the
    ``current`` userName (it is required, RFC 7643 §4.1.1), or drops it when unknown.
    """
    kept = [o for o in operations if str(o.get("path", "")).casefold() != "username"] if operations is not None else None
    body = {k: v for k, v in payload.items() if k.casefold() != "username"}
    if current is not None:
        body["userName"] = current
    return kept, body


# ---------------------------------------------------------------- groups

_FORMS: tuple[RemovalForm, ...] = ("filter", "list", "put")


def next_removal_form(form: RemovalForm) -> RemovalForm | None:
    """The member-removal form to try after ``form``: path filter, then value list, then GET + PUT."""
    index = _FORMS.index(form)
    return _FORMS[index + 1] if index + 1 < len(_FORMS) else None


def on_member_removal(form: RemovalForm, status: int | None, scim_type: str | None, still_there: bool) -> Step:
    """What the answer to a member removal means.

    ``status`` is the error status (None: the write succeeded); ``still_there``:
    a read-back after a success still lists a removed member (a 200 that did nothing).
    """
    if status in UNSUPPORTED_STATUSES or (status == 400 and scim_type in FORM_SCIM_TYPES and form != "put"):
        return Step.NEXT_FORM if next_removal_form(form) else Step.GIVE_UP
    if status is not None:
        return Step.RAISE
    if still_there:
        return Step.NEXT_FORM if next_removal_form(form) else Step.GIVE_UP
    return Step.DONE


class MembersRead(StrEnum):
    """Where a group's members come from after a read."""

    REPORTED = "reported"
    # The read did not report members: ask for them (``attributes=members``, RFC 7644 §3.4.2.5).
    ASK_ATTRIBUTES = "ask_attributes"
    # Still not reported: list the group with a ``members.value`` filter per member we need to know.
    ASK_FILTER = "ask_filter"
    # No way to read them: keep what we applied, with a warning. Never "empty".
    TRUST_STATE = "trust_state"


def group_members(resource: dict[str, Any] | None, asked: tuple[str, ...]) -> MembersRead:
    """What a group read tells about members; ``asked``: the ways already tried, in order.

    A group without a ``members`` key was "not reported", not "empty" (RFC 7643
    §4.2 lets ``members`` be omitted): concluding that someone left a group
    from such a read would drop them from the engine's state while they keep the access.
    """
    if resource is not None and "members" in resource:
        return MembersRead.REPORTED
    if "attributes" not in asked:
        return MembersRead.ASK_ATTRIBUTES
    if "filter" not in asked:
        return MembersRead.ASK_FILTER
    return MembersRead.TRUST_STATE
