"""Reconciliation's pure layer (comparing, classifying, reacting), and pages a real server will not give on demand."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import respx

from provisioner.config import ReconcileConfig, load_config
from provisioner.demo import DEMO_MAPPING
from provisioner.mapping import Ref
from provisioner.planner import Kind, Link
from provisioner.redaction import MASK
from provisioner.reconcile import (
    Classifier,
    GroupFinding,
    Identity,
    ReconcileReport,
    Situation,
    drift,
    plan_repairs,
    reconcile_target,
    resource_fingerprint,
)
from provisioner.store import open_store, utcnow
from tests.conftest import ENTERPRISE, hr_row, write_csv

WORK = {"value": "ada@example.com", "type": "work", "primary": True}


DRIFT_CASES = [
        pytest.param({"userName": "ada@example.com"}, {"userName": "Ada@Example.com"}, [], id="userName-is-caseless"),
        pytest.param({"title": "Engineer"}, {"title": "engineer"}, ["title"], id="other-strings-are-exact"),
        pytest.param({"active": True}, {}, ["active"], id="absent-is-drift"),
        pytest.param({"active": True}, {"active": "true"}, ["active"], id="types-count"),
        pytest.param({"name": {"givenName": "Ada"}}, {"name": {"givenName": "Ada", "familyName": "X"}}, [],
                     id="only-what-the-mapping-sets"),  # fmt: skip
        pytest.param({"emails": [WORK]},
                     {"emails": [{"value": "ADA@example.com", "type": "Work", "primary": True, "display": "A"}]}, [],
                     id="emails-caseless-extra-sub-attributes-ignored"),  # fmt: skip
        pytest.param({"emails": [WORK, {"value": "a2@example.com", "type": "home"}]},
                     {"emails": [{"value": "a2@example.com", "type": "home", "primary": False}, WORK]}, [],
                     id="emails-unordered-primary-false-is-absent"),  # fmt: skip
        pytest.param({"emails": [WORK]}, {"emails": [WORK, {"value": "x@example.com", "type": "home"}]}, ["emails"],
                     id="an-email-added-by-hand"),  # fmt: skip
        pytest.param({ENTERPRISE: {"manager": {"value": "m1"}}},
                     {ENTERPRISE: {"manager": {"value": "m1", "$ref": "../Users/m1", "displayName": "M"}}}, [],
                     id="manager-compared-by-id"),  # fmt: skip
        pytest.param({ENTERPRISE: {"manager": {"value": "m1"}}}, {ENTERPRISE: {"manager": {"value": "m2"}}},
                     [f"{ENTERPRISE}:manager"], id="manager-changed"),  # fmt: skip
        pytest.param({ENTERPRISE: {"manager": {"value": Ref("E9")}}}, {}, [], id="unresolved-reference-skipped"),
        pytest.param({ENTERPRISE: {"department": "Eng"}}, {ENTERPRISE.lower(): {"Department": "Eng"}}, [],
                     id="attribute-names-are-caseless"),  # fmt: skip
]


@pytest.mark.parametrize(("want", "have", "drifted"), DRIFT_CASES)
def test_drift_compares_only_what_the_mapping_sets_as_scim_means_it(
    want: dict[str, Any], have: dict[str, Any], drifted: list[str]
) -> None:
    assert list(drift(want, have)) == drifted


@pytest.mark.parametrize(("want", "have", "drifted"), DRIFT_CASES)
def test_an_identity_with_a_digest_finds_the_same_drift_as_the_full_comparison(
    want: dict[str, Any], have: dict[str, Any], drifted: list[str]
) -> None:
    """The digest only settles the accounts that hold what the mapping sets: the drift named is the full comparison's."""
    shapes: dict[Any, Any] = {}
    identity = Identity.of("E1", want, Link("E1", "u1", "h", True), shapes=shapes)
    assert identity.digest is not None and identity.shape is not None and identity.wants_account
    account = {"id": "u1", **have}
    # A drifted account never passes the digest; one that holds what the mapping sets does, without a payload.
    assert (resource_fingerprint(identity.shape, account) != identity.digest) is bool(drifted)
    classifier = Classifier([identity])
    classifier.observe(account)
    [finding] = classifier.finish()
    assert finding.situation is Situation.LINKED and finding.drift == drifted


