"""SCIM protocol steps without I/O: filter quoting, Retry-After, and responses turned into results or errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connectors import (
    AuthError,
    Conflict,
    InvalidResponse,
    NotFound,
    PermanentError,
    PreconditionFailed,
    ScimError,
    ScimRequest,
    TransientError,
    Unsupported,
    equals_filter,
    parse_retry_after,
    quote_filter_value,
)
from connectors._protocol import attribute_values, check_response, patch_body, resource_matches, resource_path

BASE = "https://scim.example.com/v2"
ERROR_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:Error"


# --- filters (RFC 7644 §3.4.2.2) ----------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("ada@example.com", id="plain"),
        pytest.param('o"brien@example.com', id="quote"),
        pytest.param("back\\slash", id="backslash"),
        pytest.param('x" or userName pr or "', id="injection"),
        pytest.param("tab\there\nnewline", id="control"),
        pytest.param("Zoë Ångström", id="unicode"),
    ],
)
def test_quoted_filter_value_is_a_json_string_that_reads_back_as_the_value(value: str) -> None:
    quoted = quote_filter_value(value)

    assert quoted.startswith('"') and quoted.endswith('"')
    assert json.loads(quoted) == value


def test_quotes_and_backslashes_are_escaped() -> None:
    assert quote_filter_value('a"b\\c') == '"a\\"b\\\\c"'


def test_a_quote_in_the_value_cannot_end_the_string() -> None:
    quoted = quote_filter_value('x" or userName pr or "')

    inner = quoted[1:-1]
    assert all(inner[i - 1] == "\\" for i, char in enumerate(inner) if char == '"')


def _string_literal_end(text: str, start: int) -> int:
    """Where the string literal opened at ``text[start]`` closes, read as a SCIM filter parser reads it.

    RFC 7644 §3.4.2.2: a compValue string is a JSON string (RFC 8259 §7): a backslash escapes
    the character after it, and the first unescaped quote ends the literal.
    """
    assert text[start] == '"'
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i
        i += 1
    raise AssertionError("the literal never closes")


@given(st.text(max_size=80))
def test_any_value_stays_inside_its_string_literal_and_reads_back_as_itself(value: str) -> None:
    """No value (quotes, backslashes, control characters, ' or ' clauses) can end the literal early."""
    text = equals_filter("userName", value)

    prefix = "userName eq "
    assert text.startswith(prefix)
    end = _string_literal_end(text, len(prefix))
    assert end == len(text) - 1  # nothing after the literal: no clause smuggled in
    assert json.loads(text[len(prefix):]) == value
    assert not any(ord(c) < 0x20 for c in text)  # control characters are escaped, never raw


def test_equals_filter_quotes_the_value() -> None:
    assert equals_filter("userName", 'o"brien') == 'userName eq "o\\"brien"'


@pytest.mark.parametrize(
    "attribute",
    ["userName", "emails.value", "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber"],
)
def test_equals_filter_accepts_attribute_paths(attribute: str) -> None:
    assert equals_filter(attribute, "x") == f'{attribute} eq "x"'


@pytest.mark.parametrize(
    "attribute",
    [
        pytest.param("userName eq \"x\" or userName", id="expression"),
        pytest.param("userName pr", id="space"),
        pytest.param("emails[type eq \"work\"]", id="value-path"),
        pytest.param("", id="empty"),
        pytest.param("user)Name", id="bracket"),
    ],
)
def test_equals_filter_rejects_anything_but_an_attribute_path(attribute: str) -> None:
    with pytest.raises(ValueError, match="not a SCIM attribute path"):
        equals_filter(attribute, "x")


# --- Retry-After (RFC 9110 §10.2.3) -------------------------------------------------------------


@pytest.mark.parametrize(("header", "seconds"), [("120", 120.0), ("0", 0.0), (" 7 ", 7.0)])
def test_retry_after_in_seconds(header: str, seconds: float) -> None:
    assert parse_retry_after(header) == seconds


def test_retry_after_as_an_http_date_is_measured_from_now() -> None:
    now = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
    header = format_datetime(now + timedelta(seconds=90), usegmt=True)

    assert parse_retry_after(header, now=now) == 90.0


def test_retry_after_as_a_date_in_the_past_is_zero() -> None:
    now = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)

    assert parse_retry_after("Sun, 01 Mar 2026 11:00:00 GMT", now=now) == 0.0


def test_retry_after_as_an_http_date_without_now_uses_the_clock() -> None:
    before = datetime.now(UTC)
    target = before.replace(microsecond=0) + timedelta(hours=1)

    seconds = parse_retry_after(format_datetime(target, usegmt=True))

    after = datetime.now(UTC)
    assert seconds is not None
    assert (target - after).total_seconds() <= seconds <= (target - before).total_seconds()


@pytest.mark.parametrize("header", [None, "", "soon", "-5", "1.5e3x"])
def test_unreadable_retry_after_is_none(header: str | None) -> None:
    assert parse_retry_after(header) is None


# --- responses ------------------------------------------------------------------------------------


def scim_error(status: int, scim_type: str | None = None, detail: str | None = None) -> bytes:
    body: dict[str, object] = {"schemas": [ERROR_SCHEMA], "status": str(status)}
    if scim_type:
        body["scimType"] = scim_type
    if detail:
        body["detail"] = detail
    return json.dumps(body).encode()


POST = ScimRequest("POST", "Users", body={"userName": "ada"}, needs_resource=True)


@pytest.mark.parametrize(
    ("status", "error_class", "scim_type", "detail"),
    [
        pytest.param(400, PermanentError, "invalidValue", "Field 'userName' is required", id="400"),
        pytest.param(401, AuthError, None, "Invalid token", id="401"),
        pytest.param(403, PermanentError, None, "Forbidden", id="403"),
        pytest.param(404, NotFound, None, "User 'x' not found", id="404"),
        pytest.param(409, Conflict, "uniqueness", "userName already in use", id="409"),
        pytest.param(412, PreconditionFailed, None, "version mismatch", id="412"),
        pytest.param(429, TransientError, "tooMany", "slow down", id="429"),
        pytest.param(500, TransientError, None, "database unavailable", id="500"),
        pytest.param(503, TransientError, None, "maintenance", id="503"),
        pytest.param(501, Unsupported, None, "PATCH with a value filter is not implemented", id="501"),
        pytest.param(405, Unsupported, None, "PUT not allowed", id="405"),
    ],
)
def test_error_status_raises_the_class_that_says_what_to_do_next(
    status: int, error_class: type[ScimError], scim_type: str | None, detail: str
) -> None:
    body = scim_error(status, scim_type, detail)

    with pytest.raises(ScimError) as raised:
        check_response(POST, BASE, status, {}, body)

    error = raised.value
    assert type(error) is error_class
    assert (error.status, error.scim_type, error.detail) == (status, scim_type, detail)
    assert error.request is not None
    assert (error.request.method, error.request.url) == ("POST", f"{BASE}/Users")
    assert error.response_body == body.decode()


@pytest.mark.parametrize(
    ("status", "family"),
    [(400, PermanentError), (404, PermanentError), (409, PermanentError), (412, PermanentError), (500, TransientError),
     (503, TransientError), (429, TransientError), (501, PermanentError), (405, PermanentError)],
)  # fmt: skip
def test_errors_group_by_what_the_engine_does_next(status: int, family: type[ScimError]) -> None:
    with pytest.raises(family):
        check_response(POST, BASE, status, {}, b"")


def test_error_without_a_scim_body_has_no_scim_type_or_detail() -> None:
    with pytest.raises(TransientError) as raised:
        check_response(POST, BASE, 502, {}, b"<html>Bad Gateway</html>")

    assert (raised.value.scim_type, raised.value.detail) == (None, None)
    assert "502" in str(raised.value)


def test_error_message_names_scim_type_and_detail() -> None:
    with pytest.raises(Conflict) as raised:
        check_response(POST, BASE, 409, {}, scim_error(409, "uniqueness", "userName taken"))

    assert "scimType=uniqueness" in str(raised.value)
    assert "userName taken" in str(raised.value)


def test_retry_after_is_carried_on_a_429() -> None:
    with pytest.raises(TransientError) as raised:
        check_response(POST, BASE, 429, {"retry-after": "30"}, b"")

    assert raised.value.retry_after == 30.0


def test_created_resource_gives_id_version_and_location() -> None:
    body = {"id": "abc", "userName": "ada", "meta": {"version": 'W/"1"'}}
    headers = {"location": f"{BASE}/Users/abc", "etag": 'W/"1"'}

    result = check_response(POST, BASE, 201, headers, json.dumps(body).encode())

    assert (result.status, result.id, result.version, result.location) == (201, "abc", 'W/"1"', f"{BASE}/Users/abc")
    assert result.resource == body


def test_version_falls_back_to_meta_version_without_an_etag_header() -> None:
    result = check_response(POST, BASE, 201, {}, b'{"id": "abc", "meta": {"version": "W/\\"7\\""}}')

    assert result.version == 'W/"7"'


def test_id_falls_back_to_the_location_header() -> None:
    result = check_response(POST, BASE, 201, {"location": f"{BASE}/Users/from-location"}, b"")

    assert result.id == "from-location"


@pytest.mark.parametrize(
    "body", [pytest.param(b'{"id": "abc", ', id="truncated"), pytest.param(b"<html>ok</html>", id="html")]
)
def test_success_status_with_a_body_that_is_not_json_is_an_invalid_response(body: bytes) -> None:
    with pytest.raises(InvalidResponse) as raised:
        check_response(POST, BASE, 201, {}, body)

    assert isinstance(raised.value, TransientError)
    assert raised.value.status == 201
    assert raised.value.response_body == body.decode()


def test_success_with_json_that_is_not_an_object_is_an_invalid_response() -> None:
    with pytest.raises(InvalidResponse):
        check_response(POST, BASE, 200, {}, b'["a", "b"]')


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        pytest.param(b'{"userName": "ada"}', {}, id="body-without-id"),
        pytest.param(b'{"userName": "ada", "id": ""}', {}, id="empty-id"),
        pytest.param(b'{"userName": "ada"}', {"location": f"{BASE}/Users/u1"}, id="body-without-id-but-location"),
        pytest.param(b"", {}, id="nothing-at-all"),
    ],
)
def test_create_answered_without_a_resource_id_is_an_invalid_response(body: bytes, headers: dict[str, str]) -> None:
    with pytest.raises(InvalidResponse, match="without a resource id"):
        check_response(POST, BASE, 201, headers, body)


def test_a_get_answered_with_another_resource_is_an_invalid_response() -> None:
    get = ScimRequest("GET", "Users/u1", needs_resource=True, resource_id="u1")

    with pytest.raises(InvalidResponse, match="another resource"):
        check_response(get, BASE, 200, {}, b'{"id": "u2", "userName": "it-admin"}')
    assert check_response(get, BASE, 200, {}, b'{"id": "u1"}').id == "u1"


def test_no_content_is_a_success_without_a_resource() -> None:
    result = check_response(ScimRequest("DELETE", "Users/abc"), BASE, 204, {}, b"")

    assert (result.status, result.resource) == (204, None)


def test_resource_id_is_quoted_so_it_stays_in_the_path() -> None:
    assert resource_path("Users", "../Groups/x?y") == "Users/..%2FGroups%2Fx%3Fy"
    assert resource_path("Users") == "Users"


def test_patch_body_is_a_patch_op_message() -> None:
    operations = [{"op": "replace", "path": "active", "value": False}]

    assert patch_body(operations) == {
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": operations,
    }


# --- what a lookup result must match (RFC 7643 §2.1, RFC 7644 §3.10) -------------------------------

ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
ADA = {
    "id": "u1",
    "userName": "Ada@Example.com",
    "externalId": "E-1",
    "active": True,
    "name": {"familyName": "Lovelace"},
    "emails": [{"value": "ada@work.example", "primary": True}, {"value": "ada@home.example"}],
    "groups": [{"value": "g1", "display": "Engineering"}],
    ENTERPRISE: {"employeeNumber": "701", "manager": {"value": "u0"}},
}


@pytest.mark.parametrize(
    ("attribute", "values"),
    [
        pytest.param("userName", ["Ada@Example.com"], id="top-level"),
        pytest.param("USERNAME", ["Ada@Example.com"], id="name-without-case"),
        pytest.param("name.familyName", ["Lovelace"], id="sub-attribute"),
        pytest.param("emails.value", ["ada@work.example", "ada@home.example"], id="multi-valued"),
        pytest.param("emails", ["ada@work.example", "ada@home.example"], id="multi-valued-value-implied"),
        pytest.param(f"{ENTERPRISE}:employeeNumber", ["701"], id="extension"),
        pytest.param(f"{ENTERPRISE}:manager.value", ["u0"], id="extension-sub-attribute"),
        pytest.param("urn:ietf:params:scim:schemas:core:2.0:User:userName", ["Ada@Example.com"], id="core-urn"),
        pytest.param("urn:example:custom:1.0:User:badge", [], id="absent-extension"),
        pytest.param("nickName", [], id="absent"),
        pytest.param("active", [True], id="boolean"),
    ],
)
def test_attribute_values_follow_the_attribute_path(attribute: str, values: list[object]) -> None:
    assert attribute_values(ADA, attribute) == values


@pytest.mark.parametrize(
    ("attribute", "value", "case_exact", "matches"),
    [
        pytest.param("userName", "ada@example.com", False, True, id="userName-without-case"),
        pytest.param("userName", "ada@example.com", True, False, id="case-exact-differs"),
        pytest.param("externalId", "E-1", True, True, id="externalId-exact"),
        pytest.param("externalId", "e-1", True, False, id="externalId-other-case"),
        pytest.param("emails.value", "ada@home.example", True, True, id="any-of-many"),
        pytest.param("userName", "it-admin@example.com", False, False, id="unrelated"),
        pytest.param("nickName", "", False, False, id="absent-never-matches-empty"),
        pytest.param("active", "true", True, True, id="boolean-by-json-text"),
        pytest.param(f"{ENTERPRISE}:employeeNumber", "701", True, True, id="extension"),
        pytest.param("name", "Lovelace", True, False, id="complex-without-value"),
    ],
)
def test_a_resource_matches_only_what_was_asked(attribute: str, value: str, case_exact: bool, matches: bool) -> None:
    assert resource_matches(ADA, attribute, value, case_exact=case_exact) is matches
