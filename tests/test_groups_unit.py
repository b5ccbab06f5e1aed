"""Groups: the decision table, desired member sets, batching, and the sender on answers a real server will not give (respx)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import respx
import sqlalchemy

from connectors import ScimClient
from provisioner.config import TargetConfig
from provisioner.errors import ConfigError
from provisioner.group_executor import (
    GroupExecutor,
    GroupOutcome,
    claim_groups,
    delete_brake,
    due_for_compare,
    enqueue_groups,
    load_member_state,
    member_brake,
    record_group,
    would_hold,
)
from provisioner.groups import (
    Desired,
    GroupDecision,
    GroupKind,
    GroupLink,
    GroupPlan,
    GroupReason,
    batches,
    decide_group,
    desired_groups,
    load_groups,
    patch_operations,
    plan_groups,
)
from provisioner.mapping import load_mapping
from provisioner.demo import DEMO_MAPPING
from provisioner.planner import Link
from provisioner.queue import get_operation, list_operations, release_held
from provisioner.sources import BadRecord, IdentityRecord
from provisioner.store import open_store, utcnow

BASE = "https://scim.example.test/v2"
SPC = {"patch": {"supported": True}, "etag": {"supported": True}, "filter": {"supported": True}}
LINK = GroupLink("eng", "g1", "dept-eng", 'W/"1"')


# ------------------------------------------------------------ the decision table


@pytest.mark.parametrize(
    ("name", "want", "link", "state", "frozen", "delete_empty", "expected"),
    [
        pytest.param("dept-eng", {"u1"}, None, set(), set(), False, (GroupKind.CREATE, ("u1",), ()), id="new-group"),
        pytest.param("dept-eng", {"u1"}, LINK, {"u1"}, set(), False, None, id="unchanged"),
        pytest.param("dept-eng", {"u1", "u2"}, LINK, {"u1", "u3"}, set(), False,
                     (GroupKind.MEMBERS, ("u2",), ("u3",)), id="joiner-and-mover"),  # fmt: skip
        pytest.param("dept-eng", {"u1"}, LINK, {"u1", "u3"}, {"u3"}, False, None, id="frozen-leaver-kept"),
        pytest.param("dept-eng", {"u1", "u3"}, LINK, {"u1"}, {"u3"}, False, None, id="frozen-never-added"),
        pytest.param("dept-engineering", {"u1"}, LINK, {"u1"}, set(), False,
                     (GroupKind.MEMBERS, (), ()), id="rename"),  # fmt: skip
        pytest.param(None, None, LINK, {"u1"}, set(), False, (GroupKind.MEMBERS, (), ("u1",)), id="undefined-emptied"),
        pytest.param(None, None, LINK, {"u1"}, set(), True, (GroupKind.DELETE, (), ("u1",)), id="undefined-deleted"),
        pytest.param(None, None, LINK, {"u1"}, {"u1"}, True, None, id="undefined-kept-for-frozen-member"),
        pytest.param(None, None, None, set(), set(), True, None, id="never-linked"),
    ],
)
def test_decide_group(name, want, link, state, frozen, delete_empty, expected) -> None:  # noqa: ANN001
    decision = decide_group("eng", name, want, link, state, frozen, delete_empty=delete_empty)
    if expected is None:
        assert decision is None
    else:
        assert decision is not None
        assert (decision.kind, decision.add, decision.remove) == expected


def test_plan_marks_drift_found_by_a_full_compare() -> None:
    desired = Desired(names={"eng": "dept-eng"}, members={"eng": {"u1", "u2"}})
    plan = plan_groups("app", desired, {"eng": LINK}, {"eng": {"u2"}}, drifted={"eng"})
    [decision] = plan.decisions
    assert decision.reason is GroupReason.DRIFT and decision.add == ("u1",)
    assert plan.counts()["members_added"] == 1


def test_changes_are_batched_removals_first_up_to_the_limit() -> None:
    adds = [f"a{i}" for i in range(240)]
    parts = batches(adds, ["r1", "r2"], 100)
    assert [len(a) + len(r) for a, r in parts] == [100, 100, 42]
    assert parts[0][1] == ["r1", "r2"] and parts[0][0] == adds[:98]


def test_removal_uses_a_value_filter_by_default_and_a_value_list_when_configured() -> None:
    by_filter = patch_operations(["n1"], ['we"ird'])
    assert by_filter == [
        {"op": "remove", "path": 'members[value eq "we\\"ird"]'},
        {"op": "add", "path": "members", "value": [{"value": "n1"}]},
    ]
    by_list = patch_operations([], ["o1", "o2"], removal="list", rename="new")
    assert by_list == [
        {"op": "replace", "path": "displayName", "value": "new"},
        {"op": "remove", "path": "members", "value": [{"value": "o1"}, {"value": "o2"}]},
    ]


# ------------------------------------------------------------ definitions and desired members


def groups_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "groups.yaml"
    path.write_text(text)
    return path


def record(key: str, department: str = "Engineering", status: str = "active", **extra: str) -> IdentityRecord:
    columns = dict.fromkeys(["phone", "title", "cost_center", "division", "manager_id"], "")
    columns.update(employee_id=key, first_name="P", last_name=key, email=f"{key}@example.com",
                   department=department, status=status, **extra)  # fmt: skip
    return IdentityRecord(key, columns, origin=f"row {key}")


def test_desired_members_follow_the_rules_only_for_active_linked_accounts(tmp_path: Path) -> None:
    definitions = load_groups(groups_file(tmp_path, """groups:
  - name: "dept-{{ department | lower }}"
  - name: all-staff
  - from_column: teams
  - name: everyone-plus
    include: [dept-sales]
    members: "department == 'Nobody'"
