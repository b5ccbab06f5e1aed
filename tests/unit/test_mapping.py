"""Mappings: YAML that turns an identity record into a SCIM User, and the errors that point at file:line."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from provisioner.errors import ConfigError
from provisioner.mapping import AttributeMapping, MappingError, Ref, load_mapping

CORE = "urn:ietf:params:scim:schemas:core:2.0:User"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"

RECORD = {
    "employee_id": "E1001",
    "first_name": "Ada",
    "last_name": "Lovelace",
    "email": "Ada.Lovelace@Example.com",
    "phone": "+44 20 7946 0001",
    "department": "Engineering",
    "manager_id": "E1000",
    "status": "active",
}


def write(tmp_path: Path, text: str, name: str = "users.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def compile_mapping(tmp_path: Path, text: str) -> AttributeMapping:
    return load_mapping(write(tmp_path, text))


def line_of(path: Path, needle: str) -> int:
    """The 1-based line of ``path`` that contains ``needle``."""
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if needle in text:
            return number
    raise AssertionError(f"{needle!r} is not in {path}")


def render(tmp_path: Path, attributes: str, record: dict[str, Any] = RECORD, **top: str) -> dict[str, Any]:
    header = "".join(f"{key}: {value}\n" for key, value in top.items())
    body = textwrap.indent(textwrap.dedent(attributes), "  ")
    return compile_mapping(tmp_path, f"{header}attributes:\n{body}").render(record).payload


# --- the four kinds of value --------------------------------------------------------------------


def test_column_name_takes_the_record_value_as_it_is(tmp_path: Path) -> None:
    payload = render(tmp_path, "userName: email\nexternalId: employee_id\n")

    assert payload["userName"] == "Ada.Lovelace@Example.com"
    assert payload["externalId"] == "E1001"


def test_expression_is_evaluated_with_columns_as_variables(tmp_path: Path) -> None:
    payload = render(tmp_path, "userName: email | lower\nnickName: first_name ~ '-' ~ employee_id\n")

    assert payload["userName"] == "ada.lovelace@example.com"
    assert payload["nickName"] == "Ada-E1001"


def test_template_renders_to_a_string(tmp_path: Path) -> None:
    payload = render(tmp_path, 'userName: email\ndisplayName: "{{ first_name }} {{ last_name | upper }}"\n')

    assert payload["displayName"] == "Ada LOVELACE"


def test_quoted_string_expression_is_a_literal(tmp_path: Path) -> None:
    payload = render(tmp_path, "userName: email\nuserType: \"'Employee'\"\n")

    assert payload["userType"] == "Employee"


def test_yaml_boolean_is_a_boolean_and_a_number_in_a_text_attribute_is_its_text(tmp_path: Path) -> None:
    """RFC 7643 §4.1 makes ``display`` text: the literal 42 is sent as "42", not as a JSON number."""
    payload = render(tmp_path, "userName: email\nemails:\n  - value: email\n    primary: true\n    display: 42\n")

    assert payload["emails"] == [{"value": "Ada.Lovelace@Example.com", "primary": True, "display": "42"}]


def test_nested_core_and_enterprise_attributes(tmp_path: Path) -> None:
    payload = render(
        tmp_path,
        f"""\
        userName: email
        name:
          givenName: first_name
          familyName: last_name
        {ENTERPRISE}:
          department: department
          employeeNumber: employee_id
        """,
    )

    assert payload["name"] == {"givenName": "Ada", "familyName": "Lovelace"}
    assert payload[ENTERPRISE] == {"department": "Engineering", "employeeNumber": "E1001"}


@pytest.mark.parametrize(
    ("extra", "schemas"),
    [
        pytest.param("", [CORE], id="core-only"),
        pytest.param(f"{ENTERPRISE}:\n  department: department\n", [CORE, ENTERPRISE], id="enterprise"),
        pytest.param(
            f"{ENTERPRISE}:\n  department: department\nurn:example:params:scim:schemas:Acme:2.0:User:\n  badge: employee_id\n",
            [CORE, ENTERPRISE, "urn:example:params:scim:schemas:Acme:2.0:User"],
            id="custom-extension",
        ),
    ],
)
def test_schemas_are_derived_from_the_attributes_used(tmp_path: Path, extra: str, schemas: list[str]) -> None:
    payload = render(tmp_path, "userName: email\n" + extra)

    assert sorted(payload["schemas"]) == sorted(schemas)


def test_extension_whose_values_are_all_empty_is_not_in_schemas(tmp_path: Path) -> None:
    payload = render(tmp_path, f"userName: email\n{ENTERPRISE}:\n  costCenter: cost_center\n", {**RECORD, "cost_center": ""})

    assert ENTERPRISE not in payload
    assert payload["schemas"] == [CORE]


def test_rendered_user_is_active(tmp_path: Path) -> None:
    assert render(tmp_path, "userName: email\n")["active"] is True


# --- empty values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("empty", [pytest.param("", id="empty-string"), pytest.param(None, id="null")])
def test_empty_values_leave_the_attribute_out(tmp_path: Path, empty: Any) -> None:
    payload = render(
        tmp_path,
        "userName: email\ntitle: title\nname:\n  givenName: title\n  familyName: title\n",
        {**RECORD, "title": empty},
    )

    assert "title" not in payload
    assert "name" not in payload


def test_phone_number_item_without_a_value_is_dropped(tmp_path: Path) -> None:
    attributes = "userName: email\nphoneNumbers:\n  - value: phone\n    type: \"'work'\"\n  - value: mobile\n    type: \"'mobile'\"\n"

    payload = render(tmp_path, attributes, {**RECORD, "phone": "", "mobile": "+1 555 0100"})

    assert payload["phoneNumbers"] == [{"value": "+1 555 0100", "type": "mobile"}]


def test_multi_valued_attribute_with_no_item_left_is_dropped(tmp_path: Path) -> None:
    payload = render(tmp_path, "userName: email\nphoneNumbers:\n  - value: phone\n    type: \"'work'\"\n", {**RECORD, "phone": ""})

    assert "phoneNumbers" not in payload


def test_a_compiled_mapping_keeps_nothing_from_the_previous_record(tmp_path: Path) -> None:
    mapping = compile_mapping(tmp_path, "attributes:\n  userName: email | lower\n  title: \"title | default('')\"\n")

    first = mapping.render({**RECORD, "title": "Countess"}).payload
    second = mapping.render({"email": "Grace@Example.com"}).payload

    assert first["title"] == "Countess"
    assert second["userName"] == "grace@example.com"
    assert "title" not in second


# --- scope and leavers ----------------------------------------------------------------------------


SCOPED = """\
scope: "department != 'Contractors'"
leaver_when: "status == 'terminated'"
attributes:
  userName: email
  title: "title | int + 1"
