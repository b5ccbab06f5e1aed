"""One definition of a target's health, read from the queue and the target's state."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from provisioner.health import assess, cycle_succeeded, exit_code, overall, target_health
from provisioner.lock import StateLock
from provisioner.quarantine import TargetState, set_paused
from provisioner.queue import OP
from provisioner.store import Run, open_store
from provisioner.sync import TargetReport


@pytest.mark.parametrize(
    ("counts", "state", "run", "expected"),
    [
        pytest.param({}, None, None, "ok", id="nothing-queued"),
        pytest.param({"succeeded": 40, "pending": 3}, None, {"status": "succeeded"}, "ok", id="pending-is-not-waiting"),
        pytest.param({"retry_wait": 5}, None, None, "waiting", id="retry-wait"),
        pytest.param({"failed": 1}, None, None, "failed", id="failed"),
        pytest.param({"failed": 1, "retry_wait": 5}, None, None, "failed", id="failed-before-waiting"),
        pytest.param({"held": 60, "failed": 2}, None, None, "held", id="held-before-failed"),
        pytest.param({}, None, {"status": "refused", "error": "empty source"}, "refused", id="refused"),
        pytest.param({"pending": 3}, None, {"status": "interrupted"}, "waiting", id="interrupted-is-not-refused"),
        pytest.param({}, TargetState(target="t", paused=True), None, "paused", id="paused"),
        pytest.param({}, TargetState(target="t", quarantined=True, paused=True), None, "quarantined", id="quarantined"),
        pytest.param({}, TargetState(target="t", last_error="HTTP 503"), None, "ok", id="old-error-alone-is-ok"),
    ],
)
def test_a_targets_status_is_its_most_urgent_problem(
    counts: dict[str, int], state: TargetState | None, run: dict[str, str] | None, expected: str
) -> None:
    health = assess("t", counts, 0, state, run)

    assert health.status == expected
    assert health.ok is (expected == "ok")
    assert (len(health.problems) > 0) is (expected != "ok")


@pytest.mark.parametrize(
    ("counts", "state", "run", "code"),
    [
        pytest.param({}, None, {"status": "succeeded"}, 0, id="ok"),
        pytest.param({"retry_wait": 1}, None, None, 4, id="waiting"),
        pytest.param({"failed": 1}, None, None, 4, id="failed"),
        pytest.param({}, None, {"status": "interrupted"}, 4, id="interrupted"),
        pytest.param({}, None, {"status": "error"}, 4, id="crashed"),
        pytest.param({"held": 2}, None, None, 5, id="held"),
        pytest.param({}, None, {"status": "refused", "error": "empty source"}, 5, id="refused"),
        pytest.param({}, TargetState(target="t", paused=True), {"status": "refused"}, 5, id="refused-and-paused"),
    ],
)
def test_the_exit_code_says_a_safety_stop_for_a_refused_cycle_as_for_held_leavers(
    counts: dict[str, int], state: TargetState | None, run: dict[str, str] | None, code: int
) -> None:
    healths = {"t": assess("t", counts, 0, state, run), "other": assess("other", {})}

    assert exit_code(healths) == code


def test_an_interrupted_cycle_says_so_and_never_reads_as_a_safety_stop() -> None:
    health = assess("t", {"pending": 12}, 0, None, {"status": "interrupted", "error": "stopped by SIGTERM"})

    assert health.status == "waiting"
    assert health.problems == ("last cycle interrupted: stopped by SIGTERM",)


def test_rejected_records_count_as_failed_and_are_named_apart() -> None:
    health = assess("t", {"failed": 3}, rejected=2)

    assert (health.status, health.failed, health.rejected) == ("failed", 3, 2)
    assert health.problems == ("3 failed operations wait for review (2 of them rejected records)",)


def test_held_operations_are_named_by_what_they_hold() -> None:
    health = assess("t", {"held": 3}, held_kinds={"disable": 1, "group_members": 2})

    assert (health.status, health.held) == ("held", 3)
    assert health.problems == ("1 leaver disable, 2 group member removals awaiting approval: "
                               "provisioner plan --held, then approve RUN_ID or reject RUN_ID",)  # fmt: skip
    # Member removals alone are never called leavers.
    assert "leaver" not in assess("t", {"held": 1}, held_kinds={"group_members": 1}).problems[0]


def test_target_health_reads_the_held_operations_by_kind(tmp_path: Path) -> None:
    engine = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    now = datetime.now(UTC)
    rows = [{"run_id": "r1", "target": "t", "identity_key": key, "kind": kind, "reason": reason, "status": "held",
             "payload": "{}", "attempts": 0, "created_at": now, "updated_at": now}
            for key, kind, reason in (("E1", "disable", "leaver"), ("dept-a", "group_members", "membership"))]
    with engine.begin() as conn:
        conn.execute(OP.insert(), rows)

    health = target_health(engine, ["t"])["t"]

    assert health.held_kinds == {"disable": 1, "group_members": 1}
    assert health.problems[0].startswith("1 leaver disable, 1 group member removal awaiting approval")


def test_overall_is_the_most_urgent_of_the_targets_and_ok_for_none() -> None:
    healths = {"a": assess("a", {}), "b": assess("b", {"retry_wait": 1}), "c": assess("c", {"failed": 1})}

    assert overall(healths) == "failed"
    assert overall({"a": healths["a"]}) == "ok"
    assert overall({}) == "ok"


def test_as_dict_gives_timestamps_with_their_offset() -> None:
    naive = datetime(2026, 11, 30, 5, 9, 32)  # as SQLite hands it back

    data = assess("t", {}, last_run={"id": "r", "status": "succeeded", "started_at": naive}).as_dict()

    assert data["last_run_started_at"] == "2026-11-30T05:09:32+00:00"
    assert data["ok"] is True


def test_a_cycle_with_a_failed_record_is_successful_one_with_waiting_work_is_not() -> None:
    with_bad_record = TargetReport("t", "r", statuses=Counter({"succeeded": 9, "failed": 1}), rejected=1)
    waiting = TargetReport("t", "r", statuses=Counter({"succeeded": 9, "retry_wait": 1}))
    unsent = TargetReport("t", "r", statuses=Counter(), skipped=4)
    stopped = TargetReport("t", "r", statuses=Counter({"succeeded": 9}), status="interrupted")

    assert cycle_succeeded(with_bad_record)
    assert not cycle_succeeded(waiting)
    assert not cycle_succeeded(unsent)
    assert not cycle_succeeded(stopped)


def test_target_health_reads_every_cycles_rows_rejected_records_runs_and_pauses(tmp_path: Path) -> None:
    engine = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    now = datetime.now(UTC)

    def row(target: str, status: str, kind: str = "create", payload: str | None = "{}") -> dict[str, object]:
        return {"run_id": "old", "target": target, "identity_key": f"{target}-{status}-{kind}-{payload}",
                "kind": kind, "reason": "joiner", "status": status, "payload": payload, "attempts": 1,
                "created_at": now, "updated_at": now}  # fmt: skip

    with engine.begin() as conn:
        conn.execute(OP.insert(), [
            row("a", "retry_wait"), row("a", "succeeded"),
            row("b", "failed", payload=None), row("b", "failed"), row("b", "resolved", payload=None),
            row("c", "succeeded"),
        ])  # fmt: skip
        conn.execute(Run.__table__.insert(), [{"id": "r1", "target": "c", "started_at": now, "status": "refused",
                                               "error": "the source has no usable records"}])  # fmt: skip
    set_paused(engine, "d", True, "maintenance")

    healths = target_health(engine, ["a", "b", "c", "d", "e"])

    assert {name: h.status for name, h in healths.items()} == {
        "a": "waiting", "b": "failed", "c": "refused", "d": "paused", "e": "ok",
    }  # fmt: skip
    assert (healths["b"].failed, healths["b"].rejected) == (2, 1)
    assert healths["d"].problems == ("paused: maintenance",)


def test_a_running_cycle_reads_as_running_while_its_process_lives_and_abandoned_once_it_is_gone(
    tmp_path: Path,
) -> None:
    engine = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    with engine.begin() as conn:
        conn.execute(Run.__table__.insert(), [{"id": "r1", "target": "a", "started_at": datetime.now(UTC),
                                               "status": "running"}])  # fmt: skip

    with StateLock(str(engine.url)):  # the process running the cycle holds the state file, as sync and run do
        running = target_health(engine, ["a"])["a"]
    gone = target_health(engine, ["a"])["a"]

    assert (running.status, running.last_run_status) == ("ok", "running")
    assert (gone.status, gone.last_run_status) == ("waiting", "abandoned")
    assert gone.problems[0].startswith("last cycle abandoned: its process ended before the cycle finished")
    assert exit_code({"a": gone}) == 4
