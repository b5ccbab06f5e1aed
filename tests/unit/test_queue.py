"""The operation queue (outbox) on a real SQLite file: enqueue, claim, record."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from provisioner.mapping import Ref
from provisioner.planner import Decision, Kind, Link, Reason
from provisioner.queue import (
    GroupCommit,
    CallRecord,
    LinkState,
    Outcome,
    claim,
    enqueue,
    get_operation,
    list_operations,
    load_link_states,
    load_links,
    prune,
    record,
    record_many,
    recover_orphans,
)
from provisioner.redaction import register
from provisioner.store import open_store

CREATE = Decision("E1", Kind.CREATE, Reason.JOINER, {"userName": "ada@example.com"}, "h1")
UPDATE = Decision("E1", Kind.UPDATE, Reason.MOVER, {"userName": "ada@example.com", "title": "T"}, "h2")
DISABLE = Decision("E1", Kind.DISABLE, Reason.LEAVER)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def engine(db: Path) -> Iterator[Engine]:
    engine = open_store(f"sqlite:///{db}")
    try:
        yield engine
    finally:
        engine.dispose()


def rows(db: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute("SELECT * FROM operation ORDER BY id")]


def statuses(db: Path) -> list[tuple[str, str, str]]:
    return [(row["identity_key"], row["kind"], row["status"]) for row in rows(db)]


# --- enqueue ----------------------------------------------------------------------------------------


def test_enqueue_writes_pending_rows_with_their_payload(engine: Engine, db: Path) -> None:
    added = enqueue(engine, "run-1", "app", [CREATE, Decision("E2", Kind.DISABLE, Reason.LEAVER)])

    assert added == 2
    assert statuses(db) == [("E1", "create", "pending"), ("E2", "disable", "pending")]
    [first, _] = rows(db)
    assert (first["run_id"], first["target"], first["reason"], first["payload_hash"]) == ("run-1", "app", "joiner", "h1")
    assert first["attempts"] == 0


def test_enqueue_keeps_unresolved_references_in_the_payload(engine: Engine) -> None:
    payload = {"userName": "alan@example.com", "urn:x:User": {"manager": {"value": Ref("E1")}}}
    enqueue(engine, "run-1", "app", [Decision("E2", Kind.CREATE, Reason.JOINER, payload, "h")])

    [op] = claim(engine, "app")

    assert op.payload == payload


def test_enqueue_does_not_queue_an_identical_open_operation_twice(engine: Engine, db: Path) -> None:
    enqueue(engine, "run-1", "app", [CREATE])

    added = enqueue(engine, "run-2", "app", [CREATE])

    assert added == 0
    assert statuses(db) == [("E1", "create", "pending")]


def test_enqueue_supersedes_an_older_pending_operation_for_the_same_account(engine: Engine, db: Path) -> None:
    enqueue(engine, "run-1", "app", [CREATE])

    added = enqueue(engine, "run-2", "app", [Decision("E1", Kind.CREATE, Reason.JOINER, UPDATE.payload, "h2")])

    assert added == 1
    assert statuses(db) == [("E1", "create", "superseded"), ("E1", "create", "pending")]
    assert rows(db)[1]["payload_hash"] == "h2"


def test_enqueue_supersedes_a_pending_operation_of_another_kind(engine: Engine, db: Path) -> None:
    """A leaver queued last cycle and not sent yet is replaced when the person is back and changed."""
    enqueue(engine, "run-1", "app", [DISABLE])

    enqueue(engine, "run-2", "app", [UPDATE])

    assert statuses(db) == [("E1", "disable", "superseded"), ("E1", "update", "pending")]


def test_enqueue_leaves_other_accounts_alone(engine: Engine, db: Path) -> None:
    enqueue(engine, "run-1", "app", [CREATE])

    enqueue(engine, "run-2", "app", [Decision("E2", Kind.CREATE, Reason.JOINER, {"userName": "b"}, "hb")])

    assert statuses(db) == [("E1", "create", "pending"), ("E2", "create", "pending")]


def test_enqueue_is_per_target(engine: Engine, db: Path) -> None:
    enqueue(engine, "run-1", "app", [CREATE])

    assert enqueue(engine, "run-2", "other-app", [CREATE]) == 1
    assert [row["target"] for row in rows(db)] == ["app", "other-app"]


def test_enqueue_adds_nothing_beside_a_running_operation(engine: Engine, db: Path) -> None:
    """Never two operations in flight for one account: the next plan decides again."""
    enqueue(engine, "run-1", "app", [CREATE])
    claim(engine, "app")

    assert enqueue(engine, "run-2", "app", [UPDATE]) == 0
    assert statuses(db) == [("E1", "create", "running")]


def test_enqueue_supersedes_open_operations_of_settled_identities(engine: Engine, db: Path) -> None:
    """A leaver back in the source before their disable was sent: the disable is stale."""
    enqueue(engine, "run-1", "app", [DISABLE, Decision("E2", Kind.DISABLE, Reason.LEAVER)])

    enqueue(engine, "run-2", "app", [], settled=["E1"])

    assert statuses(db) == [("E1", "disable", "superseded"), ("E2", "disable", "pending")]


def test_enqueue_leaves_a_running_operation_of_a_settled_identity_alone(engine: Engine, db: Path) -> None:
    enqueue(engine, "run-1", "app", [DISABLE])
    claim(engine, "app")

    enqueue(engine, "run-2", "app", [], settled=["E1"])

    assert statuses(db) == [("E1", "disable", "running")]


def test_enqueue_keeps_a_tried_create_of_a_settled_identity(engine: Engine, db: Path) -> None:
    """A leaver whose create was sent by a process killed before the answer: its account may exist.

    Superseded, that account would stay active with no link to disable it by;
    kept, the retry adopts it. A create never tried made nothing and goes.
    """
    enqueue(engine, "run-1", "app", [CREATE, Decision("E2", Kind.CREATE, Reason.JOINER, {"userName": "b@x"}, "h3")])
    claim(engine, "app", identities=["E1"])
    recover_orphans(engine)

    enqueue(engine, "run-2", "app", [], settled=["E1", "E2"])

    assert statuses(db) == [("E1", "create", "pending"), ("E2", "create", "superseded")]


def test_enqueue_sends_a_leavers_tried_create_disabled(engine: Engine, db: Path) -> None:
    """Its retry makes (or adopts) the account with ``active: false``: never active for someone who left."""
    enqueue(engine, "run-1", "app", [CREATE])
    claim(engine, "app", identities=["E1"])
    recover_orphans(engine)

    enqueue(engine, "run-2", "app", [], settled=["E1"])

    [op] = claim(engine, "app")
    assert op.payload == {"userName": "ada@example.com", "active": False}


def test_enqueue_sends_a_tried_create_of_someone_gone_from_the_source_disabled(engine: Engine, db: Path) -> None:
    second = Decision("E2", Kind.CREATE, Reason.JOINER, {"userName": "b@x"}, "h3")
    enqueue(engine, "run-1", "app", [CREATE, second])
    claim(engine, "app", identities=["E1"])
    recover_orphans(engine)

    enqueue(engine, "run-2", "app", [], present={"E3"})

    assert statuses(db) == [("E1", "create", "pending"), ("E2", "create", "superseded")]
    [op] = claim(engine, "app")
    assert op.payload == {"userName": "ada@example.com", "active": False}


def test_a_rehire_replaces_the_create_sent_disabled(engine: Engine, db: Path) -> None:
    """Back in scope before the retry: the plan's create, active, is the one sent."""
    enqueue(engine, "run-1", "app", [CREATE])
    claim(engine, "app", identities=["E1"])
    recover_orphans(engine)
    enqueue(engine, "run-2", "app", [], settled=["E1"])

    enqueue(engine, "run-3", "app", [CREATE])

    assert statuses(db) == [("E1", "create", "superseded"), ("E1", "create", "pending")]
    [op] = claim(engine, "app")
    assert op.payload == CREATE.payload


