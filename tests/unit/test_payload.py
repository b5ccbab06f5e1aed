"""SCIM payloads as data: hashes, references, attribute-level differences and PATCH operations."""

from __future__ import annotations

from typing import Any

import pytest

from provisioner.mapping import Ref
from provisioner.payload import (
    changed_paths,
    dumps,
    keep_omitted,
    loads,
    owed_references,
    patch_operations,
    payload_hash,
    refs_in,
    resolve_refs,
    settle_references,
    with_paths,
)

CORE = "urn:ietf:params:scim:schemas:core:2.0:User"
ENT = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"

BEFORE: dict[str, Any] = {
    "schemas": [CORE, ENT],
    "userName": "ada@example.com",
    "title": "Engineer",
    "name": {"givenName": "Ada", "familyName": "Lovelace"},
    "emails": [{"value": "ada@example.com", "type": "work", "primary": True}],
    ENT: {"department": "Engineering", "costCenter": "CC-100", "manager": {"value": "m-1"}},
    "active": True,
}


def changed(**changes: Any) -> dict[str, Any]:
    """BEFORE with some top-level values replaced (None removes the key)."""
    after = {**BEFORE, **changes}
    return {k: v for k, v in after.items() if v is not None}


# --- payload_hash ---------------------------------------------------------------------------------


def test_hash_ignores_key_order() -> None:
    reordered = dict(reversed(list(BEFORE.items())))
    reordered[ENT] = dict(reversed(list(BEFORE[ENT].items())))

    assert payload_hash(reordered) == payload_hash(BEFORE)


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(changed(title="Countess"), id="value"),
        pytest.param(changed(title=None), id="removed"),
        pytest.param(changed(active=False), id="active"),
        pytest.param(changed(**{ENT: {**BEFORE[ENT], "department": "Research"}}), id="nested"),
        pytest.param(changed(emails=[{"value": "ada@example.com", "type": "home", "primary": True}]), id="in-a-list"),
    ],
)
def test_hash_changes_with_any_value(other: dict[str, Any]) -> None:
    assert payload_hash(other) != payload_hash(BEFORE)


# --- changed_paths ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("after", "paths"),
    [
        pytest.param(BEFORE, [], id="nothing"),
        pytest.param(changed(title="Countess"), ["title"], id="core"),
        pytest.param(changed(name={"givenName": "Augusta", "familyName": "Lovelace"}), ["name.givenName"], id="sub"),
        pytest.param(changed(**{ENT: {**BEFORE[ENT], "department": "Research"}}), [f"{ENT}:department"], id="ext"),
        pytest.param(changed(**{ENT: {**BEFORE[ENT], "manager": {"value": "m-2"}}}), [f"{ENT}:manager"], id="manager"),
        pytest.param(changed(emails=[{"value": "a@example.org", "type": "work", "primary": True}]), ["emails"], id="list"),
        pytest.param(changed(title=None), ["title"], id="removed"),
        pytest.param(changed(nickName="Ada"), ["nickName"], id="added"),
        pytest.param(changed(schemas=[CORE]), [], id="schemas-are-not-data"),
    ],
)
def test_changed_paths_names_what_differs_as_scim_paths(after: dict[str, Any], paths: list[str]) -> None:
    assert changed_paths(BEFORE, after) == paths


def test_changed_paths_without_a_previous_payload_lists_every_attribute() -> None:
    paths = changed_paths(None, {"schemas": [CORE], "userName": "a", "name": {"givenName": "A"}, ENT: {"department": "D"}})

    assert paths == sorted(["userName", "name.givenName", f"{ENT}:department"])


def test_changed_paths_are_sorted() -> None:
    after = changed(title="T", displayName="D", **{ENT: {**BEFORE[ENT], "costCenter": "CC-9"}})

    paths = changed_paths(BEFORE, after)

    assert paths == sorted(paths) and len(paths) == 3


# --- patch_operations -----------------------------------------------------------------------------


def test_patch_of_identical_payloads_is_empty() -> None:
    assert patch_operations(BEFORE, dict(BEFORE)) == []