"""


@pytest.mark.parametrize(
    ("record", "in_scope", "leaver"),
    [
        pytest.param({**RECORD, "title": "1"}, True, False, id="in-scope"),
        pytest.param({**RECORD, "department": "Contractors"}, False, False, id="out-of-scope"),
        pytest.param({**RECORD, "status": "terminated"}, True, True, id="terminated"),
    ],
)
def test_scope_and_leaver_when_decide_who_has_an_account(
    tmp_path: Path, record: dict[str, Any], in_scope: bool, leaver: bool
) -> None:
    rendered = compile_mapping(tmp_path, SCOPED).render(record)

    assert (rendered.in_scope, rendered.leaver) == (in_scope, leaver)
    assert bool(rendered.payload) == (in_scope and not leaver)


def test_attributes_of_a_record_out_of_scope_are_not_evaluated(tmp_path: Path) -> None:
    """``title | int + 1`` would fail on 'Engineer'; for a contractor it is never computed."""
    rendered = compile_mapping(tmp_path, SCOPED).render({**RECORD, "title": "Engineer", "department": "Contractors"})

    assert rendered.payload == {}


# --- ref() ----------------------------------------------------------------------------------------


def test_ref_names_another_identity(tmp_path: Path) -> None:
    payload = render(tmp_path, f"userName: email\n{ENTERPRISE}:\n  manager:\n    value: ref(manager_id)\n")

    assert payload[ENTERPRISE]["manager"]["value"] == Ref("E1000")


def test_ref_of_an_empty_key_leaves_the_manager_out(tmp_path: Path) -> None:
    payload = render(
        tmp_path,
        f"userName: email\n{ENTERPRISE}:\n  department: department\n  manager:\n    value: ref(manager_id)\n",
        {**RECORD, "manager_id": ""},
    )

    assert payload[ENTERPRISE] == {"department": "Engineering"}


# --- errors at load time: file:line and the attribute ---------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "needle", "message"),
    [
        pytest.param("userName: email\ntitel: title\n", "titel:", "did you mean 'title'", id="core"),
        pytest.param("userName: email\nname:\n  givenNme: first_name\n", "givenNme:", "did you mean 'givenName'", id="name"),
        pytest.param(
            f"userName: email\n{ENTERPRISE}:\n  departmnet: department\n", "departmnet:", "did you mean 'department'",
            id="enterprise",
        ),
    ],
)  # fmt: skip
def test_unknown_attribute_names_file_line_and_suggests_the_closest(
    tmp_path: Path, attributes: str, needle: str, message: str
) -> None:
    path = write(tmp_path, "attributes:\n" + textwrap.indent(attributes, "  "))

    with pytest.raises(ConfigError) as raised:
        load_mapping(path)

    assert f"{path}:{line_of(path, needle)}:" in str(raised.value)
    assert needle.rstrip(":") in str(raised.value)
    assert message in str(raised.value)


def test_unknown_top_level_key_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "scope: 'true'\natributes:\n  userName: email\n")

    with pytest.raises(ConfigError) as raised:
        load_mapping(path)

    assert f"{path}:2:" in str(raised.value)
    assert "did you mean 'attributes'" in str(raised.value)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        pytest.param('"{{ first_name "', "displayName", id="unclosed-template"),
        pytest.param("first_name |", "displayName", id="dangling-filter"),
        pytest.param("\"first_name + \"", "displayName", id="dangling-operator"),
        pytest.param('"{% if x %}"', "displayName", id="unclosed-block"),
    ],
)
def test_invalid_jinja_syntax_names_file_line_and_attribute(tmp_path: Path, value: str, needle: str) -> None:
    path = write(tmp_path, f"attributes:\n  userName: email\n  displayName: {value}\n")

    with pytest.raises(ConfigError) as raised:
        load_mapping(path)

    assert str(raised.value).startswith(f"{path}:3:")
    assert "'displayName'" in str(raised.value)
    assert "invalid expression" in str(raised.value)


@pytest.mark.parametrize("attribute", ["active", "schemas", "id", "meta", "groups"])
def test_attributes_the_engine_or_target_own_cannot_be_mapped(tmp_path: Path, attribute: str) -> None:
    path = write(tmp_path, f"attributes:\n  userName: email\n  {attribute}: title\n")

    with pytest.raises(ConfigError, match=rf"^{path}:3:3: attribute '{attribute}' cannot be mapped"):
        load_mapping(path)


def test_user_name_is_required(tmp_path: Path) -> None:
    path = write(tmp_path, "attributes:\n  title: title\n")

    with pytest.raises(ConfigError, match="'userName' is required"):
        load_mapping(path)


def test_match_must_be_a_mapped_attribute(tmp_path: Path) -> None:
    path = write(tmp_path, "match: externalId\nattributes:\n  userName: email\n")

    with pytest.raises(ConfigError, match=rf"^{path}:1:8: match 'externalId'"):
        load_mapping(path)


def test_a_non_user_resource_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "resource: Group\nattributes:\n  userName: email\n")

    with pytest.raises(ConfigError, match=rf"^{path}:1:11: resource 'Group'"):
        load_mapping(path)


def test_empty_value_in_the_mapping_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "attributes:\n  userName: email\n  title:\n")

    with pytest.raises(ConfigError, match=rf"^{path}:3:9: attribute 'title'"):
        load_mapping(path)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "attributes:\n  userName: email\n  title: [unclosed\n")

    with pytest.raises(ConfigError, match=rf"^{path}:\d+:\d+: invalid YAML"):
        load_mapping(path)


def test_duplicate_attribute_names_the_second_line(tmp_path: Path) -> None:
    path = write(tmp_path, "attributes:\n  userName: email\n  title: title\n  title: department\n")

    with pytest.raises(ConfigError, match=rf"^{path}:4: duplicate key 'title'"):
        load_mapping(path)


def test_missing_columns_lists_the_columns_read_by_name(tmp_path: Path) -> None:
    mapping = compile_mapping(tmp_path, "attributes:\n  userName: email | lower\n  title: title\n  externalId: employee_id\n")

    assert mapping.missing_columns({"email", "employee_id"}) == ["title"]


# --- errors at render time: MappingError naming file:line and the attribute -----------------------


def test_record_missing_a_column_names_file_line_attribute_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "attributes:\n  userName: email\n  title: title\n")
    record = {k: v for k, v in RECORD.items() if k != "email"}

    with pytest.raises(MappingError) as raised:
        load_mapping(path).render({**record, "title": "x"})

    assert str(raised.value).startswith(f"{path}:2:13: attribute 'userName'")
    assert "'email'" in str(raised.value)


def test_expression_on_a_missing_variable_names_its_attribute(tmp_path: Path) -> None:
    path = write(tmp_path, "attributes:\n  userName: email | lower\n  title: title\n")

    with pytest.raises(MappingError) as raised:
        load_mapping(path).render({"title": "x"})

    assert str(raised.value).startswith(f"{path}:2:13: attribute 'userName'")
    assert "email" in str(raised.value)


def test_failing_expression_names_its_own_attribute_not_another(tmp_path: Path) -> None:
    path = write(tmp_path, "attributes:\n  userName: email | lower\n  displayName: first_name\n  title: \"title | int + 'x'\"\n")

    with pytest.raises(MappingError) as raised:
        load_mapping(path).render({**RECORD, "title": "3"})

    assert str(raised.value).startswith(f"{path}:4:10: attribute 'title'")


# --- the sandbox ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression",
    [
        pytest.param("\"''.__class__.__mro__\"", id="attribute-chain"),
        pytest.param("\"{{ ''.__class__ }}\"", id="in-a-template"),
        pytest.param("\"email.__class__.__base__.__subclasses__()\"", id="subclasses"),
        pytest.param("\"''.__class__\"", id="dunder-of-a-literal"),
        pytest.param("\"email.__class__\"", id="dunder-of-a-column"),
        pytest.param("\"email | attr('__class__')\"", id="attr-filter"),
    ],
)
def test_sandbox_refuses_python_internals_as_a_mapping_error(tmp_path: Path, expression: str) -> None:
    path = write(tmp_path, f"attributes:\n  userName: email\n  title: {expression}\n")

    with pytest.raises(MappingError) as raised:
        load_mapping(path).render(RECORD)

    assert str(raised.value).startswith(f"{path}:3:10: attribute 'title'")
    assert "unsafe" in str(raised.value)


def test_sandbox_refuses_to_change_a_record_value(tmp_path: Path) -> None:
    """The environment is immutable: ``list.append`` on a record value is refused."""
    path = write(tmp_path, "attributes:\n  userName: email\n  title: \"groups.append('admins') or 'x'\"\n")
    groups = ["staff"]

    with pytest.raises(MappingError, match=rf"^{path}:3:10: attribute 'title'"):
        load_mapping(path).render({**RECORD, "groups": groups})

    assert groups == ["staff"]


@pytest.mark.parametrize(
    ("expression", "name", "column"),
    [pytest.param("email | lowr", "lowr", 21, id="filter"), pytest.param("email is emial", "emial", 22, id="test")],
)
def test_unknown_filter_or_test_is_a_config_error_at_load(tmp_path: Path, expression: str, name: str, column: int) -> None:
    """Caught when the mapping is loaded (``provisioner check``), not record by record."""
    path = write(tmp_path, f"attributes:\n  userName: {expression}\n")

    with pytest.raises(ConfigError) as raised:
        load_mapping(path)

    assert str(raised.value).startswith(f"{path}:2:{column}: attribute 'userName': unknown")
    assert name in str(raised.value)


# --- YAML that means something else ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "path", "expected"),
    [
        pytest.param("locale: NO", ("locale",), "NO", id="yaml-1.1-boolean"),
        pytest.param("externalId: 0123", ("externalId",), "0123", id="yaml-1.1-octal"),
        pytest.param("title: 1_000", ("title",), "1_000", id="underscored-number"),
        pytest.param("nickName: 2024-01-01", ("nickName",), "2024-01-01", id="date"),
        pytest.param("timezone: 1:30", ("timezone",), "1:30", id="sexagesimal"),
        pytest.param(f"{ENTERPRISE}:\n  costCenter: 0042", (ENTERPRISE, "costCenter"), "0042", id="enterprise"),
    ],
)  # fmt: skip
def test_literal_in_a_text_attribute_keeps_its_text(
    tmp_path: Path, attributes: str, path: tuple[str, ...], expected: str
) -> None:
    payload: Any = render(tmp_path, f"userName: email\n{attributes}\n")

    for name in path:
        payload = payload[name]
    assert payload == expected


@pytest.mark.parametrize(
    ("value", "needle"),
    [pytest.param("yes", "expected true or false, not yes", id="yes"),
     pytest.param("NO", "expected true or false, not NO", id="NO"),
     pytest.param("1", "expected true or false, not 1", id="number")],
)  # fmt: skip
def test_boolean_attribute_takes_only_true_or_false(tmp_path: Path, value: str, needle: str) -> None:
    path = write(tmp_path, f"attributes:\n  userName: email\n  emails:\n    - value: email\n      primary: {value}\n")

    with pytest.raises(ConfigError) as raised:
        load_mapping(path)

    assert str(raised.value) == f"{path}:5:16: attribute 'emails[0].primary': {needle}"


def test_yaml_1_1_only_number_in_a_custom_extension_is_refused_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "attributes:\n  userName: email\n  urn:example:params:scim:schemas:Badge:\n    floor: 0123\n")

    with pytest.raises(ConfigError) as raised:
        load_mapping(path)

    message = str(raised.value)
    assert message.startswith(f"{path}:4:12: attribute 'urn:example:params:scim:schemas:Badge:floor': 0123 reads as 83")
    assert "'0123'" in message


def test_plain_number_in_a_custom_extension_stays_a_number(tmp_path: Path) -> None:
    payload = render(tmp_path, "userName: email\nurn:example:params:scim:schemas:Badge:\n  floor: 12\n")

    assert payload["urn:example:params:scim:schemas:Badge"] == {"floor": 12}


@pytest.mark.parametrize(
    "value", ["!!python/name:os.system x", "!!python/object/apply:os.system ['id']", "!custom x", "!!binary aGk="]
)
def test_yaml_tags_are_refused_with_file_and_line(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"attributes:\n  userName: email\n  title: {value}\n")

    with pytest.raises(ConfigError) as raised:
        load_mapping(path)

    assert str(raised.value).startswith(f"{path}:3: the YAML tag '")
    assert "is not allowed" in str(raised.value)


def test_alias_bomb_fails_fast_naming_the_file(tmp_path: Path) -> None:
    """Nine levels of nine aliases (a 342-byte file) would expand to 387 million values."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    path = write(tmp_path, "\n".join(lines) + "\nattributes:\n  userName: email\n")

    with pytest.raises(ConfigError, match="expands to more than 100000 values") as raised:
        load_mapping(path)

    assert str(raised.value).startswith(f"{path}:")