def test_create_only_and_write_only_attributes_never_drift_and_a_drift_repair_leaves_them_out() -> None:
    """Reconciliation compares what the planner compares: no `when: create` attribute, no write-only password."""
    create_only = frozenset({("password",), ("nickName",), (ENTERPRISE, "costCenter")})
    want = {"userName": "a@x", "active": True, "title": "Boss", "password": "s3cret", "nickName": "Al",
            ENTERPRISE: {"costCenter": "42", "department": "R&D"}}  # fmt: skip
    have = {"id": "u1", "userName": "a@x", "active": True, "title": "Clown", "nickName": "Bert",
            ENTERPRISE: {"costCenter": "7", "department": "R&D"}}  # fmt: skip
    assert list(drift(want, have, create_only)) == ["title"]
    # A password sent on every update is still never read back (RFC 7643 §4.1.1): no drift either.
    assert list(drift(want, have, create_only - {("password",)})) == ["title"]
    identity = Identity.of("E1", want, Link("E1", "u1", "h", True), shapes={}, create_only=create_only)
    assert resource_fingerprint(identity.shape, {**have, "title": "Boss"}) == identity.digest
    classifier = Classifier([identity], create_only=create_only)
    classifier.observe(have)
    [finding] = classifier.finish()
    assert finding.drift == ["title"]
    repairs = plan_repairs([finding], {"E1": identity}, ReconcileConfig(), first_seen={}, now=utcnow(), lookup={},
                           create_only=create_only)  # fmt: skip
    [decision] = repairs.decisions
    assert decision.kind is Kind.UPDATE and decision.payload is not None
    assert "password" not in decision.payload and "nickName" not in repairs.observed["E1"]
    assert repairs.observed["E1"]["title"] == "Clown" and "costCenter" not in repairs.observed["E1"][ENTERPRISE]
    # A password sent on every update goes into the link masked, never in clear.
    always = plan_repairs([finding], {"E1": identity}, ReconcileConfig(), first_seen={}, now=utcnow(), lookup={},
                          create_only=create_only - {("password",)})  # fmt: skip
    assert always.observed["E1"]["password"] == MASK and always.observed["E1"]["title"] == "Clown"


def test_identities_with_one_shape_share_it() -> None:
    shapes: dict[Any, Any] = {}
    a = Identity.of("E1", {"userName": "a@x", "active": True}, shapes=shapes)
    b = Identity.of("E2", {"userName": "b@x", "active": True}, shapes=shapes)
    assert a.shape is b.shape and len(shapes) == 1 and a.digest != b.digest


def _identity(key: str, user_name: str, scim_id: str | None = None, *, active: bool = True) -> Identity:
    link = Link(key, scim_id, "h", active) if scim_id else None
    return Identity.of(key, {"userName": user_name, "active": True}, link)


def test_an_account_missing_from_the_pages_is_deleted_only_when_the_target_says_404() -> None:
    classifier = Classifier([_identity("E1", "a@x", "u1"), _identity("E2", "b@x", "u2")])
    classifier.observe({"id": "u1", "userName": "a@x", "active": True})
    assert classifier.unseen_links() == [("E2", "u2")]
    classifier.observe({"id": "u2", "userName": "b@x", "active": False})  # what GET /Users/u2 answered
    findings = {f.id: f for f in classifier.finish()}
    assert findings["u2"].situation is Situation.LINKED and findings["u2"].drift == ["active"]
    gone = Classifier([_identity("E2", "b@x", "u2")])
    gone.gone("E2")
    assert [f.situation for f in gone.finish()] == [Situation.DELETED]


def test_a_page_repeating_an_account_counts_it_once() -> None:
    classifier = Classifier([])
    classifier.observe({"id": "u1", "userName": "x@x"})
    classifier.observe({"id": "u1", "userName": "x@x"})
    assert [f.situation for f in classifier.finish()] == [Situation.UNMATCHED]


