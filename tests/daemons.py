"""A real ``provisioner run`` process for the tests that need one: start it, stop it, kill it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path


def start_daemon(
    config: Path, env: Mapping[str, str] | None = None, *, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start `provisioner run` on ``config`` in the config's folder, ``env`` added to this process's environment.

    Its output goes to ``log`` (``daemon.log`` beside the config unless told), appended:
    a pipe nobody reads would fill up.
    """
    config = Path(config).absolute()
    command = [sys.executable, "-m", "provisioner", "--log-format", "json", "run", "--config", str(config)]
    with (log or config.parent / "daemon.log").open("ab") as out:
        return subprocess.Popen(command, cwd=config.parent, env={**os.environ, **(env or {})}, stdout=out, stderr=out)


def stop_daemon(daemon: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM, then its exit code."""
    daemon.send_signal(signal.SIGTERM)
    return daemon.wait(timeout=timeout)


def kill_daemon(daemon: subprocess.Popen[bytes]) -> None:
    """kill -9, and wait for it to be gone."""
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait(timeout=10)


def wait_for(
    what: str, predicate: Callable[[], object], timeout: float = 60.0, *, state: Callable[[], object] | None = None
) -> None:
    """Poll ``predicate`` until it holds; after ``timeout`` seconds fail, naming ``what`` (and ``state()``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"waited {timeout:.0f} s for: {what}" + (f"; {state()}" if state else ""))