def test_a_linked_identitys_tried_create_is_left_as_it_is(engine: Engine, db: Path) -> None:
    """With an account linked, a leaver's own disable sees to it; an unchanged one's create is not touched."""
    enqueue(engine, "run-1", "app", [CREATE])
    claim(engine, "app", identities=["E1"])
    recover_orphans(engine)
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO account_link (target, identity_key, scim_id, active, updated_at) "
                     "VALUES ('app', 'E1', 'u1', 1, '2026-01-01')")  # fmt: skip

    enqueue(engine, "run-2", "app", [], settled=["E1"], present={"E1"})

    [op] = claim(engine, "app")
    assert op.payload == CREATE.payload


def test_rejected_record_is_written_as_failed_with_its_reason(engine: Engine, db: Path) -> None:
    enqueue(engine, "run-1", "app", [], [("E9", "hr.csv:4: users.yaml:3: attribute 'userName': boom", Kind.CREATE, Reason.JOINER)])

    [row] = rows(db)
    assert (row["identity_key"], row["kind"], row["reason"], row["status"]) == ("E9", "create", "joiner", "failed")
    assert row["last_error"] == "hr.csv:4: users.yaml:3: attribute 'userName': boom"
    assert row["finished_at"] is not None


def test_the_same_rejection_is_not_recorded_every_cycle(engine: Engine, db: Path) -> None:
    rejection = ("E9", "hr.csv:4: boom", Kind.CREATE, Reason.JOINER)
    enqueue(engine, "run-1", "app", [], [rejection])

    assert enqueue(engine, "run-2", "app", [], [rejection]) == 0
    assert len(rows(db)) == 1


