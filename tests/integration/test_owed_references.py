"""A reference that could not be resolved when an account was written is owed, and sent once it can be.

A report created while its manager's account does not exist yet is created
without ``manager``. An update sends the manager later, but a leaver gets no
update: only its disable. Both tests make the manager's create fail on demand
(a proxy answering 503 to its writes) and terminate the report before the
manager exists; the report's account must end disabled *and* pointing at its
manager, as the crash run (``tests/crashrun.py``) expects of every account.
Against a real scim2-server over HTTP.
"""

from __future__ import annotations

from typing import Any

from provisioner.demo import ScimServer
from provisioner.queue import Selection, retry_now
from provisioner.store import open_store
from tests.conftest import ENTERPRISE, ScimReader, Workspace, hr_row
from tests.faultproxy import fault_proxy  # noqa: F401 - a fixture, found by name
from tests.integration.test_bad_operations import behind

MANAGER = hr_row("E1", "Mary", "Manager")
REPORT = hr_row("E2", "Rick", "Report", manager_id="E1")
LEFT = {**REPORT, "status": "terminated"}


class ManagerWrites:
    """A proxy hook: 503 to every write of the manager's account while ``refused``."""

    def __init__(self) -> None:
        self.refused = True

    def __call__(self, method: str, path: str, body: bytes | None) -> int | None:
        blocked = self.refused and method != "GET" and body is not None and MANAGER["email"].encode() in body
        return 503 if blocked else None


def report_created_without_its_manager(workspace: Workspace, scim_server: ScimServer, fault_proxy: Any,
                                       scim: ScimReader) -> ManagerWrites:  # fmt: skip
    """Cycle 1: the manager's create waits for a retry, the report is created without ``manager``."""
    hook = ManagerWrites()
    proxy = fault_proxy(scim_server.base_url, answer=hook)
    behind(workspace, proxy.base_url, scim_server.token)
    workspace.write_source([MANAGER, REPORT])
    workspace.sync_now()
    assert not scim.find(MANAGER["email"])
    assert "manager" not in scim.user(REPORT["email"])[ENTERPRISE], "the set-up: created before its manager"
    return hook


def next_cycle(workspace: Workspace) -> None:
    """Retries due now, as time passing makes them; then one cycle."""
    engine = open_store(f"sqlite:///{workspace.db_path}")
    try:
        retry_now(engine, Selection(status="retry_wait"))
    finally:
        engine.dispose()
    workspace.sync_now()


def assert_disabled_under_its_manager(workspace: Workspace, scim: ScimReader) -> None:
    report = scim.user(REPORT["email"])
    assert report["active"] is False
    assert report[ENTERPRISE].get("manager", {}).get("value") == scim.user(MANAGER["email"])["id"]
    assert not [row for row in workspace.operations() if row["status"] not in ("succeeded", "superseded")]


def test_a_leaver_disabled_in_the_cycle_its_manager_is_created_gets_the_manager_it_was_owed(
    workspace: Workspace, scim_server: ScimServer, scim: ScimReader, fault_proxy: Any
) -> None:
    hook = report_created_without_its_manager(workspace, scim_server, fault_proxy, scim)
    workspace.write_source([MANAGER, LEFT])
    hook.refused = False

    next_cycle(workspace)  # the manager's create, then the report's disable

    assert_disabled_under_its_manager(workspace, scim)


def test_a_leaver_disabled_before_its_manager_exists_gets_the_manager_once_it_does(
    workspace: Workspace, scim_server: ScimServer, scim: ScimReader, fault_proxy: Any
) -> None:
    hook = report_created_without_its_manager(workspace, scim_server, fault_proxy, scim)
    workspace.write_source([MANAGER, LEFT])
    next_cycle(workspace)  # disabled; the manager's create still waits
    assert scim.user(REPORT["email"])["active"] is False and not scim.find(MANAGER["email"])
    hook.refused = False

    next_cycle(workspace)  # the manager is created
    next_cycle(workspace)  # the report owes a reference that resolves now

    assert_disabled_under_its_manager(workspace, scim)


def test_nothing_is_sent_for_an_owed_reference_to_an_account_that_never_exists(
    workspace: Workspace, scim_server: ScimServer, scim: ScimReader, fault_proxy: Any
) -> None:
    """The manager's writes keep failing: the disabled report is left alone, cycle after cycle."""
    report_created_without_its_manager(workspace, scim_server, fault_proxy, scim)
    workspace.write_source([MANAGER, LEFT])
    next_cycle(workspace)

    report = workspace.sync_now()

    assert report.done["disable"] == 0 and report.done["update"] == 0
    assert scim.user(REPORT["email"])["active"] is False
