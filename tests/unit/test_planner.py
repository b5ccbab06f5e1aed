"""The planner: the decision table (joiner, mover, leaver, rehire, noop) and a whole planning pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.errors import SafetyStop
from provisioner.mapping import AttributeMapping, load_mapping
from provisioner.planner import Decision, Desired, Kind, Link, Reason, decide, plan_records, plan_target
from provisioner.sources import BadRecord, IdentityRecord

PAYLOAD = {"userName": "ada@example.com", "active": True}
NEW_PAYLOAD = {"userName": "ada@example.com", "title": "Countess", "active": True}


def link(*, active: bool = True, applied_hash: str | None = "h1") -> Link:
    return Link("E1", "scim-1", applied_hash, active)


# (desired payload, desired hash, link, leaver policy) -> (kind, reason) or None
DECISIONS = [
    pytest.param(PAYLOAD, "h1", None, "disable", (Kind.CREATE, Reason.JOINER), id="joiner"),
    pytest.param(PAYLOAD, "h1", None, "delete", (Kind.CREATE, Reason.JOINER), id="joiner-delete-policy"),
    pytest.param(PAYLOAD, "h1", link(), "disable", None, id="noop-unchanged"),
    pytest.param(NEW_PAYLOAD, "h2", link(), "disable", (Kind.UPDATE, Reason.MOVER), id="mover"),
    pytest.param(PAYLOAD, "h1", link(applied_hash=None), "disable", (Kind.UPDATE, Reason.MOVER), id="mover-never-hashed"),
    pytest.param(PAYLOAD, "h1", link(active=False), "disable", (Kind.ENABLE, Reason.REHIRE), id="rehire-unchanged"),
    pytest.param(NEW_PAYLOAD, "h2", link(active=False), "disable", (Kind.ENABLE, Reason.REHIRE), id="rehire-changed"),
    pytest.param(None, None, link(), "disable", (Kind.DISABLE, Reason.LEAVER), id="leaver-disable"),
    pytest.param(None, None, link(), "delete", (Kind.DELETE, Reason.LEAVER), id="leaver-delete"),
    pytest.param(None, None, link(active=False), "disable", None, id="leaver-already-disabled"),
    pytest.param(None, None, link(active=False), "delete", (Kind.DELETE, Reason.LEAVER), id="leaver-disabled-then-delete"),
    pytest.param(None, None, None, "disable", None, id="leaver-never-provisioned"),
    pytest.param(None, None, None, "delete", None, id="leaver-never-provisioned-delete"),
]  # fmt: skip


@pytest.mark.parametrize(("payload", "payload_hash", "current", "leaver", "expected"), DECISIONS)
def test_decide(
    payload: dict[str, object] | None,
    payload_hash: str | None,
    current: Link | None,
    leaver: str,
    expected: tuple[Kind, Reason] | None,
) -> None:
    decision = decide(Desired("E1", payload, payload_hash), current, leaver)  # type: ignore[arg-type]

    if expected is None:
        assert decision is None
    else:
        assert decision is not None
        assert (decision.identity_key, decision.kind, decision.reason) == ("E1", *expected)


@pytest.mark.parametrize(
    ("current", "kind", "reason"),
    [pytest.param(None, Kind.CREATE, Reason.JOINER, id="joiner"),
     pytest.param(link(), Kind.UPDATE, Reason.MOVER, id="mover"),
     pytest.param(link(active=False), Kind.ENABLE, Reason.REHIRE, id="rehire")],
)  # fmt: skip
def test_decisions_that_send_an_account_carry_its_payload_and_hash(
    current: Link | None, kind: Kind, reason: Reason
) -> None:
    decision = decide(Desired("E1", NEW_PAYLOAD, "h2"), current)

    assert decision == Decision("E1", kind, reason, NEW_PAYLOAD, "h2")


@pytest.mark.parametrize(
    ("active", "owed_now", "expected"),
    [pytest.param(False, True, Kind.DISABLE, id="disabled-owing-what-resolves-now"),
     pytest.param(False, False, None, id="disabled-owing-nothing-sendable"),
     pytest.param(True, False, Kind.DISABLE, id="active")],
)  # fmt: skip
def test_a_disabled_leaver_is_disabled_again_only_to_send_what_its_account_owes(
    active: bool, owed_now: bool, expected: Kind | None
) -> None:
    decision = decide(Desired("E1", None), link(active=active), owed_now=owed_now)

    assert (decision.kind if decision else None) is expected


@pytest.mark.parametrize("leaver", ["disable", "delete"])
def test_leaver_decisions_carry_no_payload(leaver: str) -> None:
    decision = decide(Desired("E1", None), link(), leaver)  # type: ignore[arg-type]

    assert decision is not None
    assert (decision.payload, decision.payload_hash) == (None, None)


# --- plan_target ---------------------------------------------------------------------------------


MAPPING = """\
scope: "department != 'Contractors'"
leaver_when: "status == 'terminated'"
attributes:
  userName: email | lower
  title: title
  urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:
    department: department
    manager:
      value: ref(manager_id)
