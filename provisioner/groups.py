"""Groups and memberships: definitions, desired member sets, and the group plan.

A groups file (``mappings/groups.yaml``) lists group definitions::

    groups:
      - name: "dept-{{ department | lower }}"   # one group per distinct value
      - name: all-staff
        members: "status == 'active'"          # who is in it (default: every active account)
      - from_column: groups                    # names listed in a column, ';'-separated
        separator: ";"
      - name: leadership
        key: leadership                        # a stable key: a new name is a rename
        members: "title.startswith('Head of')"
        include: [all-managers]                # nested: another group's members, expanded by us

Only identities with an active account in the target (as the users mapping
and the account links say) are members. Leavers are removed from every group
when ``remove_leavers_from_groups``; otherwise their memberships are frozen.

:func:`plan_groups` is the decision table and is purely computational: desired
member sets (SCIM ids) against the member sets last applied (or last read
from the target in a full compare) give, per group, ``group_create``,
``group_members`` (add / remove / rename), ``group_delete`` or nothing.
Group operations are rows of the operation table, told apart from account
operations by their kinds (``GROUP_KINDS``): each executor claims only its own.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from connectors import quote_filter_value
from provisioner.errors import ConfigError
from provisioner.mapping import AttributeMapping, MappingError
from provisioner.payload import payload_hash
from provisioner.planner import Link
from provisioner.sources import BadRecord, IdentityRecord
from provisioner.yamlfile import load_yaml

CORE_GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
_DEFINITION_KEYS = {"name", "key", "from_column", "separator", "members", "include"}


class GroupKind(StrEnum):
    """What is sent for a group."""

    CREATE = "group_create"
    MEMBERS = "group_members"
    DELETE = "group_delete"


GROUP_KINDS = tuple(kind.value for kind in GroupKind)


class GroupReason(StrEnum):
    """Why: a new group, members that changed in the source, drift found in the target, a group no longer defined."""

    NEW = "new_group"
    MEMBERSHIP = "membership"
    DRIFT = "drift"
    RENAME = "rename"
    UNDEFINED = "undefined"


@dataclass(frozen=True, slots=True)
class _Definition:
    where: str
    name: jinja2.Template | str | None
    # A stable identity for the group(s): a literal for a literal name, a template for a template name.
    # When the name changes and the key does not, the group is renamed, not replaced.
    key: jinja2.Template | str | None
    column: str | None
    separator: str
    members: jinja2.Template | None
    include: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GroupDefinitions:
    """A compiled groups file."""

    path: Path
    definitions: tuple[_Definition, ...]

    def static_groups(self) -> dict[str, str]:
        """Groups named by a literal: key -> display name. They exist even without members."""
        return {_literal(d.key) or d.name: d.name for d in self.definitions if isinstance(d.name, str)}

    def groups_of(self, record: Mapping[str, Any]) -> dict[str, str]:
        """The groups (key -> display name) a record belongs to by the rules, before nesting."""
        out: dict[str, str] = {}
        for d in self.definitions:
            try:
                if d.members is not None and not _truthy(d.members.render(record)):
                    continue
                if d.column is not None:
                    value = record.get(d.column)
                    if value is None:
                        raise MappingError(f"{d.where}: the record has no column '{d.column}'")
                    for name in str(value).split(d.separator):
                        if name.strip():
                            out[name.strip()] = name.strip()
                    continue
                name = d.name if isinstance(d.name, str) else (d.name.render(record) if d.name else "")
                key = d.key.render(record).strip() if isinstance(d.key, jinja2.Template) else d.key
            except jinja2.UndefinedError as exc:
                raise MappingError(f"{d.where}: {exc.message}") from None
            except jinja2.TemplateError as exc:
                raise MappingError(f"{d.where}: {type(exc).__name__}: {exc}") from None
            name = name.strip()
            if name:
                out[key or name] = name
        return out

    def nesting(self) -> dict[str, tuple[str, ...]]:
        """Groups that include other groups' members: key -> included keys."""
        return {(_literal(d.key) or d.name): d.include for d in self.definitions if d.include and isinstance(d.name, str)}


def _truthy(text: str) -> bool:
    return text.strip().lower() not in ("", "false", "0", "none", "no")


