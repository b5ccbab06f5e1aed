"""One daemon (or one sync) per SQLite state file: an exclusive lock beside the database."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from sqlalchemy.engine import make_url

from provisioner.errors import UserError


class StateLock:
    """An exclusive, non-blocking lock on ``<database>.lock``; released when the process dies."""

    def __init__(self, state_url: str) -> None:
        url = make_url(state_url)
        database = url.database if url.get_backend_name() == "sqlite" else None
        # Other databases coordinate several instances with row locks instead.
        self.path = Path(f"{database}.lock") if database and database != ":memory:" else None
        self._handle: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise UserError naming the process that holds it."""
        if self.path is None:
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
        self._handle = handle

    def release(self) -> None:
        """Let go of the lock."""
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            os.close(self._handle)
            self._handle = None

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.release()
