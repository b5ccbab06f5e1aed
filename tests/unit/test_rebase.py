"""After a 412: the PATCH that makes the fresh resource hold the desired state, on the attributes we own."""

from __future__ import annotations

import pytest

from provisioner.rebase import holds, rebase_operations

ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
DESIRED = {
    "userName": "ada@example.com",
    "displayName": "Ada Lovelace",
    "name": {"givenName": "Ada", "familyName": "Lovelace"},
    "emails": [{"value": "ada@example.com", "type": "work", "primary": True}],
    ENTERPRISE: {"department": "Board", "manager": {"value": "m1"}},
    "active": False,
}


def fresh(**changes: object) -> dict[str, object]:
    """The resource as a target returns it: our values, plus what the target adds."""
    resource: dict[str, object] = {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User", ENTERPRISE],
        "id": "u1",
        "meta": {"version": 'W/"7"'},
        "userName": "ada@example.com",
        "displayName": "Ada Lovelace",
        "nickName": "set by someone else",
        "name": {"givenName": "Ada", "familyName": "Lovelace", "formatted": "Ada Lovelace"},
        "emails": [{"value": "ada@example.com", "type": "work", "primary": True}],
        ENTERPRISE: {"department": "Board", "manager": {"value": "m1", "$ref": "../Users/m1", "displayName": "M"}},
        "active": False,
    }
    resource.update(changes)
    return resource


def test_a_resource_that_holds_the_desired_state_needs_nothing() -> None:
    assert rebase_operations(DESIRED, fresh()) == []


def test_a_concurrent_change_to_an_owned_attribute_is_undone_with_ours() -> None:
    operations = rebase_operations(DESIRED, fresh(displayName="Someone Else", active=True))

    assert operations == [
        {"op": "replace", "path": "active", "value": False},
        {"op": "replace", "path": "displayName", "value": "Ada Lovelace"},
    ]


def test_an_owned_attribute_the_desired_state_leaves_empty_is_removed_and_others_are_left_alone() -> None:
    desired = {k: v for k, v in DESIRED.items() if k != "emails"}

    operations = rebase_operations(desired, fresh(), owned=["emails", "title"])

    assert operations == [{"op": "remove", "path": "emails"}], "nickName is someone else's; title is empty already"


def test_sub_attributes_are_compared_one_by_one() -> None:
    changed = fresh(**{ENTERPRISE: {"department": "Sales", "manager": {"value": "m2"}}})

    operations = rebase_operations(DESIRED, changed)

    assert operations == [
        {"op": "replace", "path": f"{ENTERPRISE}:department", "value": "Board"},
        {"op": "replace", "path": f"{ENTERPRISE}:manager", "value": {"value": "m1"}},
    ]


@pytest.mark.parametrize(
    ("have", "want", "expected"),
    [
        pytest.param([{"value": "b"}, {"value": "a", "x": 1}], [{"value": "a"}, {"value": "b"}], True, id="order-and-extras"),
        pytest.param([{"value": "a"}], [{"value": "a"}, {"value": "b"}], False, id="one-missing"),
        pytest.param([{"value": "a"}, {"value": "a"}], [{"value": "a"}, {"value": "b"}], False, id="each-matched-once"),
        pytest.param({"value": "m1"}, {"value": "m1", "displayName": "M"}, False, id="a-wanted-sub-attribute-missing"),
        pytest.param(None, "x", False, id="absent"),
        pytest.param(True, True, True, id="simple"),
    ],
)
def test_holds(have: object, want: object, expected: bool) -> None:
    assert holds(have, want) is expected