def load_groups(path: Path) -> GroupDefinitions:
    """Load and compile a groups file; every error names file:line."""
    doc = load_yaml(path)
    data = doc.data
    if not isinstance(data, dict) or not isinstance(data.get("groups"), list) or not data["groups"]:
        raise ConfigError(f"{doc.where(('groups',))}: a groups file needs a non-empty 'groups' list")
    unknown = set(data) - {"groups"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{doc.where((key,))}: unknown key '{key}'")
    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)
    definitions = []
    for index, item in enumerate(data["groups"]):
        loc = ("groups", index)
        where = doc.where(loc)
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: a group definition is a mapping with 'name' or 'from_column'")
        bad = set(item) - _DEFINITION_KEYS
        if bad:
            key = sorted(bad)[0]
            raise ConfigError(f"{doc.where((*loc, key))}: unknown key '{key}' in a group definition")
        if ("name" in item) == ("from_column" in item):
            raise ConfigError(f"{where}: a group definition needs exactly one of 'name' and 'from_column'")
        name: jinja2.Template | str | None = None
        if "name" in item:
            raw = item["name"]
            if not isinstance(raw, str) or not raw.strip():
                raise ConfigError(f"{doc.where((*loc, 'name'))}: 'name' must be a non-empty string")
            name = _compile(env, raw, doc.where((*loc, "name"))) if "{" in raw else raw.strip()
        key: jinja2.Template | str | None = None
        if item.get("key") is not None:
            raw_key = str(item["key"]).strip()
            key_where = doc.where((*loc, "key"))
            if isinstance(name, str) or name is None:
                key = raw_key
            elif "{" not in raw_key:
                # One literal key for every group a template makes would merge them all into one.
                raise ConfigError(f"{key_where}: a group named by a template needs a template key too, "
                                  "e.g. key: \"department:{{ department }}\"")  # fmt: skip
            else:
                key = _compile(env, raw_key, key_where)
        include = item.get("include") or []
        if not isinstance(include, list) or not all(isinstance(i, str) for i in include):
            raise ConfigError(f"{doc.where((*loc, 'include'))}: 'include' is a list of group names")
        if include and not isinstance(name, str):
            raise ConfigError(f"{doc.where((*loc, 'include'))}: 'include' is for groups with a literal name")
        members = item.get("members")
        members_template = None
        if members is not None and members is not True:
            source = "false" if members is False else str(members)
            members_template = _compile(env, f"{{{{ ({source}) }}}}", doc.where((*loc, "members")))
        definitions.append(
            _Definition(
                where=where,
                name=name,
                key=key,
                column=item.get("from_column"),
                separator=str(item.get("separator", ";")),
                members=members_template,
                include=tuple(include),
            )
        )
    return GroupDefinitions(path, tuple(definitions))


def _literal(key: jinja2.Template | str | None) -> str | None:
    return key if isinstance(key, str) else None


def _compile(env: ImmutableSandboxedEnvironment, source: str, where: str) -> jinja2.Template:
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"{where}: invalid expression: {exc.message}") from None


@dataclass(frozen=True, slots=True)
class GroupLink:
    """A group in the target as we last knew it."""

    group_key: str
    scim_id: str
    display_name: str
    etag: str | None = None


@dataclass(slots=True)
class Desired:
    """Who should be in which group, in SCIM ids, and whose memberships must not be touched."""

    # key -> display name, for every group that is defined now.
    names: dict[str, str] = field(default_factory=dict)
    # key -> member SCIM ids.
    members: dict[str, set[str]] = field(default_factory=dict)
    # Member ids never added nor removed this cycle (leavers kept by config, records that failed).
    frozen: set[str] = field(default_factory=set)
    # SCIM id -> identity key, for queue rows an operator can read.
    identities: dict[str, str] = field(default_factory=dict)
    rejected: list[tuple[str, str]] = field(default_factory=list)


