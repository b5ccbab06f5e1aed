"""``extends:``: a mapping that starts from another one, overrides, adds and removes attributes."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from provisioner.errors import ConfigError
from provisioner.mapping import compile_mapping, load_mapping

ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
RECORD = {"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace", "title": "Engineer",
          "department": "Engineering", "employee_id": "E1", "status": "active"}  # fmt: skip


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


BASE = f"""
    scope: "status == 'active'"
    attributes:
      userName: email
      name:
        givenName: first_name
        familyName: last_name
      title: title
      {ENTERPRISE}:
        department: department
        employeeNumber: employee_id
    """


def test_a_child_overrides_adds_and_removes_attributes_and_extension_attributes_one_by_one(tmp_path: Path) -> None:
    write(tmp_path, "shared/users.yaml", BASE)
    child = write(tmp_path, "app.yaml", f"""
        extends: shared/users.yaml
        attributes:
          title: null
          Name:
            givenName: "first_name | upper"
          nickName: first_name
          {ENTERPRISE}:
            department: "department | lower"
        """)

    payload = load_mapping(child).render(RECORD).payload

    assert "title" not in payload
    assert payload["Name"] == {"givenName": "ADA"}  # a complex attribute is replaced whole, whatever its case
    assert "name" not in payload
    assert payload["nickName"] == "Ada"
    assert payload[ENTERPRISE] == {"department": "engineering", "employeeNumber": "E1"}
    assert payload["userName"] == "ada@example.com"


def test_chains_are_followed_and_each_level_keeps_what_it_does_not_override(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    write(tmp_path, "middle.yaml", "extends: base.yaml\nattributes:\n  displayName: \"{{ first_name }} {{ last_name }}\"\n")
    child = write(tmp_path, "child.yaml", "extends: middle.yaml\nscope: null\nattributes:\n  title: \"'Staff'\"\n")

    mapping = load_mapping(child)

    payload = mapping.render({**RECORD, "status": "gone"}).payload  # scope: null drops the base's rule
    assert payload["displayName"] == "Ada Lovelace"
    assert payload["title"] == "Staff"
    assert payload["name"] == {"givenName": "Ada", "familyName": "Lovelace"}


def test_a_mistake_is_positioned_in_the_file_that_writes_it(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE.replace("title: title", "title: \"title |\""))
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nattributes:\n  nickNme: first_name\n")

    _mapping, found = compile_mapping(child)

    assert [str(d).split(": ")[0] for d in found] == [f"{tmp_path}/base.yaml:7:10", f"{tmp_path}/child.yaml:3:3"]


def test_an_override_hides_the_base_mistake_it_replaces(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE.replace("title: title", "title: \"title |\""))
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nattributes:\n  title: title\n")

    assert compile_mapping(child)[1] == []


def test_a_cycle_is_refused_at_the_extends_that_closes_it(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "extends: b.yaml\nattributes:\n  userName: email\n")
    write(tmp_path, "b.yaml", "# b\nextends: ./a.yaml\nattributes:\n  userName: email\n")

    with pytest.raises(ConfigError, match=r"b\.yaml:2:10: extends './a.yaml' makes a cycle: a.yaml → b.yaml → a.yaml"):
        load_mapping(tmp_path / "a.yaml")


def test_a_mapping_that_extends_itself_is_a_cycle(tmp_path: Path) -> None:
    path = write(tmp_path, "a.yaml", "extends: a.yaml\nattributes:\n  userName: email\n")

    with pytest.raises(ConfigError, match=r"a\.yaml:1:10: extends 'a.yaml' makes a cycle"):
        load_mapping(path)


def test_null_without_a_base_is_still_no_value(tmp_path: Path) -> None:
    path = write(tmp_path, "a.yaml", "attributes:\n  userName: email\n  title: null\n")

    with pytest.raises(ConfigError, match=r"a\.yaml:3:10: attribute 'title': expected a column name"):
        load_mapping(path)


def test_the_plain_texts_of_a_merged_mapping_are_those_of_the_files_that_write_them(tmp_path: Path) -> None:
    """What a digest of the parsed mapping reads: YAML 1.1 texts (``NO``, ``0123``) of every file, once each."""
    from provisioner.extends import load_layers

    write(tmp_path, "base.yaml", "attributes:\n  userName: email\n  locale: NO\n  externalId: 0123\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nattributes:\n  externalId: 0456\n")

    doc, problems = load_layers(child)

    assert problems == []
    assert dict(doc.plain.items()) == {("attributes", "locale"): "NO", ("attributes", "externalId"): "0456"}
    assert load_mapping(child).render({"email": "a@x"}).payload["externalId"] == "0456"