def test_a_new_rejection_supersedes_the_old_one(engine: Engine, db: Path) -> None:
    enqueue(engine, "run-1", "app", [], [("E9", "hr.csv:4: boom", Kind.CREATE, Reason.JOINER)])

    enqueue(engine, "run-2", "app", [], [("E9", "hr.csv:5: other", Kind.CREATE, Reason.JOINER)])

    assert [row["status"] for row in rows(db)] == ["superseded", "failed"]


def test_a_fixed_record_supersedes_its_rejection(engine: Engine, db: Path) -> None:
    enqueue(engine, "run-1", "app", [], [("E1", "hr.csv:2: boom", Kind.CREATE, Reason.JOINER)])

    enqueue(engine, "run-2", "app", [CREATE])

    assert statuses(db) == [("E1", "create", "superseded"), ("E1", "create", "pending")]


# --- claim and record ------------------------------------------------------------------------------


def test_claim_takes_pending_operations_once(engine: Engine, db: Path) -> None:
    enqueue(engine, "run-1", "app", [CREATE, Decision("E2", Kind.DISABLE, Reason.LEAVER)])

    first = claim(engine, "app")
    second = claim(engine, "app")

    assert [(op.identity_key, op.kind, op.attempts) for op in first] == [("E1", Kind.CREATE, 1), ("E2", Kind.DISABLE, 1)]
    assert second == []
    assert [row["status"] for row in rows(db)] == ["running", "running"]


def test_claim_takes_back_a_running_operation_whose_lease_ran_out(engine: Engine) -> None:
    enqueue(engine, "run-1", "app", [CREATE])
    [op] = claim(engine, "app")

    [again] = claim(engine, "app", now=datetime.now(UTC) + timedelta(hours=1))

    assert again.id == op.id
    assert again.attempts == 2


def test_retry_wait_is_claimed_only_once_it_is_due(engine: Engine, db: Path) -> None:
    enqueue(engine, "run-1", "app", [CREATE])
    [op] = claim(engine, "app")
    record(engine, "app", "E1", Outcome(op.id, "retry_wait", error="503", http_status=503))
    [row] = rows(db)
    assert row["status"] == "retry_wait"

    assert claim(engine, "app") == []
    [due] = claim(engine, "app", now=datetime.now(UTC) + timedelta(days=1))
    assert due.id == op.id