def test_an_identity_with_a_deleted_account_adopts_the_one_made_by_hand_instead_of_recreating() -> None:
    identity = _identity("E1", "a@x", "u1")
    classifier = Classifier([identity])
    classifier.observe({"id": "u9", "userName": "A@X"})
    classifier.gone("E1")
    findings = classifier.finish()
    assert sorted(f.situation.value for f in findings) == ["deleted", "unlinked"]
    repairs = plan_repairs(findings, {"E1": identity}, ReconcileConfig(), first_seen={}, now=utcnow(), lookup={})
    assert [d.kind for d in repairs.decisions] == [Kind.LINK]
    assert repairs.drop == ["E1"]


def test_unmatched_accounts_are_spared_while_source_records_cannot_be_read() -> None:
    classifier = Classifier([])
    classifier.observe({"id": "u1", "userName": "x@x", "active": True})
    findings = classifier.finish()
    policy = ReconcileConfig(unmatched="disable")
    now = utcnow()
    kept = plan_repairs(findings, {}, policy, first_seen={}, now=now, lookup={}, unreadable_records=1)
    assert kept.decisions == [] and kept.spared[0][0] == "u1"
    sent = plan_repairs(findings, {}, policy, first_seen={}, now=now, lookup={})
    assert [(d.identity_key, d.kind, d.payload) for d in sent.decisions] == [
        ("unmatched:u1", Kind.DISABLE, {"id": "u1", "userName": "x@x"})
    ]
    deleting = ReconcileConfig(unmatched="delete", delete_after="2d")
    young = plan_repairs(findings, {}, deleting, first_seen={"u1": now - timedelta(days=1)}, now=now, lookup={})
    old = plan_repairs(findings, {}, deleting, first_seen={"u1": now - timedelta(days=3)}, now=now, lookup={})
    assert young.decisions == [] and [d.kind for d in old.decisions] == [Kind.DELETE]


BASE = "https://scim.test/v2"


def _config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RECONCILE_TEST_TOKEN", "s3cret-token")
    write_csv(tmp_path / "hr.csv", [hr_row("E1", "Ada", "One"), hr_row("E2", "Bob", "Two")])
    path = tmp_path / "config.yaml"
    path.write_text(f"""state: sqlite:///state.db
sources: {{hr: {{type: csv, path: hr.csv, key: employee_id}}}}
targets:
  app:
    base_url: {BASE}
    auth: {{type: bearer, token: "${{RECONCILE_TEST_TOKEN}}"}}
    source: hr
    mapping: {DEMO_MAPPING}
""")
    return path


@pytest.mark.parametrize(("answer", "situation"), [(200, "linked"), (404, "deleted")])
def test_a_linked_account_a_short_page_left_out_is_looked_up_by_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: int, situation: str
) -> None:
    config = load_config(_config(tmp_path, monkeypatch))
    engine = open_store(config.state)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO account_link (target, identity_key, scim_id, active, updated_at) VALUES "
                             "('app', 'E1', 'u1', 1, '2026-01-01'), ('app', 'E2', 'u2', 1, '2026-01-01')")  # fmt: skip
    from provisioner.sync import load_target_mapping

    mapping = load_target_mapping(config, "app")
    bob = {"id": "u2", "userName": "bob.two@example.com", "active": True}
    with respx.mock(base_url=BASE) as router:
        # The page claims to be complete but leaves u2 out.
        listing = router.get("/Users").respond(200, json={"totalResults": 1, "Resources": [
            {"id": "u1", "userName": "ada.one@example.com", "active": True}]})  # fmt: skip
        lookup = router.get("/Users/u2").respond(answer, json=bob if answer == 200 else {"status": "404"})
        report = asyncio.run(reconcile_target(engine, config, "app", mapping))
    assert listing.call_count == 1 and lookup.call_count == 1
    sent = listing.calls[0].request.url.params["attributes"].split(",")
    assert {"userName", "active", f"{ENTERPRISE}:department", "emails"} <= set(sent)
    assert {f.id: f.situation.value for f in report.findings}["u2"] == situation
    assert report.requests == 2
    engine.dispose()