def test_alias_that_contains_itself_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "loop: &a [*a]\nattributes:\n  userName: email\n")

    with pytest.raises(ConfigError, match="an alias refers to a value that contains it"):
        load_mapping(path)


def test_deep_nesting_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "attributes: " + "[" * 5000 + "]" * 5000 + "\n")

    with pytest.raises(ConfigError, match="nested too deeply|invalid YAML"):
        load_mapping(path)


# --- one bad record fails alone ---------------------------------------------------------------------


@pytest.mark.parametrize("blank", [pytest.param("   ", id="spaces"), pytest.param("\t \n", id="tab-newline")])
def test_blank_user_name_is_a_mapping_error_not_a_request(tmp_path: Path, blank: str) -> None:
    mapping = compile_mapping(tmp_path, "attributes:\n  userName: email\n")

    with pytest.raises(MappingError, match="attribute 'userName': is required but the record gives it only blanks"):
        mapping.render({**RECORD, "email": blank})


def test_undefined_column_inside_a_list_names_the_attribute_and_column(tmp_path: Path) -> None:
    """StrictUndefined raises only when used: stored in a list it reached the JSON encoder."""
    mapping = compile_mapping(
        tmp_path, "attributes:\n  userName: email\n  emails: \"[{'value': email, 'display': nick}]\"\n"
    )

    with pytest.raises(MappingError) as raised:
        mapping.render(RECORD)

    assert str(raised.value) == f"{tmp_path / 'users.yaml'}:3:11: attribute 'emails': the record has no column 'nick'"


