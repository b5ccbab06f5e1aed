"""Quarantine: a target whose calls keep failing gets probes only, and recovers on the first success."""

from __future__ import annotations

import asyncio
import itertools
from datetime import timedelta
from pathlib import Path

import httpx
import orjson
import respx
from sqlalchemy import Engine

from connectors import RetryPolicy, ScimClient
from provisioner.config import TargetConfig
from provisioner.executor import ExecutionReport, Executor
from provisioner.planner import Decision, Kind, Reason
from provisioner.quarantine import Admission, admission, set_paused, state
from provisioner.queue import claim, enqueue, list_operations
from provisioner.store import open_store, utcnow

BASE = "https://scim.example.test/v2"
SPC = {"patch": {"supported": True}, "etag": {"supported": False}}


def target(**quarantine: object) -> TargetConfig:
    return TargetConfig.model_validate(
        {"base_url": BASE, "auth": {"type": "none"}, "source": "hr", "mapping": "m.yaml", "max_concurrency": 1,
         "quarantine": {"min_calls": 5, "failure_share": 0.8, "probe_interval": 60, **quarantine}}  # fmt: skip
    )


def queued(tmp_path: Path, count: int) -> Engine:
    engine = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    decisions = [
        Decision(f"E{n}", Kind.CREATE, Reason.JOINER, {"userName": f"u{n}@example.com"}, f"h{n}") for n in range(count)
    ]
    enqueue(engine, "r1", "app", decisions)
    return engine


def run(engine: Engine, config: TargetConfig) -> ExecutionReport:
    # One attempt per call: the retries inside a call are the client's business, tested elsewhere.
    executor = Executor(engine, "app", config, lambda: ScimClient(BASE, retry=RetryPolicy(max_attempts=1)))
    return asyncio.run(executor.run(claim(engine, "app")))


def no_match() -> None:
    """A retried create looks its account up first: the target has none."""
    respx.get(f"{BASE}/Users").respond(200, json={"totalResults": 0, "Resources": []})


_ids = itertools.count(1)


def created(request: httpx.Request) -> httpx.Response:
    body = orjson.loads(request.content)
    return httpx.Response(201, json={**body, "id": f"id-{next(_ids)}"})


@respx.mock
def test_a_target_failing_most_calls_is_quarantined_and_then_sent_nothing(tmp_path: Path) -> None:
    engine = queued(tmp_path, 8)
    respx.get(f"{BASE}/ServiceProviderConfig").respond(200, json=SPC)
    posts = respx.post(f"{BASE}/Users").respond(503)

    run(engine, target())

    health = state(engine, "app")
    assert health is not None and health.quarantined
    assert "8 of 8 calls failed" in str(health.quarantine_reason)
    assert posts.call_count == 8
    assert {op["status"] for op in list_operations(engine)} == {"retry_wait"}

    # Due again, but the target is still between probes.
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE operation SET next_attempt_at = NULL, status = 'pending'")
    report = run(engine, target())
    assert posts.call_count == 8, "nothing is sent between probes"
    assert report.skipped == 8
    assert {op["status"] for op in list_operations(engine)} == {"pending"}


@respx.mock
def test_a_probe_that_succeeds_ends_the_quarantine_and_the_rest_is_sent(tmp_path: Path) -> None:
    engine = queued(tmp_path, 6)
    respx.get(f"{BASE}/ServiceProviderConfig").respond(200, json=SPC)
    posts = respx.post(f"{BASE}/Users").respond(503)
    run(engine, target())
    assert state(engine, "app").quarantined  # type: ignore[union-attr]
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE operation SET next_attempt_at = NULL, status = 'pending'")
        conn.exec_driver_sql("UPDATE target_state SET next_probe_at = :t", {"t": utcnow() - timedelta(seconds=1)})
    assert admission(engine, "app") is Admission.PROBE
    posts.side_effect = created
    no_match()

    run(engine, target())

    assert not state(engine, "app").quarantined  # type: ignore[union-attr]
    assert {op["status"] for op in list_operations(engine)} == {"succeeded"}


