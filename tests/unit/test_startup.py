"""The command line's help loads argparse, not the engine.

``provisioner --help`` once took over a second of CPU importing SQLAlchemy, the SCIM client
and the scheduler it never used. What is checked is which modules are loaded, not how long
it takes: a time depends on the machine, a module list does not.
"""

from __future__ import annotations

import json
import subprocess
import sys

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
