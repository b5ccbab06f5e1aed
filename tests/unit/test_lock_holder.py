"""Whether the process that held a SQLite state file's lock lives: what a `running` run is worth."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from provisioner.lock import StateLock, holder_gone


def test_a_dead_holders_pid_is_gone_a_live_ones_is_not(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    lock_file = tmp_path / "state.db.lock"
    assert holder_gone(url) is True  # never held

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_file.write_text(ended.stdout.strip())
    assert holder_gone(url) is True

    alive = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        lock_file.write_text(str(alive.pid))
        assert holder_gone(url) is False
    finally:
        alive.communicate(b"")


def test_this_process_holding_the_lock_is_not_gone_and_having_let_go_is(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    with StateLock(url):
        assert holder_gone(url) is False
    assert (tmp_path / "state.db.lock").read_text() == str(os.getpid())
    assert holder_gone(url) is True


def test_a_shared_database_is_not_judged_by_a_lock_file() -> None:
    assert holder_gone("postgresql://provisioner@db/provisioner") is None
