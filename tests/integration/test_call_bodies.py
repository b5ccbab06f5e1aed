"""Which calls keep their bodies in the queue (``call_bodies``), against a real scim2-server over HTTP.

A proxy in front of it (:class:`tests.faultproxy.FaultProxy`) refuses one
person's writes and answers another's first POST with a 503.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from provisioner.demo import ScimServer
from tests.conftest import Workspace
from tests.faultproxy import fault_proxy  # noqa: F401 - a fixture, found by name
from tests.integration.test_cli import provisioner
from tests.integration.test_bad_operations import BAD, GOOD1, GOOD2, RETRY, bad_writes


# GOOD1 succeeds at once, BAD always fails, GOOD2 succeeds on its second attempt.
class Faults:
    def __init__(self) -> None:
        self.first_post_of_good2 = True

    def __call__(self, method: str, path: str, body: bytes | None) -> int | None:
        if method == "POST" and body and b"good2@example.com" in body and self.first_post_of_good2:
            self.first_post_of_good2 = False
            return 503
        return bad_writes(method, path, body)


def calls_of(workspace: Workspace, key: str) -> list[tuple[str, int | None, Any, Any]]:
    rows = workspace.query(
        "SELECT a.method, a.http_status, a.request_body, a.response_body FROM attempt a"
        " JOIN operation o ON o.id = a.operation_id WHERE o.identity_key = ? ORDER BY a.id",
        key,
    )
    return [tuple(row) for row in rows]


def synced(workspace: Workspace, scim_server: ScimServer, fault_proxy: Any, **options: str) -> None:
    proxy = fault_proxy(scim_server.base_url, answer=Faults())
    workspace.server = SimpleNamespace(base_url=proxy.base_url, token=scim_server.token)  # type: ignore[assignment]
    workspace.write_config(retry=RETRY, **options)
    workspace.write_source([GOOD1, BAD, GOOD2])
    workspace.sync_now()


def test_by_default_a_call_of_an_operation_that_succeeded_at_once_keeps_no_body(
    workspace: Workspace, scim_server: ScimServer, fault_proxy: Any
) -> None:
    synced(workspace, scim_server, fault_proxy, call_bodies="failures")

    # Succeeded at once: what was sent is the operation's payload; the call keeps its method, status, timing.
    [(method, status, sent, answered)] = calls_of(workspace, GOOD1["employee_id"])
    assert (method, status, sent, answered) == ("POST", 201, None, None)
    # Failed: every call keeps what was sent and what came back.
    bad = calls_of(workspace, BAD["employee_id"])
    assert bad and all(status == 500 and "bad@example.com" in sent and answered for _, status, sent, answered in bad)
    # Succeeded after a 503: the whole story is kept, the successful POST's bodies too.
    good2 = calls_of(workspace, GOOD2["employee_id"])
    assert [status for _, status, _, _ in good2] == [503, 201]
    assert all(sent and "good2@example.com" in sent for _, _, sent, _ in good2)
    assert json.loads(good2[-1][3])["userName"] == "good2@example.com"


def test_call_bodies_all_keeps_every_body(workspace: Workspace, scim_server: ScimServer, fault_proxy: Any) -> None:
    synced(workspace, scim_server, fault_proxy, call_bodies="all")

    [(method, status, sent, answered)] = calls_of(workspace, GOOD1["employee_id"])
    assert (method, status) == ("POST", 201)
    assert json.loads(sent)["userName"] == json.loads(answered)["userName"] == "good1@example.com"


def test_a_misspelled_call_bodies_is_named(workspace: Workspace) -> None:
    workspace.write_config(call_bodies="failure")
    result = provisioner(workspace, "check")
    assert result.returncode == 3 and "call_bodies" in result.stderr and "Traceback" not in result.stderr
