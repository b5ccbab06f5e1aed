"""Identity sources: CSV and JSON Lines read as records; unusable lines and shared keys become BadRecords."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.config import SourceConfig
from provisioner.errors import SourceError
from provisioner.sources import BadRecord, IdentityRecord, read_off_loop, read_source, source_columns
from provisioner.sources.csv import read_csv

HEADER = "employee_id,first_name,email"


def csv_source(tmp_path: Path, text: str, **options: str) -> SourceConfig:
    path = tmp_path / "hr.csv"
    path.write_text(text, encoding="utf-8")
    return SourceConfig(type="csv", path=path, key="employee_id", **options)


def jsonl_source(tmp_path: Path, text: str) -> SourceConfig:
    path = tmp_path / "hr.jsonl"
    path.write_text(text, encoding="utf-8")
    return SourceConfig(type="jsonl", path=path, key="employee_id")


# --- CSV ------------------------------------------------------------------------------------------


def test_csv_rows_become_records_with_their_line(tmp_path: Path) -> None:
    source = csv_source(tmp_path, f"{HEADER}\nE1,Ada,ada@example.com\nE2,Alan,alan@example.com\n")

    records = list(read_source(source))

    assert records == [
        IdentityRecord("E1", {"employee_id": "E1", "first_name": "Ada", "email": "ada@example.com"}, f"{source.path}:2"),
        IdentityRecord("E2", {"employee_id": "E2", "first_name": "Alan", "email": "alan@example.com"}, f"{source.path}:3"),
    ]


def test_csv_header_names_and_keys_are_stripped(tmp_path: Path) -> None:
    source = csv_source(tmp_path, " employee_id , first_name\n E1 ,Ada\n")

    [record] = read_source(source)

    assert isinstance(record, IdentityRecord)
    assert record.key == "E1"
    assert record.attributes["first_name"] == "Ada"


def test_csv_with_a_byte_order_mark_reads_the_key_column(tmp_path: Path) -> None:
    path = tmp_path / "hr.csv"
    path.write_bytes(b"\xef\xbb\xbf" + f"{HEADER}\nE1,Ada,ada@example.com\n".encode())

    [record] = read_source(SourceConfig(type="csv", path=path, key="employee_id"))

    assert isinstance(record, IdentityRecord) and record.key == "E1"


def test_csv_with_another_delimiter(tmp_path: Path) -> None:
    source = csv_source(tmp_path, "employee_id;name\nE1;Lovelace, Ada\n", delimiter=";")

    [record] = read_source(source)

    assert isinstance(record, IdentityRecord) and record.attributes["name"] == "Lovelace, Ada"


def test_csv_row_with_too_many_fields_is_a_bad_record(tmp_path: Path) -> None:
    source = csv_source(tmp_path, f"{HEADER}\nE1,Ada,ada@example.com\nE2,Alan,alan@example.com,extra\nE3,Grace,g@x\n")

    records = list(read_source(source))

    assert records[1] == BadRecord("E2", "more fields than the header has", f"{source.path}:3")
    assert [r.key for r in records] == ["E1", "E2", "E3"]
    assert isinstance(records[2], IdentityRecord)


def test_csv_row_with_too_few_fields_is_a_bad_record(tmp_path: Path) -> None:
    source = csv_source(tmp_path, f"{HEADER}\nE1,Ada,ada@example.com\nE2,Alan\n")

    records = list(read_source(source))

    assert isinstance(records[1], BadRecord)
    assert (records[1].key, records[1].origin) == ("E2", f"{source.path}:3")
    assert "fewer fields" in records[1].reason


@pytest.mark.parametrize("key", [pytest.param("", id="empty"), pytest.param("   ", id="blank")])
def test_csv_row_with_an_empty_key_is_a_bad_record(tmp_path: Path, key: str) -> None:
    source = csv_source(tmp_path, f"{HEADER}\n{key},Ada,ada@example.com\n")

    [record] = read_source(source)

    assert record == BadRecord("", "the key 'employee_id' is empty", f"{source.path}:2")


def test_csv_without_the_key_column_is_a_source_error(tmp_path: Path) -> None:
    source = csv_source(tmp_path, "id,first_name\nE1,Ada\n")

    with pytest.raises(SourceError) as raised:
        list(read_source(source))

    assert str(raised.value).startswith(f"{source.path}:1:")
    assert "'employee_id'" in str(raised.value)


def test_missing_source_file_is_a_source_error(tmp_path: Path) -> None:
    source = SourceConfig(type="csv", path=tmp_path / "absent.csv", key="employee_id")

    with pytest.raises(SourceError, match="not found"):
        list(read_source(source))


def test_csv_that_is_not_the_configured_encoding_is_a_source_error(tmp_path: Path) -> None:
    path = tmp_path / "hr.csv"
    path.write_bytes(f"{HEADER}\nE1,Zo\xe9,z@example.com\n".encode("latin-1"))

    with pytest.raises(SourceError, match=rf"^{path}:\d+: cannot parse"):
        list(read_source(SourceConfig(type="csv", path=path, key="employee_id")))


def test_jsonl_that_is_not_the_configured_encoding_is_a_source_error(tmp_path: Path) -> None:
    path = tmp_path / "hr.jsonl"
    path.write_bytes('{"employee_id": "E1", "first_name": "Zo\xe9"}\n'.encode("latin-1"))

    with pytest.raises(SourceError, match=rf"^{path}"):
        list(read_source(SourceConfig(type="jsonl", path=path, key="employee_id")))


@pytest.mark.parametrize("text", [pytest.param("", id="zero-bytes"), pytest.param(f"{HEADER}\n", id="header-only")])
def test_empty_csv_yields_no_records(tmp_path: Path, text: str) -> None:
    assert list(read_source(csv_source(tmp_path, text))) == []


def test_source_columns_are_the_header(tmp_path: Path) -> None:
    assert source_columns(csv_source(tmp_path, f" {HEADER} \nE1,Ada,a@x\n")) == {"employee_id", "first_name", "email"}


def test_records_are_streamed_and_a_broken_line_far_down_is_a_source_error_naming_it(tmp_path: Path) -> None:
    """The CSV reader yields its first record before the end of the file is read; undecodable bytes there
    name their line, and read_source gives no record of such a file at all."""
    path = tmp_path / "hr.csv"
    rows = "".join(f"E{i},Person{i},p{i}@example.com\n" for i in range(20_000))
    path.write_bytes(f"{HEADER}\n{rows}".encode() + b"E-bad,\xff\xfe,x\n")
    config = SourceConfig(type="csv", path=path, key="employee_id")
    records = iter(read_csv(config))

    first = next(records)

    assert isinstance(first, IdentityRecord) and first.key == "E0"
    with pytest.raises(SourceError, match=rf"^{path}:\d+: cannot parse"):
        list(records)
    with pytest.raises(SourceError, match=rf"^{path}:\d+: cannot parse"):
        next(iter(read_source(config)))


# --- JSON Lines ------------------------------------------------------------------------------------


def test_jsonl_lines_become_records_with_their_line(tmp_path: Path) -> None:
    source = jsonl_source(tmp_path, '{"employee_id": "E1", "tags": ["a"]}\n\n{"employee_id": 42, "email": null}\n')

    records = list(read_source(source))

    assert records == [
        IdentityRecord("E1", {"employee_id": "E1", "tags": ["a"]}, f"{source.path}:1"),
        IdentityRecord("42", {"employee_id": 42, "email": None}, f"{source.path}:3"),
    ]


def test_jsonl_invalid_line_is_a_bad_record_and_the_rest_go_on(tmp_path: Path) -> None:
    source = jsonl_source(tmp_path, '{"employee_id": "E1"}\n{"employee_id": "E2",\n{"employee_id": "E3"}\n')

    records = list(read_source(source))

    assert isinstance(records[1], BadRecord)
    assert records[1].origin == f"{source.path}:2"
    assert records[1].reason.startswith("not valid JSON")
    assert [r.key for r in records if isinstance(r, IdentityRecord)] == ["E1", "E3"]


def test_jsonl_line_that_is_not_an_object_is_a_bad_record(tmp_path: Path) -> None:
    source = jsonl_source(tmp_path, '["E1"]\n')

    assert list(read_source(source)) == [BadRecord("", "a line must hold a JSON object", f"{source.path}:1")]


@pytest.mark.parametrize(
    "line", [pytest.param('{"first_name": "Ada"}', id="missing"), pytest.param('{"employee_id": null}', id="null"),
             pytest.param('{"employee_id": ""}', id="empty")],
)  # fmt: skip
def test_jsonl_record_without_a_key_is_a_bad_record(tmp_path: Path, line: str) -> None:
    source = jsonl_source(tmp_path, line + "\n")

    assert list(read_source(source)) == [BadRecord("", "the key 'employee_id' is empty", f"{source.path}:1")]


def test_jsonl_has_no_header_columns(tmp_path: Path) -> None:
    assert source_columns(jsonl_source(tmp_path, '{"employee_id": "E1"}\n')) is None


# --- one bad record fails alone ----------------------------------------------------------------------


def huge_csv(tmp_path: Path, header: str, rows: list[str]) -> SourceConfig:
    path = tmp_path / "hr.csv"
    path.write_text(header + "\n" + "".join(row + "\n" for row in rows), encoding="utf-8")
    return SourceConfig(type="csv", path=path, key="employee_id")


def test_csv_cell_over_the_csv_module_limit_fails_its_record_alone_naming_its_key(tmp_path: Path) -> None:
    """A 200,000-character cell is over csv's own 131,072 limit: that record is bad, the next ones are read."""
    source = huge_csv(tmp_path, "employee_id,notes,email", ["E1,short,a@x", f"E2,{'x' * 200_000},b@x", "E3,ok,c@x"])

    records = list(read_source(source))

    assert [type(r).__name__ for r in records] == ["IdentityRecord", "BadRecord", "IdentityRecord"]
    assert records[1].key == "E2" and records[1].origin == f"{source.path}:3"
    assert "field larger than field limit" in records[1].reason
    assert records[2] == IdentityRecord("E3", {"employee_id": "E3", "notes": "ok", "email": "c@x"}, f"{source.path}:4")


