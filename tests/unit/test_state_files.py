"""The state database holds HR personal data: created readable by its owner only."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from provisioner.demo import ScimServer, write_demo_config
from provisioner.store import open_store


@pytest.fixture
def wide_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_database_and_its_wal_and_shm_files_are_created_0600(tmp_path: Path, wide_umask: None) -> None:
    database = tmp_path / "state.db"

    engine = open_store(f"sqlite:///{database}")
    with engine.begin() as conn:
        conn.execute(text("SELECT count(*) FROM operation"))
        files = sorted(tmp_path.glob("state.db*"))

        # The lock file: the schema was created under the state lock.
        names = ("state.db", "state.db-shm", "state.db-wal", "state.db.lock")
        assert [p.name for p in files] == list(names)
        assert {p.name: mode(p) for p in files} == dict.fromkeys(names, 0o600)
    engine.dispose()


def test_a_database_left_world_readable_by_an_earlier_version_is_narrowed(tmp_path: Path, wide_umask: None) -> None:
    database = tmp_path / "state.db"
    open_store(f"sqlite:///{database}").dispose()
    database.chmod(0o644)

    open_store(f"sqlite:///{database}").dispose()

    assert mode(database) == 0o600


def test_the_demo_folder_is_private(tmp_path: Path, wide_umask: None, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "demo"
    monkeypatch.setenv("PROVISIONER_DEMO_TOKEN", "")  # restored after the test; the demo sets it

    write_demo_config(folder, ScimServer(port=1, token="demo-token-for-a-test", process=None))  # type: ignore[arg-type]

    assert mode(folder) == 0o700
