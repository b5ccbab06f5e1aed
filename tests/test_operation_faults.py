"""Faults of one operation, answers a real server will not give on demand (respx): issue 14, items 1, 3 and 4."""

from __future__ import annotations

import asyncio
import itertools
import json
from datetime import timedelta
from pathlib import Path

import httpx
import respx
from sqlalchemy import Engine

from connectors import RetryPolicy, ScimClient, TargetLimiter
from provisioner.config import TargetConfig
from provisioner.executor import Executor
from provisioner.group_executor import (
    GroupExecutor,
    GroupOutcome,
    claim_groups,
    enqueue_groups,
    load_group_links,
    record_group,
)
from provisioner.groups import GroupDecision, GroupKind, GroupLink, GroupPlan, GroupReason
from provisioner.planner import Decision, Kind, Reason
from provisioner.quarantine import state
from provisioner.queue import claim, enqueue, get_operation, list_operations, release
from provisioner.store import as_utc, open_store, utcnow
from tests.connectors.clock import VirtualClock

BASE = "https://scim.example.test/v2"
SPC = {"patch": {"supported": True}, "etag": {"supported": False}, "filter": {"supported": True}}
_ids = itertools.count(1)


def target(**options: object) -> TargetConfig:
    return TargetConfig.model_validate(
        {"base_url": BASE, "auth": {"type": "none"}, "source": "hr", "mapping": "m.yaml", "max_concurrency": 1,
         **options}  # fmt: skip
    )


def store(tmp_path: Path) -> Engine:
    return open_store(f"sqlite:///{tmp_path / 'state.db'}")


def joiners(engine: Engine, *names: str) -> None:
    decisions = [Decision(name, Kind.CREATE, Reason.JOINER, {"userName": f"{name}@example.com"}, name) for name in names]
    enqueue(engine, f"r-{next(_ids)}", "app", decisions)


def created(request: httpx.Request) -> httpx.Response:
    return httpx.Response(201, json={**json.loads(request.content), "id": f"id-{next(_ids)}"})


