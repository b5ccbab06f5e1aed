"""The reaction tables: what each answer of a target means, as a matrix of named cases."""

from __future__ import annotations

from typing import Any

import pytest

from connectors import resource_matches

from provisioner.reactions import (
    MembersRead,
    Step,
    dropped,
    group_members,
    next_removal_form,
    on_member_removal,
    on_user_error,
    replace_all,
    unsupported_extensions,
    user_write_method,
    without_extensions,
    without_username,
)


@pytest.mark.parametrize(
    ("resource", "attribute", "value", "case_exact", "expected"),
    [
        pytest.param({"userName": "ada@x.com"}, "userName", "Ada@X.com", False, True, id="username-case-insensitive"),
        pytest.param({"userName": "it-admin"}, "userName", "ada@x.com", False, False, id="filter-ignored-other-user"),
        pytest.param({"displayName": "Administrators"}, "displayName", "all-staff", True, False, id="filter-ignored-other-group"),
        pytest.param({"displayName": "All-Staff"}, "displayName", "all-staff", True, False, id="displayname-exact"),
        pytest.param({"displayName": "all-staff"}, "displayName", "all-staff", True, True, id="displayname-same"),
        pytest.param({"id": "1"}, "userName", "ada", False, False, id="attribute-missing"),
    ],
)
def test_a_lookup_result_counts_only_if_it_matches(
    resource: dict[str, Any], attribute: str, value: str, case_exact: bool, expected: bool
) -> None:
    assert resource_matches(resource, attribute, value, case_exact=case_exact) is expected


@pytest.mark.parametrize(
    ("put", "patch", "knows_applied", "adopting", "expected"),
    [
        pytest.param(True, True, True, True, "put", id="adopt-put"),
        pytest.param(False, True, False, True, "patch", id="adopt-no-put"),
        pytest.param(True, True, True, False, "patch", id="update-diff"),
        pytest.param(True, False, True, False, "put", id="update-no-patch"),
        pytest.param(True, True, False, False, "put", id="update-applied-unknown"),
        pytest.param(False, False, False, False, "patch", id="update-no-put"),
    ],
)
def test_how_a_user_is_written(put: bool, patch: bool, knows_applied: bool, adopting: bool, expected: str) -> None:
    assert user_write_method(put=put, patch=patch, knows_applied=knows_applied, adopting=adopting) == expected


@pytest.mark.parametrize(
    ("method", "status", "scim_type", "adopting", "renames", "expected"),
    [
        pytest.param("put", 405, None, True, False, Step.USE_PATCH, id="put-405"),
        pytest.param("put", 501, None, False, False, Step.USE_PATCH, id="put-501"),
        pytest.param("put", 404, None, True, False, Step.USE_PATCH, id="adopt-put-404"),
        pytest.param("put", 404, None, False, False, Step.RAISE, id="update-put-404-is-gone"),
        pytest.param("patch", 501, None, False, False, Step.RAISE, id="patch-501-no-other-form"),
        pytest.param("patch", 400, "mutability", False, True, Step.DROP_USERNAME, id="rename-400-mutability"),
        pytest.param("put", 500, "mutability", False, True, Step.DROP_USERNAME, id="rename-500-mutability"),
        pytest.param("patch", 400, "mutability", False, False, Step.RAISE, id="mutability-without-rename"),
        pytest.param("patch", 400, "invalidValue", False, True, Step.RAISE, id="other-400"),
        pytest.param("put", 503, None, False, False, Step.RAISE, id="transient"),
    ],
)
def test_what_a_refused_user_write_means(
    method: Any, status: int, scim_type: str | None, adopting: bool, renames: bool, expected: Step
) -> None:
    assert on_user_error(method, status, scim_type, adopting=adopting, renames_username=renames) is expected


@pytest.mark.parametrize(
    ("form", "status", "scim_type", "still_there", "expected"),
    [
        pytest.param("filter", None, None, False, Step.DONE, id="removed"),
        pytest.param("filter", 501, None, False, Step.NEXT_FORM, id="filter-501"),
        pytest.param("filter", 405, None, False, Step.NEXT_FORM, id="filter-405"),
        pytest.param("filter", 400, "invalidPath", False, Step.NEXT_FORM, id="filter-400-names-the-form"),
        pytest.param("filter", 400, "noTarget", False, Step.RAISE, id="filter-400-notarget"),
        pytest.param("filter", None, None, True, Step.NEXT_FORM, id="filter-200-ignored"),
        pytest.param("list", None, None, True, Step.NEXT_FORM, id="list-200-ignored"),
        pytest.param("list", 501, None, False, Step.NEXT_FORM, id="list-501"),
        pytest.param("put", None, None, True, Step.GIVE_UP, id="put-200-ignored"),
        pytest.param("put", 501, None, False, Step.GIVE_UP, id="put-501"),
        pytest.param("list", 503, None, False, Step.RAISE, id="transient"),
    ],
)
def test_what_a_member_removal_answer_means(
    form: Any, status: int | None, scim_type: str | None, still_there: bool, expected: Step
) -> None:
    assert on_member_removal(form, status, scim_type, still_there) is expected


