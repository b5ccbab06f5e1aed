"""Executor behaviour on answers a real server will not give on demand (412 races), with respx."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import respx

from connectors import ScimClient
from provisioner.config import TargetConfig
from provisioner.executor import Executor
from provisioner.planner import Decision, Kind, Reason
from provisioner.queue import LinkState, Outcome, claim, enqueue, get_operation, record
from provisioner.store import open_store

BASE = "https://scim.example.test/v2"
SPC = {"patch": {"supported": True}, "etag": {"supported": True}, "filter": {"supported": True}}
USER = {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "ada@example.com", "active": True}


def target_config() -> TargetConfig:
    return TargetConfig.model_validate(
        {"base_url": BASE, "auth": {"type": "none"}, "source": "hr", "mapping": "m.yaml", "max_concurrency": 1}
    )


def linked_engine(tmp_path: Path):  # noqa: ANN201 - an SQLAlchemy engine
    """A state database where identity E1 is linked to account u1 at version W/"1", with an update queued."""
    engine = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    enqueue(engine, "r0", "app", [Decision("E1", Kind.CREATE, Reason.JOINER, USER, "h0")])
    [op] = claim(engine, "app")
    record(engine, "app", "E1", Outcome(op.id, "succeeded", link=LinkState("u1", True, 'W/"1"', None, "h0", USER)))
    changed = {**USER, "title": "Countess"}
    enqueue(engine, "r1", "app", [Decision("E1", Kind.UPDATE, Reason.MOVER, changed, "h1")])
    return engine


def run(engine) -> None:  # noqa: ANN001
    executor = Executor(engine, "app", target_config(), lambda: ScimClient(BASE))
    asyncio.run(executor.run(claim(engine, "app")))


@respx.mock
def test_a_412_refetches_the_version_and_sends_the_change_again_with_it(tmp_path: Path) -> None:
    engine = linked_engine(tmp_path)
    respx.get(f"{BASE}/ServiceProviderConfig").respond(200, json=SPC)
    respx.get(f"{BASE}/Users/u1").respond(200, json={**USER, "id": "u1", "meta": {"version": 'W/"7"'}})
    patch = respx.patch(f"{BASE}/Users/u1").mock(
        side_effect=[httpx.Response(412), httpx.Response(204, headers={"ETag": 'W/"8"'})]
    )

    run(engine)

    assert [call.request.headers["If-Match"] for call in patch.calls] == ['W/"1"', 'W/"7"']
    row, calls = get_operation(engine, 2)
    assert row["status"] == "succeeded"
    assert [c["http_status"] for c in calls] == [412, 200, 204]


@respx.mock
def test_a_412_that_keeps_coming_back_goes_to_review_with_the_versions_tried(tmp_path: Path) -> None:
    engine = linked_engine(tmp_path)
    respx.get(f"{BASE}/ServiceProviderConfig").respond(200, json=SPC)
    versions = iter(['W/"2"', 'W/"3"', 'W/"4"'])
    respx.get(f"{BASE}/Users/u1").mock(
        side_effect=lambda request: httpx.Response(200, json={**USER, "id": "u1", "meta": {"version": next(versions)}})
    )
    patch = respx.patch(f"{BASE}/Users/u1").respond(412)

    run(engine)

    assert patch.call_count == 4
    row, _calls = get_operation(engine, 2)
    assert row["status"] == "failed"
    assert row["last_http_status"] == 412
    assert 'W/"4"' in row["last_error"] and "still stale" in row["last_error"]


@pytest.mark.parametrize("etag_support", [False, True], ids=["no-etags", "etags"])
@respx.mock
def test_if_match_is_sent_only_to_targets_that_support_etags(tmp_path: Path, etag_support: bool) -> None:
    engine = linked_engine(tmp_path)
    respx.get(f"{BASE}/ServiceProviderConfig").respond(200, json={**SPC, "etag": {"supported": etag_support}})
    patch = respx.patch(f"{BASE}/Users/u1").respond(200, json={**USER, "id": "u1"})

    run(engine)

    assert ("If-Match" in patch.calls.last.request.headers) is etag_support
    assert patch.calls.last.request.content.count(b"Countess") == 1