def test_csv_huge_cell_before_the_key_names_the_line(tmp_path: Path) -> None:
    source = huge_csv(tmp_path, "notes,employee_id", [f"{'x' * 200_000},E1", "ok,E2"])

    records = list(read_source(source))

    assert records[0] == BadRecord("", records[0].reason, f"{source.path}:2")
    assert records[1] == IdentityRecord("E2", {"notes": "ok", "employee_id": "E2"}, f"{source.path}:3")


def test_csv_cell_over_the_cell_cap_is_a_bad_record(tmp_path: Path) -> None:
    """Under csv's limit but over ours: parsed, then refused by its length."""
    source = huge_csv(tmp_path, "employee_id,notes", [f"E1,{'x' * 100_000}", "E2,ok"])

    records = list(read_source(source))

    assert records[0] == BadRecord(
        "E1", "column 'notes' holds 100000 characters, more than a cell may (65536)", f"{source.path}:2"
    )
    assert isinstance(records[1], IdentityRecord) and records[1].key == "E2"


def test_csv_huge_quoted_cell_over_several_lines_is_skipped_to_its_end(tmp_path: Path) -> None:
    """Lines inside the huge quoted cell look like records; none of them may become one."""
    inside = "x" * 150_000 + "\nE9,fake,fake@x\n" + "y" * 10 + '""quoted""' + "\nE8,fake,z@x"
    source = huge_csv(tmp_path, "employee_id,notes,email", [f'E1,"{inside}",a@x', 'E2,5\'10" tall,b@x'])

    records = list(read_source(source))

    assert [(type(r).__name__, r.key) for r in records] == [("BadRecord", "E1"), ("IdentityRecord", "E2")]
    assert records[0].origin == f"{source.path}:2"
    assert records[1].attributes["notes"] == "5'10\" tall"
    assert records[1].origin == f"{source.path}:6"