"""


@pytest.fixture
def mapping(tmp_path: Path) -> AttributeMapping:
    path = tmp_path / "users.yaml"
    path.write_text(MAPPING, encoding="utf-8")
    return load_mapping(path)


def person(key: str, line: int = 2, **attributes: str) -> IdentityRecord:
    values = {"email": f"{key.lower()}@example.com", "title": "Engineer", "department": "Engineering",
              "manager_id": "", "status": "active", **attributes}  # fmt: skip
    return IdentityRecord(key, values, f"hr.csv:{line}")


def linked(mapping: AttributeMapping, record: IdentityRecord, *, active: bool = True) -> Link:
    """The link an identity has after its current record was applied (hash from a first planning pass)."""
    [decision] = plan_target("app", mapping, [record], {}).decisions
    return Link(record.key, f"id-{record.key}", decision.payload_hash, active)


def kinds(decisions: list[Decision]) -> dict[str, tuple[Kind, Reason]]:
    return {d.identity_key: (d.kind, d.reason) for d in decisions}


def test_plan_target_decides_each_identity_from_source_and_links(mapping: AttributeMapping) -> None:
    stays, moves, leaves, returns, joins = (person(k) for k in ("E1", "E2", "E3", "E4", "E5"))
    links = {
        "E1": linked(mapping, stays),
        "E2": linked(mapping, moves),
        "E3": linked(mapping, leaves),
        "E4": linked(mapping, returns, active=False),
    }
    records = [stays, person("E2", title="Principal Engineer"), returns, joins]

    plan = plan_target("app", mapping, records, links)

    assert kinds(plan.decisions) == {
        "E2": (Kind.UPDATE, Reason.MOVER),
        "E3": (Kind.DISABLE, Reason.LEAVER),
        "E4": (Kind.ENABLE, Reason.REHIRE),
        "E5": (Kind.CREATE, Reason.JOINER),
    }
    assert plan.unchanged == 1
    assert plan.rejected == []
    assert plan.counts()["create"] == 1 and plan.counts()["unchanged"] == 1


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param({"status": "terminated"}, (Kind.DISABLE, Reason.LEAVER), id="terminated"),
        pytest.param({"department": "Contractors"}, (Kind.DISABLE, Reason.LEAVER), id="out-of-scope"),
    ],
)
def test_a_record_still_in_the_source_can_be_a_leaver(
    mapping: AttributeMapping, change: dict[str, str], expected: tuple[Kind, Reason]
) -> None:
    links = {"E1": linked(mapping, person("E1"))}

    plan = plan_target("app", mapping, [person("E1", **change), person("E2")], links)

    assert kinds(plan.decisions) == {"E1": expected, "E2": (Kind.CREATE, Reason.JOINER)}


def test_leavers_are_deleted_under_the_delete_policy(mapping: AttributeMapping) -> None:
    links = {"E1": linked(mapping, person("E1")), "E2": linked(mapping, person("E2"))}

    plan = plan_target("app", mapping, [person("E2")], links, leaver="delete")

    assert kinds(plan.decisions) == {"E1": (Kind.DELETE, Reason.LEAVER)}


def test_unmappable_record_is_rejected_and_never_becomes_a_leaver(mapping: AttributeMapping) -> None:
    """A record that was fine last cycle and now fails to render keeps its account active."""
    links = {"E1": linked(mapping, person("E1")), "E2": linked(mapping, person("E2"))}
    broken = IdentityRecord("E1", {"title": "x", "department": "Sales", "manager_id": "", "status": "active"}, "hr.csv:2")

    plan = plan_target("app", mapping, [broken, person("E2", line=3)], links)

    assert plan.decisions == []
    [(key, reason, kind, why)] = plan.rejected
    assert key == "E1"
    assert reason.startswith("hr.csv:2: ") and "'userName'" in reason
    assert (kind, why) == (Kind.UPDATE, Reason.MOVER)


def test_bad_source_line_with_a_key_is_rejected_and_never_becomes_a_leaver(mapping: AttributeMapping) -> None:
    links = {"E1": linked(mapping, person("E1")), "E2": linked(mapping, person("E2"))}
    bad = BadRecord("E1", "more fields than the header has", "hr.csv:2")

    plan = plan_target("app", mapping, [bad, person("E2", line=3)], links)

    assert plan.decisions == []
    assert plan.rejected == [("E1", "hr.csv:2: more fields than the header has", Kind.UPDATE, Reason.MOVER)]


def test_bad_source_line_without_a_key_is_rejected_under_its_origin(mapping: AttributeMapping) -> None:
    plan = plan_target("app", mapping, [BadRecord("", "the key 'employee_id' is empty", "hr.csv:7"), person("E1")], {})

    assert plan.rejected == [("<hr.csv:7>", "hr.csv:7: the key 'employee_id' is empty", Kind.CREATE, Reason.JOINER)]
    assert kinds(plan.decisions) == {"E1": (Kind.CREATE, Reason.JOINER)}


def test_duplicate_identity_key_is_rejected_naming_its_line(mapping: AttributeMapping) -> None:
    first, second = person("E1", line=2), person("E1", line=5, email="someone.else@example.com")

    plan = plan_target("app", mapping, [first, second], {})

    [decision] = plan.decisions
    assert decision.payload is not None and decision.payload["userName"] == "e1@example.com"
    [(key, reason, _kind, _why)] = plan.rejected
    assert key == "E1"
    assert reason.startswith("hr.csv:5: ") and "duplicate" in reason


def test_empty_source_with_active_links_is_a_safety_stop(mapping: AttributeMapping) -> None:
    links = {"E1": linked(mapping, person("E1")), "E2": linked(mapping, person("E2"))}

    with pytest.raises(SafetyStop, match="2 linked accounts"):
        plan_target("app", mapping, [], links)


def test_source_of_only_rejected_records_is_a_safety_stop(mapping: AttributeMapping) -> None:
    links = {"E1": linked(mapping, person("E1"))}

    with pytest.raises(SafetyStop):
        plan_target("app", mapping, [BadRecord("", "the key 'employee_id' is empty", "hr.csv:2")], links)


def test_reference_to_an_unlinked_manager_is_kept_for_the_executor_but_not_hashed(mapping: AttributeMapping) -> None:
    """The hash is of what can be sent now; the payload keeps the reference for later in the cycle."""
    report, manager = person("E2", manager_id="E1"), person("E1")

    plan = plan_target("app", mapping, [report, manager], {})

    decisions = {d.identity_key: d for d in plan.decisions}
    enterprise = decisions["E2"].payload["urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"]  # type: ignore[index]
    assert enterprise["manager"]["value"].key == "E1"
    assert plan.unresolved_refs == 1
    without_manager = plan_target("app", mapping, [person("E2")], {}).decisions[0]
    assert decisions["E2"].payload_hash == without_manager.payload_hash


def test_reference_to_a_linked_manager_is_resolved_to_its_scim_id(mapping: AttributeMapping) -> None:
    links = {"E1": Link("E1", "scim-of-e1", "h", True)}

    plan = plan_target("app", mapping, [person("E1"), person("E2", manager_id="E1")], links)

    decisions = {d.identity_key: d for d in plan.decisions}
    enterprise = decisions["E2"].payload["urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"]  # type: ignore[index]
    assert enterprise["manager"] == {"value": "scim-of-e1"}
    assert plan.unresolved_refs == 0


def test_report_becomes_a_mover_once_its_manager_is_linked(mapping: AttributeMapping) -> None:
    """A report created before its manager existed is updated when the manager appears."""
    report = person("E2", manager_id="E1")
    before = linked(mapping, report)  # applied while E1 had no account

    plan = plan_target("app", mapping, [person("E1"), report], {"E1": Link("E1", "scim-of-e1", "h", True), "E2": before})

    assert kinds(plan.decisions)["E2"] == (Kind.UPDATE, Reason.MOVER)


def test_a_partial_plan_decides_each_record_as_the_full_plan_does_and_makes_no_leaver(
    mapping: AttributeMapping,
) -> None:
    """``sync --only``: a report's manager, not planned, still resolves; nobody else is a leaver."""
    manager, report, mover = person("E1"), person("E2", manager_id="E1"), person("E3")
    links = {"E1": Link("E1", "scim-of-e1", "h", True), "E3": linked(mapping, mover), "E4": linked(mapping, person("E4"))}
    # E2 as created by a full plan, its manager resolved.
    [created] = [d for d in plan_target("app", mapping, [manager, report, mover], links).decisions if d.identity_key == "E2"]
    links["E2"] = Link("E2", "scim-of-e2", created.payload_hash, True)

    partial = plan_records("app", mapping, [report, person("E3", title="CTO")], links)

    assert partial.settled == ["E2"]
    assert kinds(partial.decisions) == {"E3": (Kind.UPDATE, Reason.MOVER)}  # E1 and E4 are not planned: no leaver
    assert plan_records("app", mapping, [], links).decisions == []  # and no safety stop


