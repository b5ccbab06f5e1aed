"""SQL sources: a query's rows streamed in chunks from a real SQLite file, columns from the result."""

from __future__ import annotations

import itertools
import sqlite3
import sys
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from provisioner import redaction
from provisioner.config import SqlSourceConfig, load_config
from provisioner.errors import ConfigError, SourceError
from provisioner.sources import BadRecord, IdentityRecord, read_source, source_columns
from provisioner.sources.sql import read_sql


def hr_database(path: Path, rows: list[tuple[object, ...]]) -> Path:
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE employees (emp_no INTEGER, first TEXT, last TEXT, hired DATE, fte NUMERIC, status TEXT)"
        )
        conn.executemany("INSERT INTO employees VALUES (?, ?, ?, ?, ?, ?)", rows)
    return path


def sql_source(url: str, query: str, **options: object) -> SqlSourceConfig:
    return SqlSourceConfig.model_validate({"type": "sql", "url": url, "query": query, "key": "employee_id", **options})


QUERY = ("SELECT emp_no AS employee_id, first AS first_name, last AS last_name, hired, fte "
         "FROM employees ORDER BY emp_no")


def test_rows_become_records_named_by_the_query_with_their_row_number(tmp_path: Path) -> None:
    db = hr_database(tmp_path / "hr.db", [(1, "Ada", "Lovelace", "2020-01-02", 1, "active"),
                                          (2, "Alan", "Turing", None, 0.5, "active")])  # fmt: skip
    source = sql_source(f"sqlite:///{db}", QUERY)

    records = list(read_source(source))

    assert records == [
        IdentityRecord("1", {"employee_id": 1, "first_name": "Ada", "last_name": "Lovelace", "hired": "2020-01-02",
                             "fte": 1}, f"sqlite:///{db}:1"),  # fmt: skip
        IdentityRecord("2", {"employee_id": 2, "first_name": "Alan", "last_name": "Turing", "hired": None,
                             "fte": 0.5}, f"sqlite:///{db}:2"),  # fmt: skip
    ]


def test_a_key_two_rows_share_names_the_other_row(tmp_path: Path) -> None:
    """A query joining one row too many: each row is rejected, saying which other row has its key."""
    db = hr_database(tmp_path / "hr.db", [(1, "Ada", "Lovelace", None, 1, "active"),
                                          (2, "Alan", "Turing", None, 1, "active"),
                                          (1, "Augusta", "King", None, 1, "active")])  # fmt: skip
    source = sql_source(f"sqlite:///{db}", "SELECT emp_no AS employee_id, first AS first_name FROM employees")

    reasons = [record.reason for record in read_source(source) if isinstance(record, BadRecord)]

    assert reasons == [
        "employee_id '1' appears 2 times (also at row 3); none of them is used",
        "employee_id '1' appears 2 times (also at row 1); none of them is used",
    ]


def test_columns_are_the_query_result_columns_read_without_fetching_rows(tmp_path: Path) -> None:
    db = hr_database(tmp_path / "hr.db", [(1, "Ada", "Lovelace", None, 1, "active")])

    assert source_columns(sql_source(f"sqlite:///{db}", QUERY)) == {
        "employee_id", "first_name", "last_name", "hired", "fte",
    }  # fmt: skip


def test_a_hundred_thousand_rows_are_fetched_a_chunk_at_a_time(tmp_path: Path) -> None:
    """The database evaluates rows as they are fetched: when a record is handed out, at most a chunk more are read."""
    rows = [(i, f"First{i}", f"Last{i}", "2021-03-04", 1, "active") for i in range(100_000)]
    db = hr_database(tmp_path / "hr.db", rows)
    evaluated = [0]

    def count(value: object) -> object:
        evaluated[0] += 1
        return value

    def register(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        dbapi_connection.create_function("counted", 1, count)

    query = "SELECT counted(emp_no) AS employee_id, first AS first_name FROM employees"
    event.listen(Engine, "connect", register)
    try:
        records = read_sql(sql_source(f"sqlite:///{db}", query, chunk_size=500))
        seen_at = [evaluated[0] for _ in itertools.islice(records, 2_000)]
        records.close()
    finally:
        event.remove(Engine, "connect", register)

    assert len(seen_at) == 2_000
    assert all(at <= number + 500 for number, at in enumerate(seen_at, start=1))
    assert evaluated[0] < 3_000


def test_a_value_that_json_cannot_hold_is_turned_into_text(tmp_path: Path) -> None:
    db = tmp_path / "hr.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (employee_id TEXT, photo BLOB, big INTEGER)")
        conn.execute("INSERT INTO t VALUES ('E1', x'00ff', 9223372036854775807)")
    source = sql_source(f"sqlite:///{db}", "SELECT employee_id, photo, big, CAST(1.25 AS NUMERIC) AS n FROM t")

    [record] = list(read_source(source))

    assert isinstance(record, IdentityRecord)
    assert record.attributes == {"employee_id": "E1", "photo": "AP8=", "big": 9223372036854775807, "n": 1.25}