def test_a_leaver_enabled_again_by_hand_drifts_on_active_and_is_disabled_again() -> None:
    leaver = Identity.of("E1", None, Link("E1", "u1", "h", False))
    classifier = Classifier([leaver])
    classifier.observe({"id": "u1", "userName": "a@x", "active": True})
    findings = classifier.finish()
    assert [(f.situation, f.drift) for f in findings] == [(Situation.LINKED, ["active"])]
    repairs = plan_repairs(findings, {"E1": leaver}, ReconcileConfig(), first_seen={}, now=utcnow(), lookup={})
    assert [(d.identity_key, d.kind) for d in repairs.decisions] == [("E1", Kind.DISABLE)]
    quiet = Classifier([leaver])
    quiet.observe({"id": "u1", "userName": "a@x"})  # the target does not say: no drift is made up
    assert quiet.finish()[0].drift == []


def _mixed_findings() -> tuple[Classifier, list[Identity]]:
    """Every situation: drift, adoption, a dispute whose two accounts are far apart, an orphan."""
    people = [_identity("E1", "a@x", "u1"), _identity("E2", "b@x"), _identity("E3", "c@x", "u3"),
              _identity("E4", "d@x"), _identity("E5", "e@x", "u5")]  # fmt: skip
    classifier = Classifier(people)
    classifier.observe({"id": "u1", "userName": "a@x", "active": False})  # E1 drifted
    classifier.observe({"id": "u9", "userName": "C@X", "active": True})  # a second account for E3: disputed
    classifier.observe({"id": "u2", "userName": "b@x", "active": True})  # E2 unlinked: adopted
    classifier.observe({"id": "u7", "userName": "zz@x", "active": True})  # unmatched
    classifier.observe({"id": "u3", "userName": "c@x", "active": False})  # E3 drifted, but in a dispute
    classifier.observe({"id": "u4", "userName": "d@x", "active": True})  # E4 unlinked
    classifier.gone("E5")  # deleted: recreated
    return classifier, people


def test_repairs_planned_a_page_at_a_time_are_the_repairs_planned_at_once() -> None:
    """A dispute's accounts on different pages still leave its identity alone; the counts add up."""
    classifier, people = _mixed_findings()
    findings = classifier.finish()
    policy = ReconcileConfig(unmatched="disable")
    now = utcnow()
    whole = plan_repairs(findings, {i.key: i for i in people}, policy, first_seen={}, now=now, lookup={})
    assert sorted((d.identity_key, d.kind) for d in whole.decisions) == [
        ("E1", Kind.UPDATE), ("E2", Kind.LINK), ("E4", Kind.LINK), ("E5", Kind.CREATE), ("unmatched:u7", Kind.DISABLE),
    ]  # fmt: skip
    adopted, disputed = findings.adopted(), findings.disputed()
    total: Counter[str] = Counter()
    paged = []
    for page in findings.attention_pages(size=2):
        identities = classifier.identities(f.identity for f in page if f.identity)
        planned = plan_repairs(page, identities, policy, first_seen={}, now=now, lookup={}, adopted=adopted,
                               disputed=disputed)  # fmt: skip
        paged.extend((d.identity_key, d.kind, d.payload, d.payload_hash) for d in planned.decisions)
        total.update(planned.counts())
    assert paged == [(d.identity_key, d.kind, d.payload, d.payload_hash) for d in whole.decisions]
    assert total == whole.counts() == {"update": 1, "link": 2, "create": 1, "disable": 1}


def test_the_json_written_in_pieces_is_the_json_of_the_whole_report() -> None:
    classifier, _ = _mixed_findings()
    report = ReconcileReport("app", "run", findings=classifier.finish(), spill=classifier.spill)
    report.groups = [GroupFinding(Situation.LINKED, "g1", "G1", "all-staff", ["u7", "u8"]),
                     GroupFinding(Situation.UNMATCHED, None, "G2", "by-hand")]  # fmt: skip
    whole = orjson.dumps(report.as_dict()).decode()
    for page in (1, 2, 1000):
        pieces = list(report.json_chunks(page=page))
        assert "".join(pieces) == whole
    # The head, 7 accounts in 4 pieces, the groups key, 2 groups in one, the end.
    assert len(list(report.json_chunks(page=2))) == 1 + 4 + 1 + 1 + 1
    report.close()