def test_csv_line_over_the_record_cap_is_read_in_bounded_pieces(tmp_path: Path) -> None:
    source = huge_csv(tmp_path, "employee_id,notes", [f"E1,{'x' * 3_000_000}", "E2,ok"])

    records = list(read_source(source))

    assert records[0] == BadRecord("E1", "the record holds more than 1048576 characters", f"{source.path}:2")
    assert records[1] == IdentityRecord("E2", {"employee_id": "E2", "notes": "ok"}, f"{source.path}:3")


def test_jsonl_line_over_the_record_cap_is_a_bad_record(tmp_path: Path) -> None:
    big = '{"employee_id": "E1", "notes": "' + "x" * 2_000_000 + '"}'
    source = jsonl_source(tmp_path, big + '\n{"employee_id": "E2"}\n')

    records = list(read_source(source))

    assert records[0] == BadRecord("", "the line holds more than 1048576 characters", f"{source.path}:1")
    assert records[1] == IdentityRecord("E2", {"employee_id": "E2"}, f"{source.path}:2")


def test_jsonl_cell_over_the_cell_cap_is_a_bad_record_naming_its_key(tmp_path: Path) -> None:
    source = jsonl_source(tmp_path, '{"employee_id": "E1", "notes": "' + "x" * 70_000 + '"}\n{"employee_id": "E2"}\n')

    records = list(read_source(source))

    assert records[0] == BadRecord(
        "E1", "column 'notes' holds 70000 characters, more than a cell may (65536)", f"{source.path}:1"
    )
    assert isinstance(records[1], IdentityRecord)