def test_a_row_without_a_key_is_a_bad_record_and_the_others_go_on(tmp_path: Path) -> None:
    db = hr_database(tmp_path / "hr.db", [(None, "Nobody", "X", None, 1, "active"), (2, "Alan", "T", None, 1, "a")])

    records = list(read_source(sql_source(f"sqlite:///{db}", QUERY)))

    assert records[0] == BadRecord("", "the key 'employee_id' is empty", f"sqlite:///{db}:1")
    assert isinstance(records[1], IdentityRecord) and records[1].key == "2"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        pytest.param("SELECT first FROM employees",
                     "the query returns no column 'employee_id', the source's key; it returns first",
                     id="no-key-column"),
        pytest.param("SELECT emp_no AS employee_no FROM employees",
                     "the query returns no column 'employee_id', the source's key (did you mean 'employee_no'?)",
                     id="key-column-misspelled"),
        pytest.param("SELECT emp_no AS employee_id, first AS employee_id FROM employees",
                     "the query returns two columns named 'employee_id'", id="two-columns-one-name"),
        pytest.param("SELECT * FROM nowhere", "no such table: nowhere", id="bad-query"),
    ],
)  # fmt: skip
def test_a_query_that_cannot_give_records_is_a_source_error_naming_the_source(
    tmp_path: Path, query: str, message: str
) -> None:
    db = hr_database(tmp_path / "hr.db", [(1, "Ada", "Lovelace", None, 1, "active")])
    source = sql_source(f"sqlite:///{db}", query)

    with pytest.raises(SourceError) as read:
        list(read_source(source))
    with pytest.raises(SourceError) as described:
        source_columns(source)

    for raised in (read, described):
        assert str(raised.value).startswith(f"sqlite:///{db}: ")
        assert message in str(raised.value)
        assert "\n" not in str(raised.value)


def test_a_missing_sqlite_file_is_a_source_error_not_an_empty_database(tmp_path: Path) -> None:
    source = sql_source(f"sqlite:///{tmp_path / 'gone.db'}", QUERY)

    with pytest.raises(SourceError, match="no such database file"):
        list(read_source(source))
    assert not (tmp_path / "gone.db").exists()


CONFIG = """state: sqlite:///state.db
sources:
  hr:
    type: sql
{source}
    key: employee_id
targets:
  app:
    base_url: https://scim.example.com/v2
    auth: {{type: bearer, token: t0ken-value}}
    source: hr
    mapping: users.yaml
"""


def write_config(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.format(source=source), encoding="utf-8")
    return path


def test_a_relative_sqlite_path_is_relative_to_the_config_folder(tmp_path: Path) -> None:
    path = write_config(tmp_path, "    url: sqlite:///hr.db\n    query: SELECT 1 AS employee_id")

    source = load_config(path).sources["hr"]

    assert isinstance(source, SqlSourceConfig)
    assert source.describe() == f"sqlite:///{tmp_path / 'hr.db'}"


@pytest.mark.parametrize(
    ("source", "line", "message"),
    [
        pytest.param("    url: sqlite:///hr.db", 3, "sources.hr.query: required key is missing", id="no-query"),
        pytest.param("    url: 'not a url'\n    query: SELECT 1", 5, "sources.hr.url: not a database URL like sqlite:///hr.db",
                     id="bad-url"),
        pytest.param("    url: postgresql://reader:Secr3t-pw@db/hr\n    query: SELECT 1", 5,
                     "sources.hr.url: a password written in the config file", id="password-in-url"),
        pytest.param("    url: postgresql://reader@db/hr\n    password: Secr3t-pw\n    query: SELECT 1", 6,
                     "sources.hr.password: a password written in the config file", id="password-written"),
    ],
)  # fmt: skip
def test_a_bad_sql_source_is_one_line_naming_its_line_and_key(
    tmp_path: Path, source: str, line: int, message: str
) -> None:
    path = write_config(tmp_path, source)

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert str(raised.value).startswith(f"{path}:{line}: {message}")
    assert "\n" not in str(raised.value)
    assert "Secr3t-pw" not in str(raised.value)


def test_the_password_comes_from_the_environment_and_never_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HR_DB_PASSWORD", "pw-from-env/with@odd:chars")
    path = write_config(
        tmp_path, "    url: postgresql+psycopg://reader@127.0.0.1:1/hr\n    password: ${HR_DB_PASSWORD}\n"
        "    query: SELECT 1 AS employee_id\n    connect_timeout: 2",
    )  # fmt: skip

    source = load_config(path).sources["hr"]
    assert isinstance(source, SqlSourceConfig)
    with pytest.raises(SourceError) as raised:
        list(read_source(source))

    assert source.engine_url().password == "pw-from-env/with@odd:chars"
    assert str(raised.value).startswith(
        f"{path}:5: sources.hr.url: cannot connect to postgresql+psycopg://reader@127.0.0.1:1/hr: "
    )
    assert "pw-from-env" not in str(raised.value)
    assert redaction.is_registered("pw-from-env/with@odd:chars")