@pytest.mark.parametrize(
    ("expression", "needle"),
    [pytest.param("range(3)", "gives a range"), pytest.param("email.lower", "gives a"),
     pytest.param("status | float", "not a number JSON can carry")],
)  # fmt: skip
def test_value_that_is_not_json_is_a_mapping_error(tmp_path: Path, expression: str, needle: str) -> None:
    mapping = compile_mapping(tmp_path, f'attributes:\n  userName: email\n  title: "{expression}"\n')

    with pytest.raises(MappingError, match="attribute 'title': .*" + needle):
        mapping.render({**RECORD, "status": "inf"})


@pytest.mark.parametrize(
    "expression",
    [pytest.param("'x' * 10**8", id="repeat"), pytest.param("[1] * 10**8", id="list"),
     pytest.param("2 ** 100000", id="power"), pytest.param("'%0100000000d' % 1", id="format")],
)  # fmt: skip
def test_huge_value_is_refused_before_it_is_built(tmp_path: Path, expression: str) -> None:
    mapping = compile_mapping(tmp_path, f'attributes:\n  userName: email\n  title: "{expression}"\n')

    with pytest.raises(MappingError, match="attribute 'title': OverflowError"):
        mapping.render(RECORD)


@pytest.mark.parametrize("value", [pytest.param("notes", id="column"), pytest.param("notes | upper", id="expression")])
def test_value_longer_than_the_cap_is_a_mapping_error(tmp_path: Path, value: str) -> None:
    mapping = compile_mapping(tmp_path, f"attributes:\n  userName: email\n  title: {value}\n")

    with pytest.raises(MappingError, match="attribute 'title': the value is longer than 100000 characters"):
        mapping.render({**RECORD, "notes": "x" * 200_000})


