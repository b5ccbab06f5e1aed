"""`provisioner check`: each broken mapping in tests/check/ and what check says about it, line by line.

Every ``NAME.yaml`` there holds mistakes of one kind (a file that starts
``# Not a case`` is a base that a case ``extends``); ``NAME.out`` is check's
output for it, paths relative to the folder. The source is hr.csv, or the one a
case gives in ``# source: KEY: VALUE`` lines (hr.db holds hr.csv as table ``people``). Regenerate after a deliberate
change of wording with ``PROVISIONER_REGOLD=1 pytest tests/integration/test_check.py``.
"""

from __future__ import annotations

import csv
import os
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest

from connectors import AttributeInfo, Schema
from provisioner.cli import EXIT_CONFIG, EXIT_OK, main
from provisioner.demo import DEMO_MAPPING, DEMO_SOURCE
from provisioner.mapping import compile_mapping
from provisioner.schema import RFC7643_SCHEMAS
from tests.conftest import Workspace

CASES = Path(__file__).parent.parent / "check"
# A file that starts "# Not a case" is a base another case extends, checked through that case.
BROKEN = sorted(p.stem for p in CASES.glob("*.yaml") if not p.read_text().startswith("# Not a case"))


def run_check(tmp_path: Path, mapping: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, list[str]]:
    shutil.copy(CASES / "hr.csv", tmp_path / "hr.csv")
    with (CASES / "hr.csv").open(encoding="utf-8") as csv_file, sqlite3.connect(tmp_path / "hr.db") as db:
        header, *rows = csv.reader(csv_file)
        db.execute(f"CREATE TABLE people ({', '.join(f'{column} TEXT' for column in header)})")
        db.executemany(f"INSERT INTO people VALUES ({', '.join('?' for _ in header)})", rows)
    shutil.copy(mapping, tmp_path / mapping.name)
    if mapping.parent == CASES:  # the bases the cases extend
        for base in CASES.glob("*.yaml"):
            shutil.copy(base, tmp_path / base.name)
    given = [line[len("# source: "):] for line in mapping.read_text().splitlines() if line.startswith("# source: ")]
    source = " {type: csv, path: hr.csv, key: employee_id}"
    if given:
        source = "".join(f"\n    {line}" for line in given)
    (tmp_path / "config.yaml").write_text(
        "state: sqlite:///state.db\n"
        f"sources:\n  hr:{source}\n"
        f"targets:\n  app:\n    base_url: https://127.0.0.1:9/v2\n    auth: {{type: none}}\n"
        f"    source: hr\n    mapping: {mapping.name}\n"
    )
    code = main(["check", "--config", str(tmp_path / "config.yaml"), *extra])
    captured = capsys.readouterr()
    return code, captured.err.replace(f"{tmp_path}/", "").splitlines()


@pytest.mark.parametrize("name", BROKEN)
def test_check_lists_every_mistake_of_a_broken_mapping_with_line_and_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setitem(sys.modules, "MySQLdb", None)  # the driver sql_no_driver lacks, wherever the tests run
    code, lines = run_check(tmp_path, CASES / f"{name}.yaml", capsys)

    golden = CASES / f"{name}.out"
    if os.environ.get("PROVISIONER_REGOLD"):
        golden.write_text("\n".join(lines) + "\n")
    assert code == EXIT_CONFIG
    assert lines == golden.read_text().splitlines()


def test_check_of_the_shipped_mapping_finds_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mapping = tmp_path / "src" / "users.yaml"
    mapping.parent.mkdir()
    shutil.copy(DEMO_MAPPING, mapping)
    shutil.copy(DEMO_SOURCE, tmp_path / "demo.csv")
    (tmp_path / "config.yaml").write_text(
        "state: sqlite:///state.db\nsources:\n  hr: {type: csv, path: demo.csv, key: employee_id}\n"
        "targets:\n  app:\n    base_url: https://127.0.0.1:9/v2\n    auth: {type: none}\n"
        "    source: hr\n    mapping: src/users.yaml\n"
    )

    code = main(["check", "--config", str(tmp_path / "config.yaml")])

    assert code == EXIT_OK, capsys.readouterr().err


BADGE = "urn:example:params:scim:schemas:extension:Badge:2.0:User"