def test_record_writes_the_outcome_its_calls_and_the_link_together(engine: Engine, db: Path) -> None:
    enqueue(engine, "run-1", "app", [CREATE])
    [op] = claim(engine, "app")
    call = CallRecord(datetime.now(UTC), 12.5, "POST", "https://scim.example.com/v2/Users", 201,
                      request_body={"userName": "ada@example.com"}, response_body='{"id": "scim-1"}')  # fmt: skip
    link = LinkState("scim-1", True, 'W/"1"', "https://scim.example.com/v2/Users/scim-1", "h1", CREATE.payload)

    record(engine, "app", "E1", Outcome(op.id, "succeeded", http_status=201, link=link, calls=[call]))

    [row] = rows(db)
    assert (row["status"], row["last_http_status"]) == ("succeeded", 201)
    assert load_links(engine, "app") == {"E1": Link("E1", "scim-1", "h1", True, 'W/"1"')}
    assert load_link_states(engine, "app", ["E1"])["E1"] == link
    found = get_operation(engine, op.id)
    assert found is not None
    [stored_call] = found[1]
    assert (stored_call["method"], stored_call["http_status"], stored_call["number"]) == ("POST", 201, 1)


def test_a_link_keeps_what_its_account_owes_and_the_planner_sees_whom_it_refers_to(engine: Engine) -> None:
    """A report written without its manager (not in the target yet): the link keeps the attribute, reference and all."""
    enqueue(engine, "run-1", "app", [CREATE])
    [op] = claim(engine, "app")
    owed = {"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager": {"value": Ref("E0")}}
    link = LinkState("scim-1", True, None, None, "h1", CREATE.payload, owed)

    record(engine, "app", "E1", Outcome(op.id, "succeeded", link=link))

    assert load_link_states(engine, "app", ["E1"])["E1"].owed == owed
    assert load_links(engine, "app")["E1"].owes == {"E0"}


def test_record_of_a_delete_drops_the_link(engine: Engine) -> None:
    enqueue(engine, "run-1", "app", [CREATE])
    [op] = claim(engine, "app")
    record(engine, "app", "E1", Outcome(op.id, "succeeded", link=LinkState("scim-1", True, None, None, "h1", {})))
    enqueue(engine, "run-2", "app", [Decision("E1", Kind.DELETE, Reason.LEAVER)])
    [delete] = claim(engine, "app")

    record(engine, "app", "E1", Outcome(delete.id, "succeeded", drop_link=True))

    assert load_links(engine, "app") == {}


def test_record_masks_secrets_in_what_it_stores(engine: Engine, db: Path) -> None:
    register("queue-secret-7c1d2e")
    enqueue(engine, "run-1", "app", [CREATE])
    [op] = claim(engine, "app")
    call = CallRecord(datetime.now(UTC), 1.0, "POST", "https://scim.example.com/v2/Users?key=queue-secret-7c1d2e", 401,
                      response_body="Authorization: Bearer abcdefgh12345678 refused")  # fmt: skip

    record(engine, "app", "E1", Outcome(op.id, "failed", error="token queue-secret-7c1d2e refused", calls=[call]))

    with sqlite3.connect(db) as conn:
        dump = "\n".join(conn.iterdump())
    assert "queue-secret-7c1d2e" not in dump
    assert "abcdefgh12345678" not in dump


def test_list_operations_is_newest_first_and_filters(engine: Engine) -> None:
    enqueue(engine, "run-1", "app", [CREATE, Decision("E2", Kind.DISABLE, Reason.LEAVER)])
    enqueue(engine, "run-1", "other", [Decision("E3", Kind.DISABLE, Reason.LEAVER)])

    assert [row["identity_key"] for row in list_operations(engine)] == ["E3", "E2", "E1"]
    assert [row["identity_key"] for row in list_operations(engine, target="app")] == ["E2", "E1"]
    assert [row["identity_key"] for row in list_operations(engine, identity="E1")] == ["E1"]
    assert list_operations(engine, status="failed") == []