def test_nested_range_loops_end_on_the_range_budget(tmp_path: Path) -> None:
    template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"
    mapping = compile_mapping(tmp_path, f'attributes:\n  userName: email\n  title: "{template}"\n')

    with pytest.raises(MappingError, match="attribute 'title': OverflowError: range\\(\\) calls of one record"):
        mapping.render(RECORD)


def test_the_range_budget_is_per_record(tmp_path: Path) -> None:
    template = "{% for i in range(60000) %}{% endfor %}x"
    mapping = compile_mapping(tmp_path, f'attributes:\n  userName: email\n  title: "{template}"\n')

    assert [mapping.render(RECORD).payload["title"] for _ in range(3)] == ["x", "x", "x"]


def test_expressions_that_run_too_long_are_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loops over a record's own text use no range(): the time limit stops them (main thread only)."""
    monkeypatch.setattr("provisioner.mapping.TIME_LIMIT", 0.2)
    template = "{% for a in email %}{% for b in email %}{% for c in email %}{% endfor %}{% endfor %}{% endfor %}x"
    mapping = compile_mapping(tmp_path, f'attributes:\n  userName: email\n  title: "{template}"\n')

    with pytest.raises(MappingError, match="ran longer than 0.2 s on this record"):
        mapping.render({**RECORD, "email": "a" * 2000 + "@x"})
    assert mapping.render(RECORD).payload["title"] == "x"


@pytest.mark.parametrize(
    ("expression", "volatile"),
    [
        pytest.param("email | lower", False, id="filter-of-a-column"),
        pytest.param("'{{ email }}-{{ now() }}'", True, id="now-in-a-template"),
        pytest.param("lipsum(1)", True, id="lipsum"),
        pytest.param("[email, first_name] | random", True, id="random-filter"),
    ],
)
def test_a_mapping_whose_render_the_record_alone_does_not_decide_is_volatile(
    tmp_path: Path, expression: str, volatile: bool
) -> None:
    mapping = compile_mapping(tmp_path, f'attributes:\n  userName: email\n  title: "{expression}"\n')

    assert mapping.volatile is volatile