@pytest.mark.parametrize(("limit", "status"), [(1, "held"), (2, "pending")])
def test_a_plan_written_page_by_page_is_braked_on_the_count_of_every_page(
    tmp_path: Path, limit: int, status: str
) -> None:
    """One disable per page, two pages: a brake at one holds both, one at two lets both go; the update is never held."""
    from provisioner.planner import Decision, Reason
    from provisioner.queue import PlanWriter

    engine = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    pages = [[Decision("unmatched:u1", Kind.DISABLE, Reason.RECONCILE, {"id": "u1"}, "h1"),
              Decision("E1", Kind.UPDATE, Reason.RECONCILE, {"userName": "a@x"}, "h2")],
             [Decision("unmatched:u2", Kind.DISABLE, Reason.RECONCILE, {"id": "u2"}, "h3")]]  # fmt: skip
    asked: list[int] = []
    with engine.begin() as conn:
        writer = PlanWriter(conn, "run-1", "app")
        assert [writer.add(page) for page in pages] == [2, 1]
        writer.finish(lambda leavers: asked.append(leavers) or leavers > limit)
    assert asked == [2]
    with engine.connect() as conn:
        rows = dict(conn.exec_driver_sql("SELECT identity_key, status FROM operation WHERE run_id = 'run-1'").all())
    assert rows == {"unmatched:u1": status, "unmatched:u2": status, "E1": "pending"}
    # The same plan again: identical open operations are not queued twice, and nothing is braked.
    with engine.begin() as conn:
        again = PlanWriter(conn, "run-2", "app")
        assert [again.add(page) for page in pages] == [0, 0]
        assert again.finish(lambda leavers: True) is False
    engine.dispose()


def test_group_findings_kept_in_the_spill_read_back_as_found_with_their_counts() -> None:
    from provisioner.reconcile import GroupFindings

    found = [GroupFinding(Situation.LINKED, "g1", "G1", "all-staff", ["u7", "u8"]),  # sorted, as found
             GroupFinding(Situation.LINKED, "g2", "G2", "dept-x"),
             GroupFinding(Situation.UNMATCHED, None, "G3", "by-hand"),
             GroupFinding(Situation.DELETED, "g4", "G4", "dept-y")]  # fmt: skip
    classifier = Classifier([])
    kept = GroupFindings(classifier.spill)
    for g in found:
        kept.add(g)
    in_memory = ReconcileReport("app", "run", groups=found)
    spilled = ReconcileReport("app", "run", groups=kept, spill=classifier.spill)
    assert [g.as_dict() for g in kept] == [g.as_dict() for g in in_memory.groups]
    assert len(kept) == 4 and kept[-1].display_name == "dept-y" and [g.id for g in kept[1:3]] == ["G2", "G3"]
    assert spilled.group_counts() == in_memory.group_counts() == {
        "linked": 2, "unlinked": 0, "unmatched": 1, "deleted": 1, "foreign_members": 2}  # fmt: skip
    assert kept.seen("G9") and not kept.seen("G9") and kept.was_seen("G9") and not kept.was_seen("G8")
    # As a list answers: an index past either end is an IndexError, never another row.
    for outside in (4, -5):
        with pytest.raises(IndexError):
            kept[outside]
    spilled.close()


def test_the_member_state_and_managed_ids_in_the_spill_answer_as_the_group_executor_asks() -> None:
    """``state.get(key)`` and ``ids & managed``: what GroupExecutor reads of them."""
    from provisioner.reconcile import ManagedIds, MemberState

    classifier = Classifier([_identity("E1", "a@x", "u1")])
    state = MemberState(classifier.spill)
    state.load([("g1", "u1"), ("g1", "u5"), ("g2", "u1")])
    managed = ManagedIds(classifier, state)
    assert state.get("g1") == {"u1", "u5"} and state.get("g9") is None and state.get("g9", set()) == set()
    assert sorted(state) == ["g1", "g2"] and len(state) == 2
    assert {"u1", "u5", "stranger"} & managed == {"u1", "u5"}  # linked, or a member we recorded
    assert not {"stranger"} & managed and "u1" in managed and sorted(managed) == ["u1", "u5"]
    classifier.spill.close()