def due_again(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE operation SET next_attempt_at = NULL, status = 'pending' WHERE status = 'retry_wait'")


# ------------------------------------------------------------ fair ordering


def test_rows_given_back_unsent_wait_behind_those_already_due(tmp_path: Path) -> None:
    engine = store(tmp_path)
    joiners(engine, "a", "b")
    first = claim(engine, "app", limit=1)
    joiners(engine, "c")
    release(engine, [op.id for op in first])

    assert [op.identity_key for op in claim(engine, "app")] == ["b", "c", "a"]


# ------------------------------------------------------------ the target judged, not one operation


@respx.mock
def test_one_operation_failing_round_after_round_does_not_quarantine_a_target_that_answers(tmp_path: Path) -> None:
    engine = store(tmp_path)
    joiners(engine, "bad")
    spc = respx.get(f"{BASE}/ServiceProviderConfig").respond(200, json=SPC)
    respx.get(f"{BASE}/Users").respond(200, json={"totalResults": 0, "Resources": []})
    respx.post(f"{BASE}/Users").respond(500)
    config = target(quarantine={"failing_rounds": 2})

    for _ in range(4):
        send(engine, config)
        due_again(engine)

    health = state(engine, "app")
    assert health is not None and not health.quarantined
    assert spc.call_count >= 4, "each round of repeated failures asked the target whether it answers"

    spc.respond(503)  # now the target itself is down: its rounds count
    for _ in range(2):
        send(engine, config)
        due_again(engine)
    assert state(engine, "app").quarantined  # type: ignore[union-attr]


def send(engine: Engine, config: TargetConfig, policy: RetryPolicy | None = None, limiter: TargetLimiter | None = None) -> None:
    policy = policy or RetryPolicy(max_attempts=1)
    executor = Executor(engine, "app", config, lambda: ScimClient(BASE, retry=policy, limiter=limiter))
    asyncio.run(executor.run(claim(engine, "app")))


# ------------------------------------------------------------ Retry-After


@respx.mock
def test_a_long_retry_after_puts_the_operation_off_and_the_others_go_on(tmp_path: Path) -> None:
    """One worker: the create told to come back in 100 s waits in the queue, not in the worker."""
    engine = store(tmp_path)
    joiners(engine, "slow", "next1", "next2")
    respx.get(f"{BASE}/ServiceProviderConfig").respond(200, json=SPC)
    respx.get(f"{BASE}/Users").respond(200, json={"totalResults": 0, "Resources": []})
    throttled = httpx.Response(429, headers={"Retry-After": "100"})
    posts = respx.post(f"{BASE}/Users").mock(side_effect=[throttled, created(_post("next1")), created(_post("next2"))])
    clock = VirtualClock()
    policy = RetryPolicy(wait_in_place=5, sleep=clock.sleeper("retry"), now=clock.wall)

    async def go() -> None:
        limiter = TargetLimiter(clock=clock, sleep=clock.sleeper("limiter"))
        executor = Executor(engine, "app", target(), lambda: ScimClient(BASE, retry=policy, limiter=limiter))
        await executor.run(claim(engine, "app"))

    before = utcnow()
    asyncio.run(go())

    assert posts.call_count == 3
    assert clock.slept["retry"] == [], "the worker never slept the Retry-After"
    assert sum(clock.slept["limiter"]) <= 5, "the others were slowed down for the short wait at most"
    rows = {op["identity_key"]: op for op in list_operations(engine)}
    assert rows["next1"]["status"] == rows["next2"]["status"] == "succeeded"
    slow = rows["slow"]
    assert slow["status"] == "retry_wait" and slow["last_http_status"] == 429
    due = as_utc(slow["next_attempt_at"]) - before
    assert timedelta(seconds=99) <= due <= timedelta(seconds=110), due


def _post(name: str) -> httpx.Request:
    return httpx.Request("POST", f"{BASE}/Users", json={"userName": f"{name}@example.com"})


@respx.mock
def test_a_short_retry_after_is_waited_in_place(tmp_path: Path) -> None:
    engine = store(tmp_path)
    joiners(engine, "a")
    respx.get(f"{BASE}/ServiceProviderConfig").respond(200, json=SPC)
    respx.get(f"{BASE}/Users").respond(200, json={"totalResults": 0, "Resources": []})
    respx.post(f"{BASE}/Users").mock(side_effect=[httpx.Response(429, headers={"Retry-After": "2"}), created(_post("a"))])
    clock = VirtualClock()
    policy = RetryPolicy(wait_in_place=5, sleep=clock.sleeper("retry"), now=clock.wall)

    async def go() -> None:
        limiter = TargetLimiter(clock=clock, sleep=clock.sleeper("limiter"))
        await Executor(engine, "app", target(), lambda: ScimClient(BASE, retry=policy, limiter=limiter)).run(
            claim(engine, "app")
        )

    asyncio.run(go())

    assert clock.slept["retry"] == [2.0]
    assert [op["status"] for op in list_operations(engine)] == ["succeeded"]


def test_the_engine_waits_in_place_five_seconds_at_most_by_default() -> None:
    assert target().retry.wait_in_place == 5.0
    assert RetryPolicy().wait_in_place == float("inf"), "the client alone keeps waiting every Retry-After (capped)"


# ------------------------------------------------------------ 409 on POST /Groups


def group_queued(tmp_path: Path, owner: tuple[str, str] | None = None) -> Engine:
    engine = store(tmp_path)
    if owner is not None:  # another group of ours already linked to that SCIM id
        key, scim_id = owner
        enqueue_groups(engine, "r0", "app", GroupPlan("app", [GroupDecision(key, GroupKind.CREATE, GroupReason.NEW, key)]), {})
        [op] = claim_groups(engine, "app")
        record_group(engine, "app", key, {}, GroupOutcome(op.id, link=GroupLink(key, scim_id, key, None), reset=set()))
    decision = GroupDecision("eng", GroupKind.CREATE, GroupReason.NEW, "Eng")
    enqueue_groups(engine, "r1", "app", GroupPlan("app", [decision]), {})
    return engine


def send_groups(engine: Engine) -> None:
    executor = GroupExecutor(engine, "app", target(), lambda: ScimClient(BASE, retry=RetryPolicy(max_attempts=1)))
    executor.load()
    asyncio.run(executor.run(claim_groups(engine, "app")))


def conflict_then(found: list[dict[str, object]]) -> None:
    respx.get(f"{BASE}/ServiceProviderConfig").respond(200, json=SPC)
    empty = httpx.Response(200, json={"totalResults": 0, "Resources": []})
    again = httpx.Response(200, json={"totalResults": len(found), "Resources": found})
    respx.get(f"{BASE}/Groups").mock(side_effect=[empty, again])
    error = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"], "status": "409", "scimType": "uniqueness"}
    respx.post(f"{BASE}/Groups").respond(409, json=error)


@respx.mock
def test_a_409_on_creating_a_group_links_the_one_group_of_exactly_that_name(tmp_path: Path) -> None:
    engine = group_queued(tmp_path)
    # The target's lookup is loose: a near name comes back too, and is not taken.
    conflict_then([{"id": "g8", "displayName": "eng"}, {"id": "g7", "displayName": "Eng", "members": []}])

    send_groups(engine)

    [row] = [op for op in list_operations(engine) if op["identity_key"] == "eng"]
    assert row["status"] == "succeeded" and "409 on create" in row["note"]
    assert load_group_links(engine, "app")["eng"][0].scim_id == "g7"


@respx.mock
def test_a_409_with_two_groups_of_that_name_goes_to_review(tmp_path: Path) -> None:
    engine = group_queued(tmp_path)
    conflict_then([{"id": "g7", "displayName": "Eng"}, {"id": "g9", "displayName": "Eng"}])

    send_groups(engine)

    [row] = [op for op in list_operations(engine) if op["identity_key"] == "eng"]
    assert row["status"] == "failed"
    assert "409" in row["last_error"] and "2 groups have exactly that displayName (g7, g9)" in row["last_error"]


@respx.mock
def test_a_409_with_no_group_of_that_name_to_be_found_goes_to_review(tmp_path: Path) -> None:
    engine = group_queued(tmp_path)
    conflict_then([{"id": "g8", "displayName": "ENG"}])

    send_groups(engine)

    [row] = [op for op in list_operations(engine) if op["identity_key"] == "eng"]
    assert row["status"] == "failed" and "no group of exactly that displayName" in row["last_error"]


@respx.mock
def test_a_409_on_a_group_another_of_ours_owns_goes_to_review(tmp_path: Path) -> None:
    engine = group_queued(tmp_path, owner=("platform", "g7"))
    conflict_then([{"id": "g7", "displayName": "Eng", "members": []}])

    send_groups(engine)

    [row] = [op for op in list_operations(engine) if op["identity_key"] == "eng"]
    assert row["status"] == "failed" and "already linked to group 'platform'" in row["last_error"]
    _, calls = get_operation(engine, row["id"])  # type: ignore[misc]
    assert [c["method"] for c in calls] == ["GET", "POST", "GET"]


@respx.mock
def test_group_operations_failing_count_toward_quarantine(tmp_path: Path) -> None:
    engine = store(tmp_path)
    decisions = [GroupDecision(f"g{n}", GroupKind.CREATE, GroupReason.NEW, f"Group {n}") for n in range(6)]
    enqueue_groups(engine, "r1", "app", GroupPlan("app", decisions), {})
    respx.get(f"{BASE}/ServiceProviderConfig").respond(200, json=SPC)
    respx.get(f"{BASE}/Groups").respond(200, json={"totalResults": 0, "Resources": []})
    respx.post(f"{BASE}/Groups").respond(503)
    executor = GroupExecutor(
        engine, "app", target(quarantine={"min_calls": 5, "failure_share": 0.8}),
        lambda: ScimClient(BASE, retry=RetryPolicy(max_attempts=1)),
    )  # fmt: skip
    executor.load()

    asyncio.run(executor.run(claim_groups(engine, "app")))

    health = state(engine, "app")
    assert health is not None and health.quarantined and "6 of 6 calls failed" in str(health.quarantine_reason)
