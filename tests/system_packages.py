"""Debian packages the tests need beyond Python's (Node.js for SCIMMY, PostgreSQL's server binaries).

The README's test command must work on a fresh machine: when a program is
missing and the tests run as root on a Debian-like system (as CI does), the
package is installed with apt-get, once, under a lock shared by every test
process. Anywhere else the caller gets a clear error naming the package.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

_LOCK = Path(tempfile.gettempdir()) / "provisioner-tests-apt.lock"


def ensure_installed(packages: list[str], present: Callable[[], bool]) -> bool:
    """Install ``packages`` with apt-get when ``present()`` is false; return ``present()`` afterwards.

    Nothing is installed unless the process is root and apt-get exists; the
    caller raises its own error (naming the packages) when this returns False.
    """
    if present():
        return True
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    with _LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if present():
            return True
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-q", *packages], env=env, capture_output=True, check=False,
                       timeout=1200)  # fmt: skip
    return present()