def test_jsonl_key_that_is_an_object_is_a_bad_record(tmp_path: Path) -> None:
    source = jsonl_source(tmp_path, '{"employee_id": {"a": 1}}\n')

    assert list(read_source(source)) == [
        BadRecord("", "the key 'employee_id' is not a single value", f"{source.path}:1")
    ]


# --- one key, several records ----------------------------------------------------------------------


def duplicate(key: str, count: int, also: str) -> str:
    return f"employee_id '{key}' appears {count} times (also at {also}); none of them is used"


def test_every_record_of_a_shared_key_is_a_bad_record_at_its_own_line_and_the_others_go_on(tmp_path: Path) -> None:
    source = csv_source(tmp_path, f"{HEADER}\nE1,Ada,a@x\nE2,Alan,b@x\nE1,Augusta,c@x\nE3,Grace,d@x\n E1 ,Ada,e@x\n")

    records = list(read_source(source))

    assert records == [
        BadRecord("E1", duplicate("E1", 3, "lines 4, 6"), f"{source.path}:2"),
        IdentityRecord("E2", {"employee_id": "E2", "first_name": "Alan", "email": "b@x"}, f"{source.path}:3"),
        BadRecord("E1", duplicate("E1", 3, "lines 2, 6"), f"{source.path}:4"),
        IdentityRecord("E3", {"employee_id": "E3", "first_name": "Grace", "email": "d@x"}, f"{source.path}:5"),
        BadRecord("E1", duplicate("E1", 3, "lines 2, 4"), f"{source.path}:6"),
    ]


