"""The command line's help loads argparse, not the engine.

``provisioner --help`` once took over a second of CPU importing SQLAlchemy, the SCIM client
and the scheduler it never used. What is checked is which modules are loaded, not how long
it takes: a time depends on the machine, a module list does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The engine's heavy dependencies, and our own SCIM client that pulls in httpx and authlib.
HEAVY = (
    "alembic",
    "apscheduler",
    "authlib",
    "connectors",
    "httpx",
    "jinja2",
    "prometheus_client",
    "pydantic",
    "rich",
    "sqlalchemy",
    "sqlmodel",
    "structlog",
)

_HELP_EVERYWHERE = """
import contextlib, io, json, sys
from provisioner import cli

def paths(parser, path):
    yield path
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield from paths(sub, [*path, name])

def loaded():
    return sorted({name.split(".")[0] for name in sys.modules} & set(sys.argv[1:]))

asked = [[*path, "--help"] for path in paths(cli._parser(), [])] + [["--version"]]
for argv in asked:
    with contextlib.redirect_stdout(io.StringIO()) as shown, contextlib.suppress(SystemExit):
        cli.main(argv)
    assert shown.getvalue(), argv
after_help = loaded()
import provisioner.sync  # a command that runs: the check must see what it loads
print(json.dumps({"asked": asked, "after_help": after_help, "after_sync": loaded()}))
"""


def test_help_of_every_command_and_version_load_no_heavy_module() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _HELP_EVERYWHERE, *HEAVY], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)

    assert ["queue", "list", "--help"] in found["asked"] and ["probe", "--help"] in found["asked"]
    assert found["after_help"] == []
    assert {"sqlalchemy", "structlog"} <= set(found["after_sync"])


ROOT = Path(__file__).resolve().parents[2]

# A CSV source and one target on an address where nothing listens: neither command talks to it.
_CONFIG = f"""state: sqlite:///state.db
sources:
  hr:
    type: csv
    path: {ROOT / "examples" / "hr.csv"}
    key: employee_id
targets:
  app:
    base_url: http://127.0.0.1:9/scim/v2
    allow_insecure_http: true
    auth: {{type: bearer, token: "${{STARTUP_TOKEN}}"}}
    source: hr
    mapping: {ROOT / "mappings" / "users.yaml"}
    leaver: disable
"""

_COMMAND = """
import json, sys
from provisioner import cli

def loaded():
    return sorted({name.split(".")[0] for name in sys.modules} & set(sys.argv[2:]))

code = cli.main([sys.argv[1], "--log-format", "json"])
ran = loaded()
import provisioner.targets  # what talks to a target: the check must see what it loads
print(json.dumps({"code": code, "ran": ran, "after_targets": loaded()}))
"""

# What only talking to a target (or running the daemon's schedule) needs.
TARGET_SIDE = ("apscheduler", "authlib", "httpx", "tenacity")


@pytest.mark.parametrize("command", ["status", "check"])
def test_status_and_check_load_nothing_that_talks_to_a_target(tmp_path: Path, command: str) -> None:
    (tmp_path / "config.yaml").write_text(_CONFIG, encoding="utf-8")
    env = {**os.environ, "STARTUP_TOKEN": "startup-token-for-the-test"}
    done = subprocess.run(
        [sys.executable, "-c", _COMMAND, command, *TARGET_SIDE],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])

    assert found["code"] == 0, done.stderr
    assert found["ran"] == []
    assert {"httpx", "authlib"} <= set(found["after_targets"])


def test_the_lifecycle_words_load_no_heavy_module() -> None:
    """``from provisioner import Reason`` takes the enum from where it lives, not through the planner."""
    code = "import json, sys\nfrom provisioner import Reason\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)

    assert done.returncode == 0, done.stderr
    assert sorted({name.split(".")[0] for name in json.loads(done.stdout)} & set(HEAVY)) == []