def test_check_against_a_real_target_refuses_an_extension_its_users_do_not_declare(
    workspace: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """scim2-server's /ResourceTypes declares only the enterprise extension for Users."""
    shutil.copy(DEMO_SOURCE, workspace.source_path)
    text = workspace.mapping_path.read_text()
    workspace.mapping_path.write_text(text + f"  {BADGE}:\n    floor: title\n")
    line = len(text.splitlines()) + 1

    code = main(["check", "--config", str(workspace.config_path), "--target", "app"])

    lines = capsys.readouterr().err.replace(f"{workspace.root}/", "").splitlines()
    assert code == EXIT_CONFIG
    assert lines == [
        f"users.yaml:{line}:3: the target's Users resource type does not declare the extension '{BADGE}' "
        "(GET /ResourceTypes): it may refuse or drop these attributes",
        "1 mistake found; nothing was sent",
    ]


def test_check_against_a_real_target_passes_the_shipped_mapping(
    workspace: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(DEMO_SOURCE, workspace.source_path)

    code = main(["check", "--config", str(workspace.config_path), "--target", "app"])

    assert code == EXIT_OK, capsys.readouterr().err


def test_attributes_of_a_custom_extension_are_checked_against_the_discovered_schema(tmp_path: Path) -> None:
    badge = {BADGE: Schema(id=BADGE, attributes=(
        AttributeInfo("floor"), AttributeInfo("issuedBy", mutability="readOnly"), AttributeInfo("number", required=True),
    ))}  # fmt: skip
    path = tmp_path / "users.yaml"
    path.write_text(f"attributes:\n  userName: email\n  {BADGE}:\n    flor: title\n    issuedBy: title\n")

    _, diagnostics = compile_mapping(path, {**RFC7643_SCHEMAS, **badge}, [BADGE])

    assert sorted(str(d).replace(f"{tmp_path}/", "") for d in diagnostics) == [
        f"users.yaml:3:3: attribute 'number' of '{BADGE}' is required by its schema",
        f"users.yaml:4:5: unknown attribute 'flor' of extension '{BADGE}' (did you mean 'floor'?)",
        f"users.yaml:5:5: attribute '{BADGE}:issuedBy' is read-only (RFC 7643 §7 mutability): the target assigns it",
    ]


def test_offline_a_custom_extension_is_unknown_not_wrong(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    path.write_text(f"attributes:\n  userName: email\n  {BADGE}:\n    anything: title\n")

    mapping, diagnostics = compile_mapping(path)

    assert diagnostics == [] and mapping is not None


def test_a_target_that_lists_no_schemas_leaves_the_checks_to_rfc_7643(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    path.write_text("attributes:\n  userName: email\n  nickNam: title\n")

    _, diagnostics = compile_mapping(path, None, None)

    assert [d.message for d in diagnostics] == ["unknown User attribute 'nickNam' (did you mean 'nickName'?)"]


def test_plan_that_rejects_records_exits_4_and_names_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(CASES / "fails_everywhere.yaml", tmp_path / "users.yaml")
    shutil.copy(CASES / "hr.csv", tmp_path / "hr.csv")
    (tmp_path / "config.yaml").write_text(
        "state: sqlite:///state.db\nsources:\n  hr: {type: csv, path: hr.csv, key: employee_id}\n"
        "targets:\n  app:\n    base_url: https://127.0.0.1:9/v2\n    auth: {type: none}\n"
        "    source: hr\n    mapping: users.yaml\n"
    )

    code = main(["plan", "--config", str(tmp_path / "config.yaml")])

    out = capsys.readouterr().out
    assert code == 4
    assert [line.split(":")[0].strip() for line in out.splitlines() if "rejected E" in line] == [
        "rejected E1", "rejected E2", "rejected E3"
    ]


def test_a_json_lines_source_is_checked_against_the_keys_its_first_records_have(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "hr.jsonl").write_text(
        '{"employee_id": "E1", "email": "ada@example.com", "nick": "ada"}\n'
        '{"employee_id": "E2", "email": "grace@example.com"}\n'
    )
    (tmp_path / "users.yaml").write_text("attributes:\n  userName: emial | lower\n  nickName: nick\n")
    (tmp_path / "config.yaml").write_text(
        "state: sqlite:///state.db\nsources:\n  hr: {type: jsonl, path: hr.jsonl, key: employee_id}\n"
        "targets:\n  app:\n    base_url: https://127.0.0.1:9/v2\n    auth: {type: none}\n"
        "    source: hr\n    mapping: users.yaml\n"
    )

    code = main(["check", "--config", str(tmp_path / "config.yaml")])

    # 'nick' is in one record of two: a key some records leave out is not a mistake.
    assert code == EXIT_CONFIG
    assert capsys.readouterr().err.replace(f"{tmp_path}/", "").splitlines() == [
        "users.yaml:2:13: none of the first 2 records of hr.jsonl has 'emial' (did you mean 'email'?)",
        "1 mistake found; nothing was sent",
    ]
