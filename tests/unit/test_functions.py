"""The mapping language's functions: golden examples through a compiled mapping, and properties."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from provisioner.functions import normalize_diacritics
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


def test_every_function_has_a_golden_example_and_a_line_in_the_readme() -> None:
    from provisioner.functions import library

    functions, _ = library({})
    readme = (Path(__file__).parent.parent.parent / "README.md").read_text(encoding="utf-8")
    tried = "".join(case["expression"] for case in GOLDEN)
    untested = {name for name in functions if f"{name}(" not in tried and f"| {name}" not in tried} - {"now"}
    assert untested == set()
    assert {name for name in functions if f"`{name}" not in readme} == set()


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