@respx.mock
def test_a_failed_probe_doubles_the_interval_and_sends_no_operation(tmp_path: Path) -> None:
    engine = queued(tmp_path, 6)
    spc = respx.get(f"{BASE}/ServiceProviderConfig").respond(200, json=SPC)
    posts = respx.post(f"{BASE}/Users").respond(503)
    run(engine, target())
    due_now(engine)
    before = posts.call_count
    spc.respond(503)  # the target is down now: the probe's read fails

    run(engine, target())

    assert posts.call_count == before, "no operation is sent to a target that does not answer a read"
    health = state(engine, "app")
    assert health is not None and health.quarantined and health.probe_interval == 120


def due_now(engine: Engine) -> None:
    """Every operation due, and the quarantined target due for a probe."""
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE operation SET next_attempt_at = NULL, status = 'pending'")
        conn.exec_driver_sql("UPDATE target_state SET next_probe_at = :t", {"t": utcnow() - timedelta(seconds=1)})


@respx.mock
def test_a_probe_that_fails_again_while_the_target_answers_leaves_the_next_probe_to_another_operation(
    tmp_path: Path,
) -> None:
    engine = queued(tmp_path, 6)
    respx.get(f"{BASE}/ServiceProviderConfig").respond(200, json=SPC)
    posts = respx.post(f"{BASE}/Users").respond(503)
    run(engine, target())
    due_now(engine)
    no_match()

    run(engine, target())
    run(engine, target())

    health = state(engine, "app")
    assert health is not None and health.quarantined and health.probe_interval == 60, "not doubled"
    probed = [orjson.loads(call.request.content)["userName"] for call in posts.calls[6:]]
    assert len(probed) == 2 and probed[0] != probed[1], "each probe is another operation"


@respx.mock
def test_the_probe_is_an_operation_that_never_failed_when_there_is_one(tmp_path: Path) -> None:
    engine = queued(tmp_path, 6)
    respx.get(f"{BASE}/ServiceProviderConfig").respond(200, json=SPC)
    posts = respx.post(f"{BASE}/Users").respond(503)
    run(engine, target())
    due_now(engine)
    enqueue(engine, "r2", "app", [Decision("E9", Kind.CREATE, Reason.JOINER, {"userName": "new@example.com"}, "h9")])
    posts.side_effect = created
    no_match()

    run(engine, target())

    assert orjson.loads(posts.calls[6].request.content)["userName"] == "new@example.com"
    assert not state(engine, "app").quarantined  # type: ignore[union-attr]
    assert {op["status"] for op in list_operations(engine)} == {"succeeded"}


@respx.mock
def test_a_target_that_cannot_be_reached_is_quarantined_after_failing_rounds(tmp_path: Path) -> None:
    engine = queued(tmp_path, 3)
    respx.get(f"{BASE}/ServiceProviderConfig").mock(side_effect=httpx.ConnectError("refused"))
    for _ in range(3):
        report = run(engine, target(failing_rounds=3))
        assert report.unreachable and report.statuses == {"retry_wait": 3}
        with engine.begin() as conn:  # due again for the next round
            conn.exec_driver_sql("UPDATE operation SET next_attempt_at = NULL, status = 'pending'")
    health = state(engine, "app")
    assert health is not None and health.quarantined and "3 rounds" in str(health.quarantine_reason)
    assert health.failing_since is not None
    [row] = {op["last_error"] for op in list_operations(engine)}
    assert "ConnectError" in row, "the reason is on every waiting operation"


@respx.mock
def test_a_paused_target_is_sent_nothing_until_resumed(tmp_path: Path) -> None:
    engine = queued(tmp_path, 2)
    respx.get(f"{BASE}/ServiceProviderConfig").respond(200, json=SPC)
    posts = respx.post(f"{BASE}/Users").mock(side_effect=created)
    set_paused(engine, "app", True, "maintenance")

    assert run(engine, target()).skipped == 2
    assert posts.call_count == 0
    set_paused(engine, "app", False)
    run(engine, target())
    assert posts.call_count == 2