# A plain password, then ones holding characters that mean something in a URL.
@pytest.mark.parametrize("password", ["S3cret-in-url", "Pa@ssword99", "Pa@ss/w:rd#Xy9%41", "a b?c@d"])
def test_a_password_read_into_the_url_is_escaped_there_and_never_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, password: str
) -> None:
    monkeypatch.setenv("HR_DB_PASSWORD", password)
    path = write_config(
        tmp_path, "    url: postgresql+psycopg://reader:${HR_DB_PASSWORD}@127.0.0.1:1/hr\n"
        "    query: SELECT 1 AS employee_id\n    connect_timeout: 2",
    )  # fmt: skip

    source = load_config(path).sources["hr"]
    assert isinstance(source, SqlSourceConfig)
    url = source.engine_url()
    with pytest.raises(SourceError) as raised:
        source_columns(source)

    # The '@' stays inside the password: the host is the one written, nothing of the password is one.
    assert (url.password, url.host, url.port, url.database) == (password, "127.0.0.1", 1, "hr")
    assert password not in str(raised.value)
    assert "reader:***@127.0.0.1:1/hr" in str(raised.value)
    pieces = [piece for piece in ("Pa@ss", "ssword99", "ss/w", "rd#Xy9", "Xy9", "b?c", "c@d") if piece in password]
    assert [piece for piece in pieces if piece in str(raised.value)] == []


@pytest.mark.parametrize(
    ("source", "line", "message"),
    [
        pytest.param("    url: sqlite:///hr.db\n    query: SELECT * FROM employes", 6,
                     "sources.hr.query: no such table: employes", id="no-such-table"),
        pytest.param("    url: sqlite:///hr.db\n    query: SELEC * FROM employees", 6,
                     'sources.hr.query: near "SELEC": syntax error', id="syntax-error"),
        pytest.param("    url: sqlite:///hr.db\n    query: SELECT emp_no FROM employees", 6,
                     "sources.hr.query: the query returns no column 'employee_id', the source's key; it returns emp_no",
                     id="no-key-column"),
        pytest.param("    url: sqlite:///gone.db\n    query: SELECT 1 AS employee_id", 5,
                     "sources.hr.url: no such database file: ", id="no-database-file"),
        pytest.param("    url: mysql://reader@db/hr\n    query: SELECT 1 AS employee_id", 5,
                     "sources.hr.url: the database driver for 'mysql' is not installed (no module named 'MySQLdb'); "
                     "install it next to provisioner: pip install 'mysqlclient'", id="driver-not-installed"),
        pytest.param("    url: nodialect://db/hr\n    query: SELECT 1 AS employee_id", 5,
                     "sources.hr.url: no SQLAlchemy dialect or driver is known for 'nodialect'", id="unknown-dialect"),
    ],
)  # fmt: skip
def test_a_source_that_cannot_be_read_names_the_config_line_of_its_query_or_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, line: int, message: str
) -> None:
    hr_database(tmp_path / "hr.db", [(1, "Ada", "Lovelace", None, 1, "active")])
    monkeypatch.setitem(sys.modules, "MySQLdb", None)  # not installed, wherever the tests run
    path = write_config(tmp_path, source)
    config = load_config(path).sources["hr"]

    with pytest.raises(SourceError) as read:
        list(read_source(config))
    with pytest.raises(SourceError) as described:
        source_columns(config)

    for raised in (read, described):
        assert str(raised.value).startswith(f"{path}:{line}: {message}")
        assert "\n" not in str(raised.value)


def test_a_missing_driver_is_named_and_psycopg_is_the_hint_for_postgresql_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.setitem(sys.modules, "pymysql", None)
    postgresql = write_config(tmp_path, "    url: postgresql://reader@db/hr\n    query: SELECT 1 AS employee_id")
    with pytest.raises(SourceError) as raised:
        source_columns(load_config(postgresql).sources["hr"])
    assert str(raised.value) == (
        f"{postgresql}:5: sources.hr.url: the database driver for 'postgresql+psycopg' is not installed "
        "(no module named 'psycopg'); install it next to provisioner: pip install 'psycopg[binary]'"
    )

    mysql = write_config(tmp_path, "    url: mysql+pymysql://reader@db/hr\n    query: SELECT 1 AS employee_id")
    with pytest.raises(SourceError) as raised:
        source_columns(load_config(mysql).sources["hr"])
    assert "pip install 'PyMySQL'" in str(raised.value) and "psycopg" not in str(raised.value)
