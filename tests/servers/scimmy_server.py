"""SCIMMY (npm ``scimmy`` + ``scimmy-routers`` on Node.js) as a test SCIM server.

    server = start_scimmy_server()
    ...point the engine at server.base_url with server.token...
    server.dump()       # {"Users": [...], "Groups": [...]}: the app's store, read outside SCIM
    server.request_count()
    server.stop()

The app is ``tests/servers/scimmy/server.js``, its dependencies pinned in the
``package-lock.json`` beside it; ``npm ci`` installs them the first time.
Node.js 18 or newer must be installed (``apt-get install nodejs npm``).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from provisioner.demo import stop_process
from tests.system_packages import ensure_installed

APP = Path(__file__).resolve().parent / "scimmy"


class NodeMissing(RuntimeError):
    """Node.js or npm is not installed: the SCIMMY server cannot run."""


def install(app: Path = APP) -> None:
    """Run ``npm ci`` in the app's folder once (when ``node_modules`` is missing); raise NodeMissing or RuntimeError."""
    if not ensure_installed(["nodejs", "npm"], lambda: bool(shutil.which("node") and shutil.which("npm"))):
        raise NodeMissing(
            "Node.js is not installed: the SCIMMY tests need node 18+ and npm (apt-get install nodejs npm)"
        )
    # One install at a time, also across processes running tests side by side.
    with (app / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (app / "node_modules" / "scimmy-routers").is_dir():
            return
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=app,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"npm ci failed in {app} (exit {done.returncode}): {done.stderr.strip()[-2000:]}")


@dataclass
class ScimmyServer:
    """A running SCIMMY app on 127.0.0.1: ``base_url``, ``token``; ``dump()``, ``clear()``, ``stop()``."""

    port: int
    token: str
    process: subprocess.Popen[str]
    log: Path | None = None  # the app's stderr

    @property
    def base_url(self) -> str:
        """The SCIM base URL: ``http://127.0.0.1:PORT/scim/v2``."""
        return f"http://127.0.0.1:{self.port}/scim/v2"

    def _test(self, method: str, path: str) -> httpx.Response:
        response = httpx.request(
            method, f"http://127.0.0.1:{self.port}/_test/{path}",
            headers={"Authorization": f"Bearer {self.token}"}, timeout=10,
        )  # fmt: skip
        response.raise_for_status()
        return response

    def dump(self) -> dict[str, list[dict[str, Any]]]:
        """What the app stores: ``{"Users": [...], "Groups": [...]}``, read outside the SCIM routes."""
        body = self._test("GET", "dump").json()
        return {"Users": body["Users"], "Groups": body["Groups"]}

    def request_count(self) -> int:
        """How many SCIM requests the app received since it started or was cleared."""
        return int(self._test("GET", "dump").json()["requests"])

    def clear(self) -> None:
        """Delete every resource and reset the request count."""
        self._test("POST", "clear")

    def stop(self) -> None:
        """Stop the app (its data goes with it)."""
        stop_process(self.process)
        if self.process.stdout:
            self.process.stdout.close()
        if self.log is not None:
            self.log.unlink(missing_ok=True)

    def __enter__(self) -> ScimmyServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_scimmy_server(token: str | None = None, wait: float = 30.0) -> ScimmyServer:
    """Install the app if needed, start it on a free port and wait until it listens.

    Raises NodeMissing without Node.js, RuntimeError if npm ci fails or the app does not start in ``wait`` s.
    """
    install()
    token = token or secrets.token_urlsafe(24)
    # The app's errors go to a file: a pipe nobody reads could fill up and block it.
    errors = tempfile.NamedTemporaryFile("w", prefix="scimmy-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(
        ["node", str(APP / "server.js"), "--port", "0"],
        cwd=APP,
        # The token goes in the environment, not on a command line that `ps` shows.
        env={**os.environ, "SCIM_TOKEN": token},
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
    )
    errors.close()
    first_line: list[str] = []
    reader = threading.Thread(target=lambda: first_line.append(process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(wait)
    line = first_line[0].strip() if first_line else ""
    if not line.startswith("listening "):
        process.kill()
        process.wait()
        stderr = Path(errors.name).read_text(encoding="utf-8", errors="replace")
        Path(errors.name).unlink(missing_ok=True)
        raise RuntimeError(f"the SCIMMY app did not start within {wait:.0f} s: {line or stderr.strip()[-2000:]}")
    return ScimmyServer(int(line.split()[1]), token, process, Path(errors.name))


def running_scimmy() -> Iterator[ScimmyServer]:
    """The body of a fixture: start the app (failing the test without Node.js), yield it, stop it."""
    try:
        server = start_scimmy_server()
    except NodeMissing as error:
        pytest.fail(str(error))
    try:
        yield server
    finally:
        server.stop()
