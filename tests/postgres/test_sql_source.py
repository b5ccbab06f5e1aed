"""A SQL source on a real PostgreSQL: rows come through a server-side cursor, a chunk at a time."""

from __future__ import annotations

import itertools

import psycopg

from provisioner.config import SqlSourceConfig
from provisioner.sources import BadRecord, IdentityRecord, read_source, source_columns
from provisioner.sources.sql import read_sql


def test_rows_are_read_through_a_server_side_cursor_a_chunk_at_a_time(pg_url: str) -> None:
    """A sequence advanced per row evaluated shows how far the server went when records are handed out."""
    with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute("CREATE TABLE employees (emp_no int, first text, hired date, fte numeric(3,2))")
        conn.execute("INSERT INTO employees SELECT n, 'First' || n, DATE '2020-01-01' + n % 365, 0.8 "
                     "FROM generate_series(1, 100000) n")  # fmt: skip
        conn.execute("INSERT INTO employees VALUES (7, 'Again', NULL, 1)")
        conn.execute("CREATE SEQUENCE evaluated")
        query = ("SELECT emp_no AS employee_id, first AS first_name, hired, fte, nextval('evaluated') AS n "
                 "FROM employees")  # fmt: skip
        source = SqlSourceConfig(type="sql", url=pg_url, query=query, key="employee_id", chunk_size=1000)

        records = read_sql(source)
        first = list(itertools.islice(records, 1500))
        (evaluated,) = conn.execute("SELECT last_value FROM evaluated").fetchone() or (0,)
        records.close()

        assert first[0] == IdentityRecord(
            "1", {"employee_id": 1, "first_name": "First1", "hired": "2020-01-02", "fte": "0.80", "n": 1},
            f"{source.describe()}:1",
        )
        assert 1500 <= evaluated <= 2000
        assert source_columns(source) == {"employee_id", "first_name", "hired", "fte", "n"}
        (after_columns,) = conn.execute("SELECT last_value FROM evaluated").fetchone() or (0,)
        assert after_columns - evaluated <= 1  # reading the columns fetches no rows

        everything = list(read_source(source))
    assert len(everything) == 100_001
    duplicates = [r for r in everything if isinstance(r, BadRecord)]
    assert [(r.key, r.origin) for r in duplicates] == [("7", f"{source.describe()}:7"),
                                                       ("7", f"{source.describe()}:100001")]  # fmt: skip