def test_unchanged_identities_are_settled(mapping: AttributeMapping) -> None:
    """Settled identities need nothing; an operation still open for one of them is stale."""
    links = {
        "E1": linked(mapping, person("E1")),
        "E2": linked(mapping, person("E2")),
        "E3": linked(mapping, person("E3"), active=False),
    }

    plan = plan_target("app", mapping, [person("E1"), person("E2", title="CTO")], links)

    assert sorted(plan.settled) == ["E1", "E3"]


def test_managers_are_planned_before_their_reports(mapping: AttributeMapping) -> None:
    records = [person("E3", manager_id="E2"), person("E2", manager_id="E1"), person("E4"), person("E1")]

    plan = plan_target("app", mapping, records, {})

    order = [d.identity_key for d in plan.decisions]
    assert order.index("E1") < order.index("E2") < order.index("E3")
    assert sorted(order) == ["E1", "E2", "E3", "E4"]


def test_a_reference_cycle_is_still_planned(mapping: AttributeMapping) -> None:
    plan = plan_target("app", mapping, [person("E1", manager_id="E2"), person("E2", manager_id="E1")], {})

    assert sorted(d.identity_key for d in plan.decisions) == ["E1", "E2"]


def test_plan_target_changes_nothing_it_is_given(mapping: AttributeMapping) -> None:
    links = {"E1": linked(mapping, person("E1"))}
    snapshot = dict(links)

    plan_target("app", mapping, [person("E2")], links)

    assert links == snapshot