def test_removal_forms_go_filter_then_list_then_put() -> None:
    assert [next_removal_form("filter"), next_removal_form("list"), next_removal_form("put")] == ["list", "put", None]


@pytest.mark.parametrize(
    ("resource", "asked", "expected"),
    [
        pytest.param({"members": []}, (), MembersRead.REPORTED, id="empty-is-reported"),
        pytest.param({"members": [{"value": "1"}]}, (), MembersRead.REPORTED, id="reported"),
        pytest.param({"displayName": "g"}, (), MembersRead.ASK_ATTRIBUTES, id="not-reported"),
        pytest.param({"displayName": "g"}, ("attributes",), MembersRead.ASK_FILTER, id="still-not-reported"),
        pytest.param(None, ("attributes", "filter"), MembersRead.TRUST_STATE, id="no-way"),
    ],
)
def test_a_group_read_without_members_is_not_empty(
    resource: dict[str, Any] | None, asked: tuple[str, ...], expected: MembersRead
) -> None:
    assert group_members(resource, asked) is expected


ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"


@pytest.mark.parametrize(
    ("sent", "stored", "expected"),
    [
        pytest.param({"userName": "a", "title": "Eng"}, {"userName": "a", "title": "Eng"}, [], id="all-stored"),
        pytest.param({"userName": "a", "title": "Eng"}, {"userName": "a"}, ["title"], id="title-dropped"),
        pytest.param({"userName": "a", "title": "Eng"}, None, [], id="no-body"),
        pytest.param({"userName": "A"}, {"username": "a"}, [], id="normalised-not-lost"),
        pytest.param({"password": "x", "schemas": ["s"]}, {}, [], id="never-returned"),
        pytest.param({"name": {"givenName": "A", "familyName": "B"}}, {"name": {"givenName": "A"}},
                     ["name.familyName"], id="sub-attribute"),  # fmt: skip
        pytest.param({ENTERPRISE: {"department": "R&D"}}, {}, [ENTERPRISE], id="extension"),
        pytest.param({"title": None, "phone": ""}, {}, [], id="nothing-sent"),
    ],
)
def test_what_the_target_did_not_store(sent: dict[str, Any], stored: dict[str, Any] | None, expected: list[str]) -> None:
    assert dropped(sent, stored) == expected


def test_without_a_put_every_attribute_is_a_patch_replace() -> None:
    assert replace_all({"schemas": ["s"], "userName": "a", "active": True}) == [
        {"op": "replace", "path": "userName", "value": "a"},
        {"op": "replace", "path": "active", "value": True},
    ]


def test_a_refused_rename_keeps_the_rest_of_the_change() -> None:
    ops = [{"op": "replace", "path": "userName", "value": "new"}, {"op": "replace", "path": "title", "value": "T"}]
    kept_ops, body = without_username(ops, {"userName": "new", "title": "T"}, "old")
    assert kept_ops == [{"op": "replace", "path": "title", "value": "T"}]
    assert body == {"title": "T", "userName": "old"}


@pytest.mark.parametrize(
    ("listed", "expected"),
    [
        pytest.param(None, [], id="target-did-not-say"),
        pytest.param({ENTERPRISE}, [], id="listed"),
        pytest.param(set(), [ENTERPRISE], id="not-listed"),
    ],
)
def test_an_extension_the_target_does_not_list_is_held_back(listed: set[str] | None, expected: list[str]) -> None:
    payload = {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User", ENTERPRISE], "userName": "a",
               ENTERPRISE: {"department": "R&D"}}  # fmt: skip
    supports = None if listed is None else listed.__contains__
    assert unsupported_extensions(payload, supports) == expected
    assert without_extensions(payload, expected).get(ENTERPRISE) == (None if expected else {"department": "R&D"})
    assert ENTERPRISE in without_extensions(payload, expected)["schemas"] or expected
