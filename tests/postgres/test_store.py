"""The state database's schema: migrations on SQLite and PostgreSQL, adoption, version checks, the driver."""

from __future__ import annotations

import importlib
import os
import pkgutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, event, text
from sqlmodel import SQLModel

import provisioner

from provisioner import store
from provisioner.errors import UserError
from provisioner.queue import claim_rows


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path)
    return str(request.getfixturevalue("pg_url"))


def every_model() -> MetaData:
    """The tables of every module of the package, whether or not the store knows the module."""
    for module in pkgutil.walk_packages(provisioner.__path__, "provisioner."):
        if ".migrations" not in module.name and not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    return SQLModel.metadata


def test_the_migrated_schema_is_the_models_schema(any_url: str) -> None:
    """Every table, column and index of the models has a migration: a model changed without one fails here."""
    engine = store.open_store(any_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        differences = compare_metadata(context, every_model())
    assert differences == []


def test_the_store_knows_every_module_that_defines_a_table() -> None:
    """A new module with a table belongs in store.TABLE_MODULES (Alembic compares what the store imports)."""
    code = "from provisioner.store import metadata; print(' '.join(sorted(metadata().tables)))"
    known = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert known == sorted(every_model().tables)


def test_a_fresh_database_is_at_the_newest_revision_and_opening_it_again_changes_nothing(any_url: str) -> None:
    engine = store.open_store(any_url)
    assert store.schema_revision(engine) == store.head_revision()
    assert store.upgrade(store.open_store(any_url)) == (store.head_revision(), store.head_revision())


def test_the_revision_files_name_the_heads_alembic_finds() -> None:
    """open_store reads the heads from the files, without Alembic, to see that a schema is current."""
    assert store._heads_in_files() == store._heads()


def legacy_state_file(tmp_path: Path) -> str:
    """A state file as ``create_all`` made it before migrations: the baseline's tables, no alembic_version."""
    url = sqlite_url(tmp_path)
    engine = store.connect(url)
    with engine.begin() as conn:
        command.upgrade(store._alembic_config(conn), store.BASELINE)
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(text(
            "INSERT INTO operation (run_id, target, identity_key, kind, reason, status, attempts, created_at, "
            "updated_at) VALUES ('r1', 'app', 'E1', 'create', 'joiner', 'pending', 0, '2026-01-01 00:00:00', "
            "'2026-01-01 00:00:00')"
        ))  # fmt: skip
        conn.execute(text("INSERT INTO account_link (target, identity_key, scim_id, active, updated_at) "
                          "VALUES ('app', 'E2', 'id-2', 1, '2026-01-01 00:00:00')"))  # fmt: skip
    engine.dispose()
    return url


def test_tables_a_state_file_got_from_create_all_before_migrations_are_kept(tmp_path: Path) -> None:
    """Before migrations, a newer version's create_all added its new tables on start: adoption keeps them."""
    url = legacy_state_file(tmp_path)
    engine = store.connect(url)
    with engine.begin() as conn:
        store.metadata().tables["unmatched_account"].create(conn)
        conn.execute(text("INSERT INTO unmatched_account (target, scim_id, first_seen_at, last_seen_at) "
                          "VALUES ('app', 'orphan-1', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"))  # fmt: skip
    engine.dispose()

    engine = store.open_store(url)

    assert store.schema_revision(engine) == store.head_revision()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT scim_id FROM unmatched_account")).all() == [("orphan-1",)]


def test_a_state_file_made_before_migrations_is_adopted_without_losing_data(tmp_path: Path) -> None:
    url = legacy_state_file(tmp_path)
    assert store.schema_revision(store.connect(url)) == "legacy"

    engine = store.open_store(url)

    assert store.schema_revision(engine) == store.head_revision()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT identity_key, status FROM operation")).all() == [("E1", "pending")]
        assert conn.execute(text("SELECT scim_id FROM account_link")).all() == [("id-2",)]
    assert [row["identity_key"] for row in claim_rows(engine, "app", ["create"])] == ["E1"]


def mark_newer(url: str) -> None:
    engine = store.open_store(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()


def test_a_database_upgraded_by_a_newer_provisioner_is_refused(any_url: str) -> None:
    mark_newer(any_url)
    with pytest.raises(UserError, match="revision 9999, newer than this provisioner knows"):
        store.open_store(any_url)


def cli(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command_line = [sys.executable, "-m", "provisioner", *args, "--config", str(config)]
    return subprocess.run(command_line, capture_output=True, text=True, timeout=60, env=env)


def write_config(folder: Path, state: str) -> Path:
    path = folder / "config.yaml"
    (folder / "hr.csv").write_text("employee_id,email\n")
    path.write_text(
        f"""state: {state}
sources:
  hr: {{type: csv, path: hr.csv, key: employee_id}}
targets:
  app: {{base_url: "https://scim.example.com", auth: {{type: bearer, token: t}}, source: hr,
         mapping: {Path(__file__).resolve().parents[2] / "mappings" / "users.yaml"}}}
"""
    )
    return path


def test_a_newer_schema_is_a_clear_error_with_exit_3(tmp_path: Path, pg_url: str) -> None:
    mark_newer(pg_url)
    result = cli(write_config(tmp_path, pg_url), "status")
    assert result.returncode == 3
    assert "newer than this provisioner knows" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_db_upgrade_migrates_and_says_so(tmp_path: Path) -> None:
    url = legacy_state_file(tmp_path)
    config = write_config(tmp_path, url)
    first = cli(config, "db", "upgrade")
    assert first.returncode == 0, first.stderr
    assert f"upgraded from legacy to revision {store.head_revision()}" in first.stdout
    again = cli(config, "db", "upgrade")
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_instances_starting_at_once_migrate_once_and_all_start(tmp_path: Path, pg_url: str) -> None:
    """Two processes upgrading an empty database at once: one migrates under the lock, the other finds it done."""
    config = write_config(tmp_path, pg_url)
    command_line = [sys.executable, "-m", "provisioner", "db", "upgrade", "--config", str(config)]
    processes = [subprocess.Popen(command_line, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]  # fmt: skip
    results = [(p.wait(timeout=60), *p.communicate()) for p in processes]
    assert [code for code, _, _ in results] == [0, 0, 0], results
    assert sum("upgraded from an empty database" in out for _, out, _ in results) == 1, results


def test_a_postgresql_url_without_the_driver_names_the_postgres_extra(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    (blocked / "psycopg").mkdir(parents=True)
    # What Python raises for a package that is not installed, for this one only.
    missing = "raise ModuleNotFoundError(\"No module named 'psycopg'\", name='psycopg')\n"
    (blocked / "psycopg" / "__init__.py").write_text(missing)
    env = {**os.environ, "PYTHONPATH": f"{blocked}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    config = write_config(tmp_path, "postgresql://provisioner@127.0.0.1:1/state")
    result = cli(config, "status", env=env)
    assert result.returncode == 3
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "`postgres` extra" in result.stderr and "pip install 'provisioner[postgres]'" in result.stderr


def test_a_sqlite_state_file_still_refuses_a_second_process(tmp_path: Path) -> None:
    """The file lock that guards migrations on SQLite is the one that keeps a second daemon out."""
    from provisioner.lock import StateLock

    url = sqlite_url(tmp_path)
    with StateLock(url):
        engine = store.open_store(url)  # the holder may open (and migrate) its own store
        assert store.schema_revision(engine) == store.head_revision()
        other = subprocess.run(
            [sys.executable, "-c", f"from provisioner.lock import StateLock; StateLock({url!r}).acquire()"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "another provisioner process" in other.stderr
    sqlite3.connect(tmp_path / "state.db").close()


def test_a_claim_walks_the_claim_index_instead_of_sorting_the_queue(any_url: str) -> None:
    """A claim reads the rows it takes in the index's order: at 100,000 open rows a sort of them all cost 95 ms."""
    engine = store.open_store(any_url)
    now = store.utcnow()
    rows = [{"run_id": "r", "target": "app", "identity_key": f"E{n:05d}", "kind": "create", "reason": "joiner",
             "status": "succeeded" if n % 2 else "pending", "attempts": 0, "created_at": now, "updated_at": now}
            for n in range(2000)]  # fmt: skip
    with engine.begin() as conn:
        conn.execute(store.Operation.__table__.insert(), rows)
        if engine.dialect.name == "postgresql":
            conn.execute(text("ANALYZE operation"))
    statements: list[tuple[str, object]] = []

    def seen(_conn: object, _cursor: object, statement: str, parameters: object, *_: object) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "ORDER BY" in statement:
            statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", seen)
    assert len(claim_rows(engine, "app", ["create"], limit=10)) == 10
    event.remove(engine, "before_cursor_execute", seen)
    (statement, parameters), = statements
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(("EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN ") + statement, parameters)
        plan = "\n".join(str(row[-1] if sqlite else row[0]) for row in rows)
    engine.dispose()
    assert "ix_operation_claim" in plan
    assert "sort" not in plan.lower() and "B-TREE" not in plan
