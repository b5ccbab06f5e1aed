"""A create that was sent but never confirmed may have made the account: a leaver's is not dropped.

A process killed while its POST was on the wire (or a POST whose answer was
lost) leaves the create open with no link: the account may exist in the
target, active. If the identity leaves before the create is retried, the plan
has nothing to disable (no link) and the identity looks settled; superseding
the open create then leaves the account active for good, with no row saying so
(the crash run, ``tests/crashrun.py``, found a leaver left active this way).
Kept, it is sent with ``active: false``: it adopts the account disabled, or,
when the first POST never reached the target, makes it disabled.
Against a real scim2-server over HTTP.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from provisioner.demo import ScimServer
from provisioner.schema import CORE_USER
from tests.conftest import ScimReader, Workspace, hr_row
from tests.faultproxy import fault_proxy  # noqa: F401 - a fixture, found by name
from tests.integration.test_bad_operations import behind
from tests.integration.test_owed_references import next_cycle

ADA = hr_row("E1", "Ada", "Lovelace")
LEFT = {**ADA, "status": "terminated"}
BOB = hr_row("E2", "Bob", "Babbage")


def test_a_leaver_whose_create_may_have_been_applied_ends_disabled(
    workspace: Workspace, scim_server: ScimServer, scim: ScimReader, fault_proxy: Any
) -> None:
    # The POST reaches the target, its answer does not come back: the account exists, unlinked.
    def lost(method: str, path: str, body: bytes | None) -> int | None:
        if method == "POST" and body is not None and ADA["email"].encode() in body:
            scim.http.post("Users", json={"schemas": [CORE_USER], "userName": ADA["email"], "active": True})
            return 503
        return None

    proxy = fault_proxy(scim_server.base_url, answer=lost)
    behind(workspace, proxy.base_url, scim_server.token)
    workspace.write_source([ADA])
    workspace.sync_now()
    assert scim.user(ADA["email"])["active"] is True, "the set-up: made, yet unconfirmed"
    assert [(r["kind"], r["status"]) for r in workspace.operations()] == [("create", "retry_wait")]

    workspace.write_source([LEFT])
    next_cycle(workspace)  # the create is finished: it adopts the account it made, and disables it

    assert scim.user(ADA["email"])["active"] is False
    assert not [row for row in workspace.operations() if row["status"] not in ("succeeded", "superseded")]
    next_cycle(workspace)
    assert scim.user(ADA["email"])["active"] is False
    assert [(r["kind"], r["status"]) for r in workspace.operations()] == [("create", "succeeded")]


def sync_with_adas_create_lost(
    workspace: Workspace, scim_server: ScimServer, fault_proxy: Any, people: list[dict[str, str]]
) -> Callable[[], None]:
    """Sync ``people`` behind a proxy that answers 503 to Ada's POSTs; returns what lets them through again."""
    refusing = [True]

    # Her POSTs never reach the target; the engine cannot know they did not.
    def lost(method: str, path: str, body: bytes | None) -> int | None:
        return 503 if method == "POST" and ADA["email"].encode() in (body or b"") and refusing[0] else None

    def let_through() -> None:
        refusing[0] = False

    proxy = fault_proxy(scim_server.base_url, answer=lost)
    behind(workspace, proxy.base_url, scim_server.token)
    workspace.write_source(people)
    workspace.sync_now()
    return let_through


def test_a_leaver_whose_create_never_reached_the_target_is_never_active_there(
    workspace: Workspace, scim_server: ScimServer, scim: ScimReader, fault_proxy: Any
) -> None:
    """The retry of a tried create for someone who left since makes the account disabled, not active for a cycle."""
    let_through = sync_with_adas_create_lost(workspace, scim_server, fault_proxy, [ADA])
    assert scim.find(ADA["email"]) == [], "the set-up: tried, nothing made"
    assert [(r["kind"], r["status"]) for r in workspace.operations()] == [("create", "retry_wait")]

    let_through()
    workspace.write_source([LEFT])
    next_cycle(workspace)

    assert scim.user(ADA["email"])["active"] is False
    assert [(r["kind"], r["status"]) for r in workspace.operations()] == [("create", "succeeded")]


def test_a_tried_create_of_someone_gone_from_the_source_makes_no_active_account(
    workspace: Workspace, scim_server: ScimServer, scim: ScimReader, fault_proxy: Any
) -> None:
    """Gone from the HR file altogether is leaving too: the kept create is sent disabled."""
    let_through = sync_with_adas_create_lost(workspace, scim_server, fault_proxy, [ADA, BOB])
    assert scim.find(ADA["email"]) == []

    let_through()
    workspace.write_source([BOB])
    next_cycle(workspace)

    assert scim.user(ADA["email"])["active"] is False
    assert scim.user(BOB["email"])["active"] is True
    assert not [row for row in workspace.operations() if row["status"] not in ("succeeded", "superseded")]
