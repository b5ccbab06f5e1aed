"""The mapping language's functions: golden examples through a compiled mapping, and properties."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from provisioner.functions import EXAMPLES, Example, library, markdown_table, normalize_diacritics
from provisioner.mapping import MappingError, load_mapping

GOLDEN = yaml.safe_load((Path(__file__).parent.parent / "golden" / "functions.yaml").read_text(encoding="utf-8"))
TABLES = "tables:\n  cost_centers: {Sales: CC-200, Engineering: CC-100}\n  countries: {NO: Norway, SE: Sweden}\n"


def render_title(tmp_path: Path, expression: str, record: dict[str, Any]) -> Any:
    path = tmp_path / "users.yaml"
    quoted = expression.replace("\\", "\\\\").replace('"', '\\"')
    path.write_text(f'{TABLES}attributes:\n  userName: "\'x\'"\n  urn:example:Test:\n    value: "{quoted}"\n')
    payload = load_mapping(path).render(record).payload
    return payload.get("urn:example:Test", {}).get("value")


@pytest.mark.parametrize("case", GOLDEN, ids=[c["expression"] for c in GOLDEN])
def test_function_gives_its_golden_value(tmp_path: Path, case: dict[str, Any]) -> None:
    assert render_title(tmp_path, case["expression"], case["record"]) == case["expected"]


README = Path(__file__).parent.parent.parent / "README.md"
TABLE_START = "<!-- the functions: generated from provisioner/functions.py EXAMPLES"
TABLE_END = "<!-- end of the functions -->"


def test_the_readme_lists_every_function_once_as_functions_py_does() -> None:
    """One list: EXAMPLES names each function of the library once, and the README's table is made from it.

    ``PROVISIONER_REGOLD=1`` rewrites the README's table after a change of EXAMPLES.
    """
    functions, _ = library({})
    listed = [example.signature.split("(")[0] for example in EXAMPLES]
    assert sorted(listed) == sorted(functions)
    text = README.read_text(encoding="utf-8")
    start = text.index("\n", text.index(TABLE_START)) + 1
    end = text.index(TABLE_END)
    if os.environ.get("PROVISIONER_REGOLD"):
        README.write_text(text[:start] + markdown_table() + text[end:], encoding="utf-8")
        text = README.read_text(encoding="utf-8")
        end = text.index(TABLE_END)
    assert text[start:end] == markdown_table()


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.expected is not None], ids=lambda e: e.signature)
def test_each_listed_example_gives_what_the_list_says(tmp_path: Path, example: Example) -> None:
    assert render_title(tmp_path, example.expression, example.record) == example.expected


def test_every_function_has_golden_cases() -> None:
    functions, _ = library({})
    tried = "".join(case["expression"] for case in GOLDEN)
    untested = {name for name in functions if f"{name}(" not in tried and f"| {name}" not in tried} - {"now"}
    assert untested == set()


def test_now_is_a_scim_date_time() -> None:
    from provisioner.functions import now

    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", now())


@pytest.mark.parametrize(
    ("expression", "needle"),
    [
        pytest.param("format_date(hired, '%Y-%m-%d')", "ValueError: time data", id="date-not-matching"),
        pytest.param("regex_replace(name, '(a+)+$', '')", "TimeoutError", id="catastrophic-regex"),
        pytest.param("regex_replace(name, '(', '')", "error", id="bad-regex"),
        pytest.param("lookup(name, 'nope')", "no table 'nope'", id="unknown-table"),
    ],
)
def test_a_function_failing_fails_the_record_with_its_reason(tmp_path: Path, expression: str, needle: str) -> None:
    with pytest.raises(MappingError, match=needle):
        render_title(tmp_path, expression, {"hired": "01.03.2024", "name": "a" * 5000 + "!"})


@given(st.text(max_size=60))
def test_normalize_diacritics_gives_ascii_and_is_idempotent(text: str) -> None:
    once = normalize_diacritics(text)

    assert once.isascii()
    assert normalize_diacritics(once) == once


@given(st.text(alphabet=st.characters(codec="ascii"), max_size=60))
def test_normalize_diacritics_keeps_ascii_text_as_it_is(text: str) -> None:
    assert normalize_diacritics(text) == text


def test_unique_username_tries_the_candidates_in_order_then_the_first_numbered() -> None:
    from provisioner.functions import MAX_NUMBERED, unique_username

    unique = unique_username(["jane.doe", "j.doe", "jane.doe"], "@example.com")
    assert unique is not None
    values = list(unique.values())

    assert values[:4] == ["jane.doe@example.com", "j.doe@example.com", "jane.doe2@example.com", "jane.doe3@example.com"]
    assert values[-1] == f"jane.doe{MAX_NUMBERED}@example.com" and len(values) == 2 + MAX_NUMBERED - 1
    only_listed = unique_username(["jane.doe", "j.doe"], numbered=False)
    assert only_listed is not None and list(only_listed.values()) == ["jane.doe", "j.doe"]