"""))  # fmt: skip
    links = {k: Link(k, f"id-{k}", None, True) for k in ("E1", "E2", "E3", "E4", "E5")}
    records = [
        record("E1", teams="red;blue"),
        record("E2", "Sales", teams=""),
        record("E3", status="terminated", teams="red"),  # a leaver: in no group
        record("E9", teams="red"),  # not linked yet (create failed): added next cycle
        BadRecord("E5", "row 6", "broken"),  # unknown state: memberships left alone
    ]
    desired = desired_groups(definitions, load_mapping(DEMO_MAPPING), records, links)

    assert desired.members["dept-engineering"] == {"id-E1"}
    assert desired.members["dept-sales"] == {"id-E2"}
    assert desired.members["all-staff"] == {"id-E1", "id-E2"}
    assert desired.members["red"] == {"id-E1"} and desired.members["blue"] == {"id-E1"}
    assert desired.members["everyone-plus"] == {"id-E2"}
    # E4 is linked but gone from the source: a leaver, removed; E5's record is bad: frozen.
    assert desired.frozen == {"id-E5"}


def test_leavers_are_frozen_when_configured_or_held_by_the_brake(tmp_path: Path) -> None:
    definitions = load_groups(groups_file(tmp_path, "groups:\n  - name: all-staff\n"))
    links = {k: Link(k, f"id-{k}", None, True) for k in ("E1", "E2", "E3")}
    records = [record("E1"), record("E2", status="terminated")]
    mapping = load_mapping(DEMO_MAPPING)
    kept = desired_groups(definitions, mapping, records, links, remove_leavers=False)
    assert kept.frozen == {"id-E2", "id-E3"}
    held = desired_groups(definitions, mapping, records, links, held={"E3"})
    assert held.frozen == {"id-E3"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("groups: []\n", "groups.yaml:1: a groups file needs a non-empty 'groups' list"),
        ("groups:\n  - name: a\n    colour: red\n", "groups.yaml:3: unknown key 'colour'"),
        ("groups:\n  - name: a\n    from_column: b\n", "groups.yaml:2: a group definition needs exactly one"),
        ("groups:\n  - name: \"{{ department | nosuchfilter }}\"\n", "groups.yaml:2: invalid expression"),
    ],
)
def test_groups_file_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_groups(groups_file(tmp_path, text))
    assert message in str(caught.value)


def test_groups_are_compared_with_the_target_when_their_interval_has_passed() -> None:
    now = utcnow()
    verified = {"old": now - timedelta(days=2), "fresh": now - timedelta(hours=1), "never": None}
    assert due_for_compare(verified, "1d", now=now) == ["never", "old"]
    assert due_for_compare(verified, None, now=now) == []
    assert due_for_compare(verified, None, full=True, now=now) == ["fresh", "never", "old"]


# ------------------------------------------------------------ the sender, with respx


def target_config(**options: object) -> TargetConfig:
    return TargetConfig.model_validate(
        {"base_url": BASE, "auth": {"type": "none"}, "source": "hr", "mapping": "m.yaml", "max_concurrency": 1,
         **options}  # fmt: skip
    )


def linked_group(tmp_path: Path, members: set[str], decision: GroupDecision):  # noqa: ANN201 - an SQLAlchemy engine
    """A state database where group 'eng' is linked to g1 at W/"1" with ``members``, and ``decision`` queued."""
    engine = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    enqueue_groups(engine, "r0", "app", GroupPlan("app", [GroupDecision("eng", GroupKind.CREATE, GroupReason.NEW, "dept-eng")]), {})
    [op] = claim_groups(engine, "app")
    out = GroupOutcome(op.id, link=LINK, reset=set(members))
    record_group(engine, "app", "eng", {}, out)
    enqueue_groups(engine, "r1", "app", GroupPlan("app", [decision]), {})
    return engine


def open_group_rows(engine) -> list[tuple[str, str, str, str]]:  # noqa: ANN001
    """(run id, status, note, kind) of every open group row, oldest first."""
    rows = list_operations(engine, target="app")
    return [(r["run_id"], r["status"], r["note"], r["kind"]) for r in reversed(rows)
            if r["status"] in ("pending", "held") and r["kind"].startswith("group_")]  # fmt: skip


def always(removals: int, members: int) -> bool:
    return True


def eng(add: tuple[str, ...] = (), remove: tuple[str, ...] = ()) -> GroupDecision:
    """A member change of group 'eng' (linked as 'dept-eng')."""
    return GroupDecision("eng", GroupKind.MEMBERS, GroupReason.MEMBERSHIP, "dept-eng", add=add, remove=remove)


# Group 'eng' as it is: a first plan that changes nothing.
SETTLED = GroupDecision("eng", GroupKind.MEMBERS, GroupReason.RENAME, "dept-eng")


def test_the_member_brake_holds_removals_only_and_keeps_them_the_run_to_approve(tmp_path: Path) -> None:
    """A row that adds and removes is written as two: the additions pending, the removals held."""
    moved = eng(add=("u3",), remove=("u1", "u2"))
    new = GroupDecision("ops", GroupKind.CREATE, GroupReason.NEW, "dept-ops", add=("u1",))
    engine = linked_group(tmp_path, {"u1", "u2"}, SETTLED)

    assert enqueue_groups(engine, "r2", "app", GroupPlan("app", [moved, new]), {}, brake=always) == 3

    assert open_group_rows(engine) == [("r2", "pending", "group 'dept-eng' +1 members", "group_members"),
                                       ("r2", "held", "group 'dept-eng' -2 members", "group_members"),
                                       ("r2", "pending", "group 'dept-ops' +1 members", "group_create")]  # fmt: skip
    # The next plan wants the same removals and another joiner: the held row stays; only additions are new.
    more = eng(add=("u3", "u4"), remove=("u1", "u2"))
    asked: list[int] = []
    enqueue_groups(engine, "r3", "app", GroupPlan("app", [more]), {}, brake=lambda n, m: asked.append(n) or True)
    assert asked == []  # nothing new to remove: the brake is not asked
    assert open_group_rows(engine) == [("r2", "held", "group 'dept-eng' -2 members", "group_members"),
                                       ("r2", "pending", "group 'dept-ops' +1 members", "group_create"),
                                       ("r3", "pending", "group 'dept-eng' +2 members", "group_members")]  # fmt: skip
    # Approved, the removals stay the row they are beside the next plan's additions: nothing is held.
    assert release_held(engine, "r2", approve=True) == 1
    enqueue_groups(engine, "r4", "app", GroupPlan("app", [more]), {}, brake=always)
    assert [r[:2] for r in open_group_rows(engine)] == [("r2", "pending"), ("r2", "pending"), ("r3", "pending")]


def test_removals_an_operator_rejected_are_held_again_with_a_note_naming_the_run(tmp_path: Path) -> None:
    gone = eng(remove=("u1", "u2"))
    engine = linked_group(tmp_path, {"u1", "u2"}, SETTLED)
    enqueue_groups(engine, "r2", "app", GroupPlan("app", [gone]), {}, brake=always)
    assert release_held(engine, "r2", approve=False) == 1

    enqueue_groups(engine, "r3", "app", GroupPlan("app", [gone]), {}, brake=always)

    note = "group 'dept-eng' -2 members (rejected in run r2, still planned)"
    assert open_group_rows(engine) == [("r3", "held", note, "group_members")]


def test_a_held_row_that_also_adds_is_split_anew(tmp_path: Path) -> None:
    """A row held whole (additions with it) is replaced: its additions go, its removals stay held."""
    moved = eng(add=("u3",), remove=("u1", "u2"))
    engine = linked_group(tmp_path, {"u1", "u2"}, moved)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("UPDATE operation SET status = 'held' WHERE run_id = 'r1'"))

    enqueue_groups(engine, "r2", "app", GroupPlan("app", [moved]), {}, brake=always)

    assert [r[1:3] for r in open_group_rows(engine)] == [("pending", "group 'dept-eng' +1 members"),
                                                         ("held", "group 'dept-eng' -2 members")]  # fmt: skip


def test_under_the_brake_a_plan_that_removes_nothing_writes_one_row(tmp_path: Path) -> None:
    moved = eng(add=("u3",), remove=("u1",))
    engine = linked_group(tmp_path, {"u1", "u2"}, SETTLED)
    enqueue_groups(engine, "r2", "app", GroupPlan("app", [moved]), {}, brake=lambda n, m: False)
    assert open_group_rows(engine) == [("r2", "pending", "group 'dept-eng' +1 members -1 members", "group_members")]


def test_a_group_delete_counts_its_members_for_the_brake_and_is_held_whole(tmp_path: Path) -> None:
    """Under exact, a delete's members add to the run's removals; under additive, deletes alone count."""
    engine = linked_group(tmp_path, {"u1", "u2"}, SETTLED)
    gone = GroupDecision("old", GroupKind.DELETE, GroupReason.UNDEFINED, "old", remove=("u7", "u8", "u9"))
    asked: list[int] = []

    def count(removals: int, members: int) -> bool:
        asked.append(removals)
        return removals > 3

    enqueue_groups(engine, "r2", "app", GroupPlan("app", [eng(remove=("u1",)), gone]), {}, brake=count, deletes=count)
    assert asked == [4]
    assert open_group_rows(engine) == [("r2", "held", "group 'dept-eng' -1 members", "group_members"),
                                       ("r2", "held", "delete group 'old' -3 members", "group_delete")]  # fmt: skip

    # Under additive (no member brake), the removal is sent and the delete alone is judged: within the limit.
    (tmp_path / "additive").mkdir()
    engine = linked_group(tmp_path / "additive", {"u1", "u2"}, SETTLED)
    asked.clear()
    enqueue_groups(engine, "r2", "app", GroupPlan("app", [eng(remove=("u1",)), gone]), {}, deletes=count)
    assert asked == [3]
    assert [r[1:] for r in open_group_rows(engine)] == [("pending", "group 'dept-eng' -1 members", "group_members"),
                                                        ("pending", "delete group 'old' -3 members", "group_delete")]  # fmt: skip


def test_member_removals_under_exact_and_group_deletes_meet_the_same_limits() -> None:
    """The member brake (exact only) and the delete brake are one judgement: the same limits, the same answers."""
    exact = target_config(group_members="exact", max_member_removals=2, max_member_removal_share=0.5)
    additive = target_config(group_members="additive", max_member_removals=2, max_member_removal_share=0.5)
    members, deletes = member_brake(exact), delete_brake(additive)
    assert members is not None and member_brake(additive) is None
    cases = [(1, 100), (2, 100), (3, 100), (2, 4), (2, 2), (1, 0)]
    assert [members(n, m) for n, m in cases] == [deletes(n, m) for n, m in cases] == [False, False, True, False, True, False]


def test_a_group_with_a_row_running_is_neither_written_nor_judged_by_the_dry_run(tmp_path: Path) -> None:
    """``plan`` judges the decisions a cycle would write: those of a group being sent now wait for it."""
    engine = linked_group(tmp_path, {"u1", "u2"}, SETTLED)
    strict = target_config(group_members="exact", max_member_removals=0)
    gone = GroupDecision("old", GroupKind.DELETE, GroupReason.UNDEFINED, "old", remove=("u7",))
    assert would_hold(engine, "app", strict, GroupPlan("app", [eng(remove=("u1",)), gone])) == (True, True)
    [running] = claim_groups(engine, "app")
    assert running.group_key == "eng"

    plan = GroupPlan("app", [eng(remove=("u1",))])
    assert would_hold(engine, "app", strict, plan) == (False, False)
    assert enqueue_groups(engine, "r2", "app", plan, {}, brake=member_brake(strict), deletes=delete_brake(strict)) == 0


def test_the_dry_run_says_held_only_for_the_kinds_the_plan_has(tmp_path: Path) -> None:
    """Removals that trip the brake under exact hold no group delete when the plan deletes none, and the reverse."""
    engine = linked_group(tmp_path, {"u1", "u2"}, SETTLED)
    strict = target_config(group_members="exact", max_member_removals=0)
    gone = GroupDecision("old", GroupKind.DELETE, GroupReason.UNDEFINED, "old", remove=("u7",))
    assert would_hold(engine, "app", strict, GroupPlan("app", [eng(remove=("u1",))])) == (True, False)
    assert would_hold(engine, "app", strict, GroupPlan("app", [gone])) == (False, True)


@respx.mock
def test_two_operations_of_one_group_are_sent_one_after_the_other(tmp_path: Path) -> None:
    """Additions and approved removals of one group, claimed together, never PATCH it at once."""
    moved = eng(add=("u3",), remove=("u1",))
    engine = linked_group(tmp_path, {"u1", "u2"}, SETTLED)
    enqueue_groups(engine, "r2", "app", GroupPlan("app", [moved]), {}, brake=always)
    release_held(engine, "r2", approve=True)
    respx.get(f"{BASE}/ServiceProviderConfig").respond(200, json=SPC)
    flying: list[int] = []
    most = 0

    async def answer(request: httpx.Request) -> httpx.Response:
        nonlocal most
        flying.append(1)
        most = max(most, len(flying))
        for _ in range(3):
            await asyncio.sleep(0)  # let another worker run, if one could send to this group now
        flying.pop()
        return httpx.Response(204)

    patch = respx.patch(f"{BASE}/Groups/g1").mock(side_effect=answer)

    send(engine, target_config(max_concurrency=4))

    assert patch.call_count == 2 and most == 1
    assert load_member_state(engine, "app") == {"eng": {"u2", "u3"}}


def send(engine, config: TargetConfig) -> None:  # noqa: ANN001
    executor = GroupExecutor(engine, "app", config, lambda: ScimClient(BASE))
    executor.load()
    asyncio.run(executor.run(claim_groups(engine, "app")))


def body(call: respx.models.Call) -> dict[str, object]:
    return json.loads(call.request.content)


@respx.mock
def test_a_412_on_a_group_patch_refetches_and_sends_only_what_is_still_missing(tmp_path: Path) -> None:
    decision = GroupDecision("eng", GroupKind.MEMBERS, GroupReason.MEMBERSHIP, "dept-eng", add=("u3", "u4"), remove=("u1",))
    engine = linked_group(tmp_path, {"u1", "u2"}, decision)
    respx.get(f"{BASE}/ServiceProviderConfig").respond(200, json=SPC)
    # Meanwhile someone removed u1 and added u3 in the target.
    fresh = {"id": "g1", "displayName": "dept-eng", "members": [{"value": "u2"}, {"value": "u3"}],
             "meta": {"version": 'W/"5"'}}  # fmt: skip
    respx.get(f"{BASE}/Groups/g1").respond(200, json=fresh)
    patch = respx.patch(f"{BASE}/Groups/g1").mock(
        side_effect=[httpx.Response(412), httpx.Response(204, headers={"ETag": 'W/"6"'})]
    )

    send(engine, target_config())

    assert [c.request.headers["If-Match"] for c in patch.calls] == ['W/"1"', 'W/"5"']
    assert body(patch.calls[1])["Operations"] == [{"op": "add", "path": "members", "value": [{"value": "u4"}]}]
    row, calls = get_operation(engine, 2)
    assert row["status"] == "succeeded"
    assert [c["http_status"] for c in calls] == [412, 200, 204]
    assert load_member_state(engine, "app")["eng"] == {"u2", "u3", "u4"}


@respx.mock
def test_a_412_on_a_group_delete_reads_the_group_once_per_round(tmp_path: Path) -> None:
    """Under additive, the read after a 412 is the one the next round decides on: not read twice."""
    gone = GroupDecision("eng", GroupKind.DELETE, GroupReason.UNDEFINED, "dept-eng")
    engine = linked_group(tmp_path, set(), gone)
    respx.get(f"{BASE}/ServiceProviderConfig").respond(200, json=SPC)
    reads: list[httpx.Request] = []

    def group(request: httpx.Request) -> httpx.Response:
        # Each read finds the group at a newer version: the If-Match sent shows which read decided.
        reads.append(request)
        return httpx.Response(200, json={"id": "g1", "displayName": "dept-eng", "members": [],
                                         "meta": {"version": f'W/"r{len(reads)}"'}})  # fmt: skip

    get = respx.get(f"{BASE}/Groups/g1").mock(side_effect=group)
    delete = respx.delete(f"{BASE}/Groups/g1").mock(side_effect=[httpx.Response(412), httpx.Response(204)])

    send(engine, target_config(group_members="additive"))

    assert get.call_count == 2
    assert [c.request.headers["If-Match"] for c in delete.calls] == ['W/"r1"', 'W/"r2"']
    row, _calls = get_operation(engine, 2)
    assert row["status"] == "succeeded"


@respx.mock
def test_a_target_without_patch_gets_a_put_of_the_whole_member_list(tmp_path: Path) -> None:
    decision = GroupDecision("eng", GroupKind.MEMBERS, GroupReason.MEMBERSHIP, "dept-eng", add=("u3",), remove=("u1",))
    engine = linked_group(tmp_path, {"u1", "u2"}, decision)
    respx.get(f"{BASE}/ServiceProviderConfig").respond(200, json={"patch": {"supported": False}, "etag": {"supported": True}})
    # "x9" was added in the target by someone else: a PUT keeps it.
    current = {"id": "g1", "displayName": "dept-eng", "externalId": "eng-1", "meta": {"version": 'W/"3"'},
               "members": [{"value": "u1"}, {"value": "u2"}, {"value": "x9"}]}  # fmt: skip
    respx.get(f"{BASE}/Groups/g1").respond(200, json=current)
    put = respx.put(f"{BASE}/Groups/g1").respond(200, json={**current, "meta": {"version": 'W/"4"'}})
    patch = respx.patch(f"{BASE}/Groups/g1").respond(204)

    send(engine, target_config())

    assert patch.call_count == 0 and put.call_count == 1
    sent = body(put.calls[0])
    assert sent["members"] == [{"value": "u2"}, {"value": "u3"}, {"value": "x9"}]
    assert sent["displayName"] == "dept-eng" and sent["externalId"] == "eng-1" and sent["id"] == "g1"
    assert put.calls[0].request.headers["If-Match"] == 'W/"3"'
    assert load_member_state(engine, "app")["eng"] == {"u2", "u3"}


@respx.mock
def test_a_400_no_target_on_removing_a_member_already_gone_reads_the_group_and_finishes(tmp_path: Path) -> None:
    """Some servers refuse to remove a member who is not there (400 noTarget): read the group, send what is left."""
    decision = GroupDecision("eng", GroupKind.MEMBERS, GroupReason.MEMBERSHIP, "dept-eng", add=("u3",), remove=("u1",))
    engine = linked_group(tmp_path, {"u1", "u2"}, decision)
    respx.get(f"{BASE}/ServiceProviderConfig").respond(200, json=SPC)
    # u1 was removed by hand in the target meanwhile.
    fresh = {"id": "g1", "displayName": "dept-eng", "members": [{"value": "u2"}], "meta": {"version": 'W/"2"'}}
    respx.get(f"{BASE}/Groups/g1").respond(200, json=fresh)
    no_target = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"], "status": "400", "scimType": "noTarget"}
    patch = respx.patch(f"{BASE}/Groups/g1").mock(
        side_effect=[httpx.Response(400, json=no_target), httpx.Response(204, headers={"ETag": 'W/"3"'})]
    )

    send(engine, target_config())

    assert patch.call_count == 2
    assert body(patch.calls[1])["Operations"] == [{"op": "add", "path": "members", "value": [{"value": "u3"}]}]
    row, _calls = get_operation(engine, 2)
    assert row["status"] == "succeeded"
    assert load_member_state(engine, "app")["eng"] == {"u2", "u3"}


@respx.mock
def test_a_400_that_is_not_about_a_missing_member_goes_to_review(tmp_path: Path) -> None:
    decision = GroupDecision("eng", GroupKind.MEMBERS, GroupReason.MEMBERSHIP, "dept-eng", add=("u3",))
    engine = linked_group(tmp_path, {"u1"}, decision)
    respx.get(f"{BASE}/ServiceProviderConfig").respond(200, json=SPC)
    invalid = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"], "status": "400", "scimType": "invalidValue"}
    patch = respx.patch(f"{BASE}/Groups/g1").respond(400, json=invalid)

    send(engine, target_config())

    assert patch.call_count == 1
    row, _calls = get_operation(engine, 2)
    assert row["status"] == "failed" and row["last_scim_type"] == "invalidValue"


@respx.mock
def test_a_put_that_meets_a_412_reads_the_group_again(tmp_path: Path) -> None:
    decision = GroupDecision("eng", GroupKind.MEMBERS, GroupReason.MEMBERSHIP, "dept-eng", add=("u3",))
    engine = linked_group(tmp_path, {"u2"}, decision)
    respx.get(f"{BASE}/ServiceProviderConfig").respond(200, json=SPC)
    reads = iter([[{"value": "u2"}], [{"value": "u2"}, {"value": "u7"}]])
    respx.get(f"{BASE}/Groups/g1").mock(
        side_effect=lambda request: httpx.Response(200, json={"id": "g1", "displayName": "dept-eng", "members": next(reads)})
    )
    put = respx.put(f"{BASE}/Groups/g1").mock(side_effect=[httpx.Response(412), httpx.Response(200, json={"id": "g1"})])

    send(engine, target_config(group_update_method="put"))

    assert body(put.calls[1])["members"] == [{"value": "u2"}, {"value": "u3"}, {"value": "u7"}]


@respx.mock
def test_member_removal_by_value_list_when_the_target_takes_no_filters_in_paths(tmp_path: Path) -> None:
    decision = GroupDecision("eng", GroupKind.MEMBERS, GroupReason.MEMBERSHIP, "dept-eng", remove=("u1", "u2"))
    engine = linked_group(tmp_path, {"u1", "u2"}, decision)
    respx.get(f"{BASE}/ServiceProviderConfig").respond(200, json=SPC)
    patch = respx.patch(f"{BASE}/Groups/g1").respond(204)

    send(engine, target_config(group_member_removal="list"))

    assert body(patch.calls[0])["Operations"] == [
        {"op": "remove", "path": "members", "value": [{"value": "u1"}, {"value": "u2"}]}
    ]


@respx.mock
def test_a_batch_that_failed_keeps_the_batches_before_it_and_the_retry_sends_only_the_rest(tmp_path: Path) -> None:
    adds = tuple(f"u{i:03d}" for i in range(250))
    decision = GroupDecision("eng", GroupKind.MEMBERS, GroupReason.MEMBERSHIP, "dept-eng", add=adds)
    engine = linked_group(tmp_path, set(), decision)
    respx.get(f"{BASE}/ServiceProviderConfig").respond(200, json=SPC)
    patch = respx.patch(f"{BASE}/Groups/g1").mock(
        side_effect=[httpx.Response(204), httpx.Response(204), httpx.Response(400, json={"detail": "no"})]
    )

    send(engine, target_config(use_etags="never"))

    assert patch.call_count == 3
    row, _ = get_operation(engine, 2)
    assert row["status"] == "failed"
    assert len(load_member_state(engine, "app")["eng"]) == 200


def test_only_members_keeps_the_changes_of_those_members_and_nothing_else() -> None:
    from provisioner.groups import GroupDecision, GroupKind, GroupLink, GroupPlan, GroupReason, only_members

    plan = GroupPlan("app", [
        GroupDecision("eng", GroupKind.MEMBERS, GroupReason.RENAME, "Engineering", add=("u1", "u2"), remove=("u3",)),
        GroupDecision("new", GroupKind.CREATE, GroupReason.NEW, "new", add=("u2",)),
        GroupDecision("ops", GroupKind.CREATE, GroupReason.NEW, "ops", add=("u9",)),
        GroupDecision("old", GroupKind.DELETE, GroupReason.UNDEFINED, "old"),
    ], settled=["sales"])  # fmt: skip

    kept = only_members(plan, {"u1", "u3"}, {"eng": GroupLink("eng", "g1", "eng")})

    # The rename is not theirs: the group keeps its name; u2's addition waits for the next cycle.
    assert kept.decisions == [GroupDecision("eng", GroupKind.MEMBERS, GroupReason.RENAME, "eng", add=("u1",), remove=("u3",))]
    assert kept.settled == []