def test_a_key_many_records_share_names_a_few_of_the_others_and_counts_the_rest(tmp_path: Path) -> None:
    rows = "".join(f"N/A,Person{n},p{n}@x\n" for n in range(8))
    source = csv_source(tmp_path, f"{HEADER}\n{rows}")

    first = next(iter(read_source(source)))

    assert isinstance(first, BadRecord)
    assert first.reason == duplicate("N/A", 8, "lines 3, 4, 5, 6, 7 and 2 more")


def test_a_bad_record_naming_a_key_takes_that_key_from_its_other_records(tmp_path: Path) -> None:
    """A row cut short still names its person: the complete row of that key is not guessed to be them."""
    source = csv_source(tmp_path, f"{HEADER}\nE1,Ada\nE1,Ada,a@x\n")

    records = list(read_source(source))

    assert records == [
        BadRecord("E1", "fewer fields than the header has", f"{source.path}:2"),
        BadRecord("E1", duplicate("E1", 2, "line 2"), f"{source.path}:3"),
    ]


def test_keys_of_json_lines_are_compared_as_text(tmp_path: Path) -> None:
    source = jsonl_source(tmp_path, '{"employee_id": 42}\n{"employee_id": "42"}\n{"employee_id": 7}\n')

    records = list(read_source(source))

    assert [(type(r).__name__, r.key, r.origin) for r in records] == [
        ("BadRecord", "42", f"{source.path}:1"), ("BadRecord", "42", f"{source.path}:2"),
        ("IdentityRecord", "7", f"{source.path}:3"),
    ]  # fmt: skip


def test_a_change_to_any_record_of_a_shared_key_changes_what_each_rejection_is_of(tmp_path: Path) -> None:
    """A resolved rejection comes back when any of the key's records changes, not only the last one."""
    texts = [
        list(read_source(csv_source(tmp_path, f"{HEADER}\nE1,Ada,a@x\nE1,Augusta,c@x\n"))),
        list(read_source(csv_source(tmp_path, f"{HEADER}\nE1,Ada,CHANGED@x\nE1,Augusta,c@x\n"))),
        list(read_source(csv_source(tmp_path, f"{HEADER}\nE1,Augusta,c@x\nE1,Ada,a@x\n"))),
    ]

    first, changed, reordered = ([r.text for r in records] for records in texts)
    assert first[0] == first[1] and changed[0] == changed[1]
    assert first[0] != changed[0]
    assert reordered[0] == first[0]


def test_a_snapshot_that_cannot_be_spooled_is_a_source_error_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = csv_source(tmp_path, f"{HEADER}\nE1,Ada,a@x\n")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "gone"))

    with pytest.raises(SourceError, match=r"^cannot keep the source's snapshot in a temporary file in .*/gone \("):
        list(read_source(source))


# --- reading off the event loop ---------------------------------------------------------------------


def test_read_off_loop_reads_the_source_in_another_thread_and_gives_every_record(tmp_path: Path) -> None:
    source = csv_source(tmp_path, f"{HEADER}\nE1,Ada,a@x\nE2,Alan,b@x\n")
    readers: list[int] = []

    def watched() -> Iterator[IdentityRecord | BadRecord]:
        readers.append(threading.get_ident())
        yield from read_source(source)

    async def read() -> list[IdentityRecord | BadRecord]:
        return list(await read_off_loop(watched()))

    records = asyncio.run(read())

    assert [r.key for r in records] == ["E1", "E2"]
    assert readers and readers[0] != threading.get_ident()


def test_read_off_loop_of_an_empty_source_gives_nothing_and_a_source_error_is_raised(tmp_path: Path) -> None:
    empty = csv_source(tmp_path, f"{HEADER}\n")
    missing = SourceConfig(type="csv", path=tmp_path / "gone.csv", key="employee_id")

    assert asyncio.run(_listed(empty)) == []
    with pytest.raises(SourceError):
        asyncio.run(_listed(missing))


async def _listed(source: SourceConfig) -> list[IdentityRecord | BadRecord]:
    return list(await read_off_loop(read_source(source)))
