"""A private PostgreSQL server for tests and benchmarks: initdb in a temporary folder, started and stopped.

    with PostgresServer() as pg:
        url = pg.create_database("t1")   # postgresql://provisioner@127.0.0.1:PORT/t1

The Debian ``postgresql`` package's binaries (or any ``initdb`` on PATH) are
used; ``.ci/run`` installs the package when they are missing. The cluster
listens on a free port of 127.0.0.1 and on a unix socket in its own folder,
trusts local connections (nothing leaves the machine) and runs with fsync off
(a test's data need not survive a power cut); ``PostgresServer(durable=True)``
keeps PostgreSQL's own defaults (every commit waits for its WAL flush), for
benchmarks that measure what a deployment pays. PostgreSQL refuses to run as
root: under root the cluster belongs to the ``postgres`` user (which the
package creates), and every server command runs through ``runuser``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from tests.system_packages import ensure_installed

SUPERUSER = "provisioner"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def find_bindir() -> Path:
    """The folder of ``initdb`` and ``pg_ctl`` (installed from Debian's ``postgresql`` when missing and root).

    Raise PostgresUnavailable when there is none.
    """
    ensure_installed(["postgresql"], lambda: _bindir() is not None)
    folder = _bindir()
    if folder is not None:
        return folder
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install them "
        "(apt-get install -y postgresql; .ci/run does it)"
    )


def _bindir() -> Path | None:
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster of our own, from initdb to stop."""

    def __init__(self, *, durable: bool = False) -> None:
        self.bindir = find_bindir()
        self.durable = durable
        self.root = Path(tempfile.mkdtemp(prefix="provisioner-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._user = "postgres" if os.geteuid() == 0 else None
        self._started = False

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", self._user, "--"] if self._user else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, cwd=self.root)

    def start(self) -> PostgresServer:
        """initdb, then start the server and wait until it accepts connections."""
        if self._user:
            entry = pwd.getpwnam(self._user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                  "-E", "UTF8", "--no-sync")  # fmt: skip
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
                  "-o", options, "-w", "-t", "60", "start")  # fmt: skip
        self._started = True
        return self

    def stop(self) -> None:
        """Stop the server at once and remove its folder."""
        if self._started:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            self._started = False
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL for a database of this server (the driver is chosen by the engine)."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database; return its URL."""
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname=postgres",
                             autocommit=True) as conn:  # fmt: skip
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