def test_an_account_already_linked_to_another_identity_is_not_linked_twice(tmp_path: Path) -> None:
    """Two identities adopting one account at once: the second outcome goes to review, without the link."""
    engine = open_store(f"sqlite:///{tmp_path / 'race.db'}")
    payload = {"userName": "sam@example.com"}
    enqueue(engine, "r1", "app", [Decision("E4", Kind.CREATE, Reason.JOINER, payload, "h"),
                                  Decision("E5", Kind.CREATE, Reason.JOINER, payload, "h")])  # fmt: skip
    first, second = claim(engine, "app")
    record(engine, "app", "E4", Outcome(first.id, "succeeded", link=LinkState("acct-1", True, None, None, "h", payload)))

    record(engine, "app", "E5", Outcome(second.id, "succeeded", link=LinkState("acct-1", True, None, None, "h", payload)))

    rows = {row["identity_key"]: row for row in list_operations(engine)}
    assert rows["E4"]["status"] == "succeeded"
    assert rows["E5"]["status"] == "failed"
    assert "acct-1 is already linked to identity E4" in rows["E5"]["last_error"]
    assert set(load_links(engine, "app")) == {"E4"}


def _stored(engine: Engine, db: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Every operation row, call row and link state, without ids and times (which differ run to run)."""
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        ops = [dict(r) for r in conn.execute("SELECT * FROM operation ORDER BY id")]
        calls = [dict(r) for r in conn.execute("SELECT * FROM attempt ORDER BY id")]
    for row in ops:
        assert row.pop("updated_at") == row["finished_at"] or row["finished_at"] is None
        row.pop("finished_at"), row.pop("created_at"), row.pop("claimed_by"), row.pop("run_id")
        row["next_attempt_at"] = row["next_attempt_at"] is not None
    for row in calls:
        row.pop("id"), row.pop("started_at")
    return ops, calls, load_link_states(engine, "app", ["E1", "E2", "E3"])


def test_outcomes_written_as_a_group_are_stored_as_written_one_by_one(tmp_path: Path) -> None:
    """record_many writes exactly the rows record() writes: statuses, calls, links upserted and dropped."""
    stored = []
    for group in (False, True):
        db = tmp_path / f"group-{group}.db"
        engine = open_store(f"sqlite:///{db}")
        decisions = [Decision(f"E{n}", Kind.CREATE, Reason.JOINER, {"userName": f"u{n}@example.com"}, "h")
                     for n in (1, 2, 3)]  # fmt: skip
        enqueue(engine, "r1", "app", decisions)
        first, second, third = claim(engine, "app")
        record(engine, "app", "E3", Outcome(third.id, "succeeded", link=LinkState("acct-3", True, None, None, "h", {})))
        enqueue(engine, "r2", "app", [Decision("E3", Kind.DELETE, Reason.LEAVER)])
        [delete] = claim(engine, "app")
        call = CallRecord(datetime(2026, 1, 2, tzinfo=UTC), 3.25, "POST", "https://scim.example.com/v2/Users", 201,
                          request_body={"userName": "u1@example.com"}, response_body='{"id": "acct-1"}')  # fmt: skip
        link = LinkState("acct-1", True, 'W/"1"', "https://scim.example.com/v2/Users/acct-1", "h", {"userName": "u1"})
        outcomes = [
            ("E1", Outcome(first.id, "succeeded", http_status=201, link=link, calls=[call], note="adopted")),
            ("E2", Outcome(second.id, "retry_wait", http_status=503, error="busy", detail="d", retry_after=30.0)),
            ("E3", Outcome(delete.id, "succeeded", drop_link=True)),
        ]
        if group:
            record_many(engine, "app", outcomes)
        else:
            for key, outcome in outcomes:
                record(engine, "app", key, outcome)
        stored.append(_stored(engine, db))
        engine.dispose()
    assert stored[0] == stored[1]
    ops, calls, links = stored[1]
    assert [(op["identity_key"], op["status"]) for op in ops] == [
        ("E1", "succeeded"), ("E2", "retry_wait"), ("E3", "succeeded"), ("E3", "succeeded")]  # fmt: skip
    assert [c["http_status"] for c in calls] == [201] and set(links) == {"E1"}


def test_a_group_with_an_account_linked_twice_sends_only_that_outcome_to_review(tmp_path: Path) -> None:
    engine = open_store(f"sqlite:///{tmp_path / 'race.db'}")
    payload = {"userName": "sam@example.com"}
    enqueue(engine, "r1", "app", [Decision(f"E{n}", Kind.CREATE, Reason.JOINER, payload, "h") for n in (4, 5, 6)])
    first, second, third = claim(engine, "app")

    record_many(engine, "app", [
        ("E4", Outcome(first.id, "succeeded", link=LinkState("acct-1", True, None, None, "h", payload))),
        ("E5", Outcome(second.id, "succeeded", link=LinkState("acct-1", True, None, None, "h", payload))),
        ("E6", Outcome(third.id, "succeeded", link=LinkState("acct-6", True, None, None, "h", payload))),
    ])  # fmt: skip

    rows = {row["identity_key"]: row for row in list_operations(engine)}
    assert [rows[key]["status"] for key in ("E4", "E5", "E6")] == ["succeeded", "failed", "succeeded"]
    assert "acct-1 is already linked to identity E4" in rows["E5"]["last_error"]
    assert set(load_links(engine, "app")) == {"E4", "E6"}
    engine.dispose()


async def test_a_group_commit_counts_nothing_before_it_is_written(tmp_path: Path) -> None:
    """Successes wait for a group; a failure writes the group at once; ``then`` runs after the commit only."""
    engine = open_store(f"sqlite:///{tmp_path / 'group.db'}")
    enqueue(engine, "r1", "app", [Decision(f"E{n}", Kind.CREATE, Reason.JOINER, {"userName": f"u{n}"}, "h")
                                  for n in range(4)])  # fmt: skip
    ops = claim(engine, "app")
    commits = GroupCommit(engine, "app", max_group=3, max_wait=60)
    counted: list[str] = []
    link = LinkState("acct", True, None, None, "h", {})

    commits.hand_in("E0", Outcome(ops[0].id, "succeeded", link=replace(link, scim_id="a0")), lambda: counted.append("E0"))
    assert counted == [] and statuses(tmp_path / "group.db")[0][2] == "running"
    commits.hand_in("E1", Outcome(ops[1].id, "retry_wait", error="busy"), lambda: counted.append("E1"))
    assert counted == ["E0", "E1"]  # the failure wrote the waiting success with it, in order
    assert [s for *_, s in statuses(tmp_path / "group.db")][:2] == ["succeeded", "retry_wait"]

    commits.hand_in("E2", Outcome(ops[2].id, "succeeded", link=replace(link, scim_id="a2")), lambda: counted.append("E2"))
    commits.close()
    assert counted == ["E0", "E1", "E2"]
    engine.dispose()


async def test_a_group_that_cannot_be_written_is_raised_and_counts_nothing(tmp_path: Path) -> None:
    engine = open_store(f"sqlite:///{tmp_path / 'broken.db'}")
    enqueue(engine, "r1", "app", [Decision("E1", Kind.CREATE, Reason.JOINER, {"userName": "u1"}, "h")])
    [op] = claim(engine, "app")
    commits = GroupCommit(engine, "app", max_wait=60)
    counted: list[str] = []
    commits.hand_in("E1", Outcome(op.id, "succeeded"), lambda: counted.append("E1"))
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE attempt")
    commits.hand_in("E1", Outcome(op.id, "succeeded", calls=[CallRecord(datetime.now(UTC), 1.0, "POST", "u", 201)]),
                    lambda: counted.append("again"))  # fmt: skip
    with pytest.raises(Exception, match="attempt"):
        commits.close()
    with pytest.raises(Exception, match="attempt"):
        commits.hand_in("E1", Outcome(op.id, "succeeded"), lambda: counted.append("later"))
    assert counted == []
    engine.dispose()


def test_prune_deletes_old_finished_operations_and_their_calls_but_keeps_failed_ones(tmp_path: Path) -> None:
    engine = open_store(f"sqlite:///{tmp_path / 'prune.db'}")
    payload = {"userName": "a@example.com"}
    enqueue(engine, "r1", "app", [Decision(f"E{n}", Kind.CREATE, Reason.JOINER, payload, f"h{n}") for n in range(3)])
    done, failed, waiting = claim(engine, "app")
    call = CallRecord(datetime.now(UTC), 1.0, "POST", "https://x/Users", 201)
    record(engine, "app", "E0", Outcome(done.id, "succeeded", calls=[call],
                                        link=LinkState("a0", True, None, None, "h0", payload)))  # fmt: skip
    record(engine, "app", "E1", Outcome(failed.id, "failed", error="400", calls=[call]))
    record(engine, "app", "E2", Outcome(waiting.id, "retry_wait", error="503"))

    assert prune(engine, datetime.now(UTC) - timedelta(days=1)) == 0
    assert prune(engine, datetime.now(UTC) + timedelta(seconds=1)) == 1

    assert {row["identity_key"] for row in list_operations(engine)} == {"E1", "E2"}
    assert get_operation(engine, done.id) is None
    assert len(get_operation(engine, failed.id)[1]) == 1  # type: ignore[index]
    assert set(load_links(engine, "app")) == {"E0"}, "pruning the history never touches account links"


# --- rejected records: one row per identity and cause, silenced by resolve until the record changes ------


def reject(engine: Engine, run: str, message: str, digest: str, present: set[str] | None = None) -> int:
    from provisioner.queue import Rejections

    tally = Rejections()
    enqueue(engine, run, "app", [], [("E9", message, Kind.CREATE, Reason.JOINER)], record_hashes={"E9": digest},
            rejections=tally, present=present)  # fmt: skip
    return len(tally.new)


def test_a_rejection_moved_to_another_line_is_the_same_rejection(engine: Engine, db: Path) -> None:
    reject(engine, "run-1", "hr.csv:4: users.yaml:3: attribute 'userName': blank", "d1")

    assert reject(engine, "run-2", "hr.csv:9: users.yaml:3: attribute 'userName': blank", "d1") == 0
    assert [row["status"] for row in rows(db)] == ["failed"]


def test_a_resolved_rejection_stays_silent_until_the_record_changes(engine: Engine, db: Path) -> None:
    from provisioner.queue import Selection, close

    reject(engine, "run-1", "hr.csv:4: boom", "d1")
    close(engine, Selection(ids=(rows(db)[0]["id"],)), status="resolved", note="known")

    assert reject(engine, "run-2", "hr.csv:4: boom", "d1") == 0
    assert reject(engine, "run-3", "hr.csv:5: boom", "d1") == 0
    assert reject(engine, "run-4", "hr.csv:4: boom", "d2") == 1
    assert [row["status"] for row in rows(db)] == ["resolved", "failed"]
    assert rows(db)[1]["payload_hash"] == "record:d2"


def test_a_rejection_of_an_identity_gone_from_the_source_is_superseded(engine: Engine, db: Path) -> None:
    reject(engine, "run-1", "hr.csv:4: boom", "d1")

    enqueue(engine, "run-2", "app", [], [], present={"E1"})

    assert [row["status"] for row in rows(db)] == ["superseded"]


def test_a_duplicate_whose_rows_moved_is_the_same_rejection(engine: Engine, db: Path) -> None:
    """Rows above come and go: neither the record's line nor its twins' makes another rejection to review."""
    why = "employee_id 'E1' appears 2 times (also at line {}); none of them is used"
    enqueue(engine, "run-1", "app", [], [("E1", f"hr.csv:2: {why.format(4)}", Kind.CREATE, Reason.JOINER)])

    enqueue(engine, "run-2", "app", [], [("E1", f"hr.csv:3: {why.format(5)}", Kind.CREATE, Reason.JOINER)])

    assert statuses(db) == [("E1", "create", "failed")]
