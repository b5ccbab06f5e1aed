"""The demo: a real local SCIM 2.0 target (scim2-server), the sample HR file, one cycle.

The same launcher starts the SCIM server of the integration tests.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx

from provisioner.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO_SOURCE = PROJECT_ROOT / "examples" / "hr.csv"
DEMO_MAPPING = PROJECT_ROOT / "mappings" / "users.yaml"
DEMO_GROUPS = PROJECT_ROOT / "mappings" / "groups.yaml"
TOKEN_VARIABLE = "PROVISIONER_DEMO_TOKEN"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """Stop a child process if it still runs: terminate, wait 5 s, then kill."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class ScimServer:
    """A scim2-server process on 127.0.0.1, in memory, stopped on exit."""

    port: int
    token: str
    process: subprocess.Popen[bytes]

    @property
    def base_url(self) -> str:
        """The SCIM base URL of the server."""
        return f"http://127.0.0.1:{self.port}/v2"

    def stop(self) -> None:
        """Stop the server (its data goes with it)."""
        stop_process(self.process)

    def __enter__(self) -> ScimServer:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def start_scim_server(port: int | None = None, token: str | None = None, wait: float = 20.0) -> ScimServer:
    """Start scim2-server and wait until it answers; raise UserError if it is not installed."""
    executable = shutil.which("scim2-server") or str(Path(sys.executable).with_name("scim2-server"))
    if not Path(executable).exists():
        raise UserError("scim2-server is not installed; install the demo extra: pip install -e '.[demo]'")
    port = port or free_port()
    token = token or secrets.token_urlsafe(24)
    process = subprocess.Popen(
        [executable, "--hostname", "127.0.0.1", "--port", str(port), f"--bearer-token={token}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = ScimServer(port, token, process)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UserError(f"scim2-server exited at start (code {process.returncode}); is port {port} free?")
        try:
            response = httpx.get(
                f"{server.base_url}/ServiceProviderConfig", headers={"Authorization": f"Bearer {token}"}, timeout=1
            )
            if response.status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    server.stop()
    raise UserError(f"scim2-server did not answer on port {port} within {wait:.0f} s")


def write_demo_config(folder: Path, server: ScimServer) -> Path:
    """Write the demo's config file (the token stays in the environment, not in the file)."""
    # The demo's state holds (sample) personal data and its config: only the owner reads the folder.
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    os.environ[TOKEN_VARIABLE] = server.token
    path = folder / "config.yaml"
    path.write_text(
        f"""# Written by `provisioner demo`: a local scim2-server and the bundled sample HR file.
state: sqlite:///state.db
sources:
  hr:
    type: csv
    path: {DEMO_SOURCE}
    key: employee_id
targets:
  demo-app:
    base_url: {server.base_url}
    allow_insecure_http: true      # a local demo server on 127.0.0.1
    auth: {{type: bearer, token: "${{{TOKEN_VARIABLE}}}"}}
    source: hr
    mapping: {DEMO_MAPPING}
    groups: {DEMO_GROUPS}
    leaver: disable
""",
        encoding="utf-8",
    )
    return path