# --- one match value, two records --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attribute", "values", "expected"),
    [
        pytest.param("userName", ["ana@x", "ana@x"], {"E1": ["E2"], "E2": ["E1"]}, id="exact"),
        pytest.param("userName", ["Bob@x", "bob@X "], {"E1": ["E2"], "E2": ["E1"]}, id="by-case-rfc7643-2.2"),
        pytest.param("externalId", ["A-1", "a-1"], {}, id="externalId-is-case-exact"),
        pytest.param("userName", ["ana@x", None], {}, id="no-value"),
    ],
)  # fmt: skip
def test_shared_match_values_compare_as_the_target_does(
    attribute: str, values: list[str | None], expected: dict[str, list[str]]
) -> None:
    from provisioner.planner import shared_match_values

    assert shared_match_values(zip(["E1", "E2"], values), attribute) == expected


def test_records_sharing_a_user_name_are_both_rejected_and_never_planned(mapping: AttributeMapping) -> None:
    records = [person("E1", email="Ana@x"), person("E2", 3), person("E3", 4, email="ana@X")]

    plan = plan_target("app", mapping, records, {})

    assert kinds(plan.decisions) == {"E2": (Kind.CREATE, Reason.JOINER)}
    assert plan.rejected == [
        ("E1", "hr.csv:2: userName ana@x is also rendered for identity E3", Kind.CREATE, Reason.JOINER),
        ("E3", "hr.csv:4: userName ana@x is also rendered for identity E1", Kind.CREATE, Reason.JOINER),
    ]
    assert set(plan.record_hashes) == {"E1", "E3"}