def desired_groups(
    definitions: GroupDefinitions,
    mapping: AttributeMapping,
    records: Iterable[IdentityRecord | BadRecord],
    links: Mapping[str, Link],
    *,
    remove_leavers: bool = True,
    held: Iterable[str] = (),
) -> Desired:
    """Render every record's groups. Only active linked accounts are members.

    A record that cannot be rendered (or whose group rule fails) keeps its
    memberships as they are; so do leavers held by the deletion brake, and all
    leavers unless ``remove_leavers``.
    """
    desired = Desired(names=dict(definitions.static_groups()))
    for key in desired.names:
        desired.members[key] = set()
    held_keys = set(held)
    seen: set[str] = set()
    for record in records:
        if isinstance(record, BadRecord):
            _freeze(desired, links.get(record.key))
            seen.add(record.key)
            continue
        if record.key in seen:
            continue
        seen.add(record.key)
        link = links.get(record.key)
        if link is not None:
            desired.identities[link.scim_id] = record.key
        try:
            rendered = mapping.render(record.attributes)
            groups = definitions.groups_of(record.attributes) if rendered.payload else {}
        except MappingError as exc:
            desired.rejected.append((record.key, str(exc)))
            _freeze(desired, link)
            continue
        if not rendered.payload:
            if not remove_leavers or record.key in held_keys:
                _freeze(desired, link)
            continue
        if link is None or not link.active:
            continue  # not created (or not enabled) yet: added by the cycle after it is
        for key, name in groups.items():
            desired.names.setdefault(key, name)
            desired.members.setdefault(key, set()).add(link.scim_id)
    for key, link in links.items():
        if key not in seen:
            desired.identities[link.scim_id] = key
            if not remove_leavers or key in held_keys:
                _freeze(desired, link)
    _expand_nesting(desired, definitions.nesting())
    return desired


def _freeze(desired: Desired, link: Link | None) -> None:
    if link is not None:
        desired.frozen.add(link.scim_id)


def _expand_nesting(desired: Desired, nesting: dict[str, tuple[str, ...]]) -> None:
    """A group that includes others gets their members, transitively; a cycle stops where it closes."""

    def members_of(key: str, visiting: frozenset[str]) -> set[str]:
        own = set(desired.members.get(key, ()))
        for included in nesting.get(key, ()):
            if included not in visiting:
                own |= members_of(included, visiting | {included})
        return own

    expanded = {key: members_of(key, frozenset({key})) for key in nesting}
    desired.members.update(expanded)


@dataclass(frozen=True, slots=True)
class GroupDecision:
    """One group operation the plan wants sent. ``add`` / ``remove``: member SCIM ids.

    A ``group_delete`` removes every member it lists (the members the group
    holds as last applied or read), with the group.
    """

    group_key: str
    kind: GroupKind
    reason: GroupReason
    display_name: str
    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()

    def payload(self, identities: Mapping[str, str]) -> dict[str, Any]:
        """The queue row's payload: readable (identity keys beside ids) and enough to send."""
        return {
            "displayName": self.display_name,
            "add": [{"value": i, "identity": identities.get(i)} for i in self.add],
            "remove": [{"value": i, "identity": identities.get(i)} for i in self.remove],
        }

    def payload_hash(self) -> str:
        """A digest of what the operation changes."""
        return payload_hash({"kind": self.kind.value, "displayName": self.display_name,
                             "add": list(self.add), "remove": list(self.remove)})  # fmt: skip