def test_patch_replaces_only_the_changed_attributes() -> None:
    after = changed(title="Countess", **{ENT: {**BEFORE[ENT], "department": "Research"}})

    assert patch_operations(BEFORE, after) == [
        {"op": "replace", "path": "title", "value": "Countess"},
        {"op": "replace", "path": f"{ENT}:department", "value": "Research"},
    ]


def test_patch_removes_attributes_that_are_gone() -> None:
    after = changed(title=None, **{ENT: {"department": "Engineering", "manager": {"value": "m-1"}}})

    assert patch_operations(BEFORE, after) == [
        {"op": "remove", "path": "title"},
        {"op": "remove", "path": f"{ENT}:costCenter"},
    ]


def test_patch_adds_new_attributes_with_replace() -> None:
    """RFC 7644 §3.5.2.3: replace of an attribute that has no value adds it."""
    assert patch_operations(BEFORE, changed(nickName="Ada")) == [{"op": "replace", "path": "nickName", "value": "Ada"}]


def test_patch_replaces_a_multi_valued_attribute_whole() -> None:
    emails = [{"value": "ada@example.org", "type": "work", "primary": True}]

    assert patch_operations(BEFORE, changed(emails=emails)) == [{"op": "replace", "path": "emails", "value": emails}]


def test_patch_replaces_a_sub_attribute_by_its_dotted_path() -> None:
    after = changed(name={"givenName": "Augusta", "familyName": "Lovelace"})

    assert patch_operations(BEFORE, after) == [{"op": "replace", "path": "name.givenName", "value": "Augusta"}]


def test_patch_never_touches_schemas_id_or_meta() -> None:
    after = changed(schemas=[CORE], id="other", meta={"version": 'W/"9"'})

    assert patch_operations(BEFORE, after) == []


def test_patch_disables_with_active_false() -> None:
    assert patch_operations(BEFORE, changed(active=False)) == [{"op": "replace", "path": "active", "value": False}]


# --- references ---------------------------------------------------------------------------------


WITH_MANAGER: dict[str, Any] = {
    "userName": "alan@example.com",
    ENT: {"department": "Finance", "manager": {"value": Ref("E1")}},
}


def test_refs_in_finds_nested_references() -> None:
    payload = {**WITH_MANAGER, "x": [{"value": Ref("E7")}, "plain"]}

    assert refs_in(payload) == {"E1", "E7"}
    assert refs_in({"userName": "a"}) == set()


def test_resolve_refs_replaces_a_reference_with_the_scim_id() -> None:
    resolved, missing = resolve_refs(WITH_MANAGER, {"E1": "scim-e1"}.get)

    assert resolved[ENT]["manager"] == {"value": "scim-e1"}
    assert missing == 0


def test_resolve_refs_drops_an_unresolved_manager_whole() -> None:
    """A complex value left without its ``value`` is not sent: no ``manager: {}``."""
    resolved, missing = resolve_refs(WITH_MANAGER, {}.get)

    assert resolved == {"userName": "alan@example.com", ENT: {"department": "Finance"}}
    assert missing == 1


def test_resolve_refs_drops_an_extension_left_empty() -> None:
    resolved, _ = resolve_refs({"userName": "a", ENT: {"manager": {"value": Ref("E1")}}}, {}.get)

    assert resolved == {"userName": "a"}


def test_resolve_refs_can_keep_unresolved_references_for_later() -> None:
    resolved, missing = resolve_refs(WITH_MANAGER, {}.get, keep_unresolved=True)

    assert resolved[ENT]["manager"] == {"value": Ref("E1")}
    assert missing == 1


def test_resolve_refs_in_a_list_drops_only_the_unresolved_item() -> None:
    payload = {"x": [{"value": Ref("E1"), "type": "a"}, {"value": Ref("E2"), "type": "b"}]}

    resolved, missing = resolve_refs(payload, {"E2": "scim-e2"}.get)

    assert resolved == {"x": [{"value": "scim-e2", "type": "b"}]}
    assert missing == 1


def test_resolve_refs_leaves_its_input_alone() -> None:
    resolve_refs(WITH_MANAGER, {"E1": "scim-e1"}.get)

    assert WITH_MANAGER[ENT]["manager"] == {"value": Ref("E1")}


# --- dumps / loads --------------------------------------------------------------------------------