def test_a_linked_identity_sharing_its_user_name_is_held_not_updated_nor_a_leaver(mapping: AttributeMapping) -> None:
    ada = person("E1", email="ana@x")
    links = {"E1": linked(mapping, ada)}

    plan = plan_target("app", mapping, [person("E1", email="ana@x", title="CTO"), person("E2", 3, email="ANA@x")], links)

    assert plan.decisions == []
    assert [(key, kind) for key, _m, kind, _r in plan.rejected] == [("E1", Kind.UPDATE), ("E2", Kind.CREATE)]


def test_a_record_the_memo_skips_still_counts_for_duplicates(mapping: AttributeMapping) -> None:
    """The render memo skips an unchanged record; its userName is remembered, so a newcomer is still caught."""
    from provisioner.planner import RenderMemo

    memo = RenderMemo()
    ada = person("E1", email="ana@x")
    links = {"E1": linked(mapping, ada)}
    plan_target("app", mapping, [ada], links, memo=memo)

    plan = plan_target("app", mapping, [ada, person("E2", 3, email="ana@x")], links, memo=memo)

    assert sorted(key for key, *_ in plan.rejected) == ["E1", "E2"]
    assert plan.settled == []


def test_the_record_digest_of_a_rejection_changes_with_the_record(mapping: AttributeMapping) -> None:
    first = plan_target("app", mapping, [person("E1", email="  "), person("E2", 3)], {})
    again = plan_target("app", mapping, [person("E2", 3), person("E1", 4, email="  ")], {})
    changed = plan_target("app", mapping, [person("E1", email="  ", title="CTO"), person("E2", 3)], {})

    assert first.record_hashes["E1"] == again.record_hashes["E1"] != changed.record_hashes["E1"]
    assert "'userName': is required but the record gives it only blanks" in first.rejected[0][1]


def test_a_disabled_leaver_owing_its_manager_is_planned_once_the_manager_is_linked(mapping: AttributeMapping) -> None:
    """Created before its manager's account existed, then left: the manager it owes is sent by a disable."""
    report = person("E2", manager_id="E1", status="terminated")
    owing = Link("E2", "id-E2", "h", active=False, owes=frozenset({"E1"}))
    manager = person("E1")

    before = plan_target("app", mapping, [person("E1"), report], {"E2": owing})
    after = plan_target("app", mapping, [manager, report], {"E2": owing, "E1": linked(mapping, manager)})

    assert kinds(before.decisions) == {"E1": (Kind.CREATE, Reason.JOINER)}
    assert kinds(after.decisions) == {"E2": (Kind.DISABLE, Reason.LEAVER)}