@dataclass(slots=True)
class GroupPlan:
    """Everything one planning pass decided for one target's groups."""

    target: str
    decisions: list[GroupDecision] = field(default_factory=list)
    # Groups already as they should be: open operations for them are stale.
    settled: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Operations by kind, and member changes."""
        counts = {kind.value: 0 for kind in GroupKind}
        for d in self.decisions:
            counts[d.kind.value] += 1
        counts["members_added"] = sum(len(d.add) for d in self.decisions)
        counts["members_removed"] = sum(len(d.remove) for d in self.decisions)
        counts["unchanged"] = len(self.settled)
        return counts


def decide_group(
    key: str,
    name: str | None,
    want: set[str] | None,
    link: GroupLink | None,
    state: set[str],
    frozen: set[str],
    *,
    drift: bool = False,
    delete_empty: bool = False,
) -> GroupDecision | None:
    """The operation for one group, or None. ``want`` None: the group is no longer defined.

    With ``delete_empty``, a group no longer defined that its removals leave
    empty is deleted; the delete carries those removals (every member in
    ``state``), so that the member brake counts what deleting it takes away.
    """
    if want is None:
        if link is None:
            return None
        remove = state - frozen
        if delete_empty and not (state - remove):
            return GroupDecision(key, GroupKind.DELETE, GroupReason.UNDEFINED, link.display_name,
                                 remove=tuple(sorted(remove)))  # fmt: skip
        if not remove:
            return None
        return GroupDecision(key, GroupKind.MEMBERS, GroupReason.UNDEFINED, link.display_name, remove=tuple(sorted(remove)))
    assert name is not None
    add = tuple(sorted(want - state - frozen))
    if link is None:
        return GroupDecision(key, GroupKind.CREATE, GroupReason.NEW, name, add=add)
    remove = tuple(sorted(state - want - frozen))
    renamed = link.display_name != name
    if not add and not remove and not renamed:
        return None
    reason = GroupReason.DRIFT if drift else GroupReason.MEMBERSHIP if add or remove else GroupReason.RENAME
    return GroupDecision(key, GroupKind.MEMBERS, reason, name, add=add, remove=remove)


def plan_groups(
    target: str,
    desired: Desired,
    links: Mapping[str, GroupLink],
    state: Mapping[str, set[str]],
    *,
    drifted: Iterable[str] = (),
    delete_empty: bool = False,
) -> GroupPlan:
    """Decide every group operation of a target. Purely computational, no side effects.

    ``state``: member ids per group as last applied (or as read from the target
    by a full compare); ``drifted``: groups whose state came from such a read
    and differed from what we had applied.
    """
    plan = GroupPlan(target)
    drift = set(drifted)
    for key in sorted(desired.names.keys() | links.keys()):
        decision = decide_group(
            key,
            desired.names.get(key),
            desired.members.get(key, set()) if key in desired.names else None,
            links.get(key),
            state.get(key, set()),
            desired.frozen,
            drift=key in drift,
            delete_empty=delete_empty,
        )
        if decision is None:
            plan.settled.append(key)
        else:
            plan.decisions.append(decision)
    return plan


def only_members(plan: GroupPlan, members: Collection[str], links: Mapping[str, GroupLink]) -> GroupPlan:
    """The part of a group plan that concerns some members only: their additions and removals. Pure.

    What ``sync --only`` sends: a group created for them holds them alone (the
    others join at the next cycle), and nothing else of the plan is kept (no
    other member, no rename, no deletion). Nothing is ``settled``: open
    operations of other groups are left as they are.
    """
    wanted = set(members)
    out = GroupPlan(plan.target)
    for decision in plan.decisions:
        if decision.kind is GroupKind.DELETE:
            continue
        add = tuple(i for i in decision.add if i in wanted)
        remove = tuple(i for i in decision.remove if i in wanted)
        if not add and not remove:
            continue
        link = links.get(decision.group_key)
        name = link.display_name if link is not None else decision.display_name
        out.decisions.append(replace(decision, add=add, remove=remove, display_name=name))
    return out


def batches(add: list[str], remove: list[str], size: int) -> list[tuple[list[str], list[str]]]:
    """Member changes in batches of at most ``size``: removals first, then additions."""
    changes = [("remove", m) for m in remove] + [("add", m) for m in add]
    out = []
    for start in range(0, len(changes), size):
        chunk = changes[start : start + size]
        out.append(([m for op, m in chunk if op == "add"], [m for op, m in chunk if op == "remove"]))
    return out


def patch_operations(
    add: list[str], remove: list[str], *, removal: str = "filter", rename: str | None = None
) -> list[dict[str, Any]]:
    """PATCH operations (RFC 7644 §3.5.2) for one batch of member changes.

    Removal by ``members[value eq "ID"]`` (§3.5.2.2), or ``members`` with a value
    list for servers that do not take value filters in paths.
    """
    operations: list[dict[str, Any]] = []
    if rename is not None:
        operations.append({"op": "replace", "path": "displayName", "value": rename})
    if remove:
        if removal == "list":
            operations.append({"op": "remove", "path": "members", "value": [{"value": m} for m in remove]})
        else:
            operations.extend({"op": "remove", "path": f"members[value eq {_quote(m)}]"} for m in remove)
    if add:
        operations.append({"op": "add", "path": "members", "value": [{"value": m} for m in add]})
    return operations


def _quote(value: str) -> str:
    return quote_filter_value(value)


def group_resource(name: str, members: Iterable[str] | None = None) -> dict[str, Any]:
    """A Group resource (RFC 7643 §4.2) for POST or PUT."""
    body: dict[str, Any] = {"schemas": [CORE_GROUP], "displayName": name}
    if members is not None:
        body["members"] = [{"value": m} for m in sorted(members)]
    return body