def test_dumps_and_loads_keep_unresolved_references() -> None:
    payload = {**WITH_MANAGER, "emails": [{"value": "a@example.com", "primary": True}], "n": None}

    assert loads(dumps(payload)) == payload


def test_dumps_is_canonical() -> None:
    assert dumps({"b": 1, "a": {"d": 2, "c": 3}}) == '{"a":{"c":3,"d":2},"b":1}'


def test_loads_of_none_is_none() -> None:
    assert loads(None) is None


def test_dumps_refuses_values_it_cannot_store() -> None:
    with pytest.raises(TypeError):
        dumps({"x": object()})


def test_without_drops_create_only_attributes_and_an_emptied_extension() -> None:
    from provisioner.payload import without

    urn = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
    payload = {"schemas": ["core", urn], "userName": "a", "password": "s", urn: {"costCenter": "1"}}

    assert without(payload, [("password",), (urn, "costCenter")]) == {"schemas": ["core"], "userName": "a"}
    assert without(payload, []) == payload



def test_keep_omitted_puts_back_what_was_applied_where_the_payload_went_empty() -> None:
    """What a PUT then carries, and why a PATCH has no remove for it."""
    ext = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
    applied = {"schemas": [CORE], "userName": "ada", "title": "Engineer", "name": {"givenName": "Ada"},
               ext: {"division": "R&D"}}  # fmt: skip
    payload = {"schemas": [CORE], "userName": "ada", "name": {"familyName": "Lovelace"}}

    kept, paths = keep_omitted(applied, payload, [("title",), ("name", "givenName"), (ext, "division"), ("nickName",)])

    assert kept == {"schemas": [CORE, ext], "userName": "ada", "title": "Engineer",
                    "name": {"familyName": "Lovelace", "givenName": "Ada"}, ext: {"division": "R&D"}}  # fmt: skip
    assert paths == ["name.givenName", "title", f"{ext}:division"]
    assert patch_operations(applied, kept) == [{"op": "replace", "path": "name.familyName", "value": "Lovelace"}]


def test_keep_omitted_never_overrides_a_value_the_payload_has() -> None:
    kept, paths = keep_omitted({"title": "Engineer"}, {"title": "Lead"}, [("title",)])

    assert kept == {"title": "Lead"} and paths == []
    assert keep_omitted(None, {"userName": "ada"}, [("title",)]) == ({"userName": "ada"}, [])


# --- owed references ------------------------------------------------------------------------------


def test_an_attribute_whose_reference_does_not_resolve_is_owed_with_its_reference() -> None:
    payload = {**BEFORE, ENT: {"department": "Engineering", "manager": {"value": Ref("E1")}}}

    owed = owed_references(payload, lambda key: None)

    assert owed == {f"{ENT}:manager": {"value": Ref("E1")}}
    assert owed_references(payload, lambda key: "m-1") == {}
    assert loads(dumps(owed)) == owed, "a link stores it as JSON"


def test_owed_attributes_are_settled_when_every_reference_in_them_resolves() -> None:
    owed = {f"{ENT}:manager": {"value": Ref("E1")}, "x-buddies": [{"value": Ref("E1")}, {"value": Ref("E9")}]}

    resolved, still = settle_references(owed, {"E1": "m-1"}.get)

    assert resolved == {f"{ENT}:manager": {"value": "m-1"}}
    assert still == {"x-buddies": owed["x-buddies"]}
    assert settle_references(None, {"E1": "m-1"}.get) == ({}, {})


def test_with_paths_sets_attributes_where_flatten_names_them() -> None:
    applied = {"schemas": [CORE], "userName": "ada@example.com", "name": {"givenName": "Ada"}}

    out = with_paths(applied, {f"{ENT}:manager": {"value": "m-1"}, "name.familyName": "Lovelace", "title": "Countess"})

    assert out == {
        "schemas": [CORE, ENT],
        "userName": "ada@example.com",
        "name": {"givenName": "Ada", "familyName": "Lovelace"},
        "title": "Countess",
        ENT: {"manager": {"value": "m-1"}},
    }
    assert applied == {"schemas": [CORE], "userName": "ada@example.com", "name": {"givenName": "Ada"}}, "a copy"
