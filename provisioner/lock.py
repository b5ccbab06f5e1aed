"""Who may do what at once: one process per SQLite state file, one planner per target.

SQLite: an exclusive lock file beside the database (``StateLock``); one daemon
or sync per file, so it is the only planner and the only claimer.
PostgreSQL: several instances share the database. Rows are claimed with
``FOR UPDATE SKIP LOCKED`` and a lease (see ``provisioner.queue``); planning a
target is one instance's job at a time, through a session-level advisory lock
(``PlannerLock``) that PostgreSQL releases when the holder's connection ends:
when it dies, another instance takes over at its next cycle.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path
from types import TracebackType

import structlog
from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from provisioner.errors import UserError

log = structlog.get_logger("provisioner.lock")

# Lock files this process holds, with how many holders: a holder may open the store again.
_HELD: dict[Path, list[int]] = {}


class StateLock:
    """An exclusive, non-blocking lock on ``<database>.lock``; released when the process dies.

    Re-entrant within a process (the daemon holds it, and opening the store may
    need it to migrate).
    """

    def __init__(self, state_url: str) -> None:
        url = make_url(state_url)
        database = url.database if url.get_backend_name() == "sqlite" else None
        # Other databases coordinate several instances with row locks and advisory locks instead.
        self.path = Path(f"{database}.lock").resolve() if database and database != ":memory:" else None
        self._held = False

    def acquire(self) -> None:
        """Take the lock, or raise UserError naming the process that holds it."""
        if self.path is None or self._held:
            return
        if self.path in _HELD:
            _HELD[self.path][1] += 1
            self._held = True
            return
        handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(handle, 32).decode(errors="replace").strip() or "unknown"
            os.close(handle)
            raise UserError(
                f"another provisioner process (pid {holder}) is using {self.path.with_suffix('')}; "
                "only one daemon or sync may use a SQLite state file at a time"
            ) from None
        os.ftruncate(handle, 0)
        os.write(handle, str(os.getpid()).encode())
        _HELD[self.path] = [handle, 1]
        self._held = True

    def release(self) -> None:
        """Let go of the lock (the file's lock goes when its last holder in this process lets go)."""
        if self.path is None or not self._held:
            return
        self._held = False
        entry = _HELD[self.path]
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[self.path]
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.release()


def holder_gone(state_url: str) -> bool | None:
    """Whether no live process holds a SQLite state file's lock now: a ``running`` run then runs no more.

    Read from the pid the last holder wrote in the lock file, without taking
    the lock (a daemon starting meanwhile must not find it taken). True when
    no process ever held it, when that process is gone, or when it was this
    one and it has let go; False when that process lives (a reused pid reads
    as alive: the answer errs towards running). None for other databases,
    where several instances share the state and leases say who is alive.
    """
    path = StateLock(state_url).path
    if path is None:
        return None
    if path in _HELD:
        return False
    try:
        pid = int(path.read_text(errors="replace").strip() or 0)
    except (OSError, ValueError):
        return True
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def advisory_key(*parts: str) -> int:
    """A stable signed 64-bit advisory lock key for a name (PostgreSQL's bigint)."""
    digest = hashlib.blake2b("\0".join(("provisioner", *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class PlannerLock:
    """One planner per target among the instances sharing a database.

    ``holds(target)`` says whether this instance plans the target: on
    PostgreSQL it tries ``pg_try_advisory_lock`` on the target's key, on one
    connection kept for the instance's lifetime, and keeps the lock once it
    has it. A SQLite state file has one process (``StateLock``): it always plans.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.shared = engine.dialect.name == "postgresql"
        self._conn: Connection | None = None
        self._held: set[str] = set()

    def holds(self, target: str) -> bool:
        """Whether this instance is (now) the target's planner; never raises for a lost connection."""
        if not self.shared:
            return True
        try:
            if self._conn is None:
                self._conn = self.engine.connect()
                self._held.clear()
            if target in self._held:
                # Still ours as long as the session that took it is alive.
                self._conn.exec_driver_sql("SELECT 1")
            else:
                query = text("SELECT pg_try_advisory_lock(:key)")
                if self._conn.execute(query, {"key": advisory_key("planner", target)}).scalar():
                    self._held.add(target)
                    log.info("planning this target: no other instance does", target=target)
            self._conn.commit()
        except DBAPIError as exc:
            log.warning("lost the planner lock's connection; planning again once it is back", error=str(exc))
            self.close()
            return False
        return target in self._held

    def close(self) -> None:
        """Let go of every planner lock (closing the session releases them)."""
        if self._conn is not None:
            try:
                # Closed for good, not back to the pool: a pooled session would keep the locks.
                self._conn.invalidate()
                self._conn.close()
            except DBAPIError:
                pass
        self._conn = None
        self._held.clear()
