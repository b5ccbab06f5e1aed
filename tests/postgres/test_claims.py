"""Claims, leases and the planner lock on a real PostgreSQL shared by several instances."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, text

from provisioner import queue
from provisioner.cli import main
from provisioner.demo import DEMO_MAPPING
from provisioner.lock import PlannerLock
from provisioner.planner import Decision, Kind, Reason
from provisioner.queue import OP, claim, enqueue, identify, recover_orphans, renew_leases
from provisioner.store import open_store, utcnow
from tests.conftest import hr_row, write_csv


@pytest.fixture
def engine(pg_url: str) -> Iterator[Engine]:
    engine = open_store(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture(autouse=True)
def _restore_identity() -> Iterator[None]:
    before = queue.claimant()
    yield
    identify(before.name, before.lease)


def plan(engine: Engine, count: int) -> None:
    decisions = [
        Decision(f"E{n:03d}", Kind.CREATE, Reason.JOINER, {"userName": f"u{n}"}, f"h{n}") for n in range(count)
    ]
    enqueue(engine, "run-1", "app", decisions)


def claimed_by(engine: Engine) -> dict[str, str | None]:
    with engine.connect() as conn:
        return dict(conn.execute(select(OP.c.identity_key, OP.c.claimed_by).where(OP.c.status == "running")).all())


def test_rows_locked_by_a_claim_in_progress_are_skipped_not_waited_for(engine: Engine) -> None:
    plan(engine, 6)
    with engine.connect() as other:
        # Another instance's claim transaction, still open, holding the two oldest rows.
        held = other.execute(text("SELECT id FROM operation ORDER BY id LIMIT 2 FOR UPDATE")).scalars().all()
        identify("b")
        taken = claim(engine, "app")
        other.rollback()
    assert len(held) == 2
    assert sorted(op.id for op in taken) == sorted(set(range(min(held), min(held) + 6)) - set(held))
    assert set(claimed_by(engine).values()) == {"b"}


def test_each_claim_is_stamped_with_its_instance_and_lease(engine: Engine) -> None:
    plan(engine, 4)
    identify("a", timedelta(seconds=30))
    first = claim(engine, "app", limit=2)
    identify("b", timedelta(seconds=30))
    second = claim(engine, "app")
    assert {op.identity_key for op in first}.isdisjoint(op.identity_key for op in second)
    owners = claimed_by(engine)
    assert sorted(owners.values()) == ["a", "a", "b", "b"]
    with engine.connect() as conn:
        leases = conn.execute(select(OP.c.lease_until).where(OP.c.status == "running")).scalars().all()
    assert all(timedelta(seconds=25) < lease - utcnow() <= timedelta(seconds=30) for lease in leases)


def test_a_row_is_taken_back_only_once_its_lease_has_expired(engine: Engine) -> None:
    plan(engine, 2)
    identify("a", timedelta(minutes=10))
    claim(engine, "app")
    identify("b")
    assert claim(engine, "app") == [], "a live lease is not taken"
    later = utcnow() + timedelta(minutes=11)
    assert len(claim(engine, "app", now=later)) == 2
    assert set(claimed_by(engine).values()) == {"b"}


def test_start_up_recovery_leaves_a_live_instance_s_rows_alone(engine: Engine) -> None:
    plan(engine, 3)
    identify("live", timedelta(minutes=10))
    claim(engine, "app", limit=1)
    identify("me", timedelta(minutes=10))
    claim(engine, "app", limit=1)
    identify("dead", timedelta(seconds=1))
    claim(engine, "app", limit=1, now=utcnow() - timedelta(minutes=1))
    identify("me", timedelta(minutes=10))

    assert recover_orphans(engine) == 2, "the expired row and this instance's own"
    assert list(claimed_by(engine).values()) == ["live"]


def test_renewal_extends_only_this_instance_s_leases(engine: Engine) -> None:
    plan(engine, 2)
    identify("a", timedelta(seconds=5))
    claim(engine, "app", limit=1)
    identify("b", timedelta(seconds=5))
    claim(engine, "app", limit=1)
    identify("a", timedelta(minutes=10))
    assert renew_leases(engine) == 1
    with engine.connect() as conn:
        leases = dict(conn.execute(select(OP.c.claimed_by, OP.c.lease_until).where(OP.c.status == "running")).all())
    assert leases["a"] - utcnow() > timedelta(minutes=9)
    assert leases["b"] - utcnow() < timedelta(seconds=6)


def test_one_planner_per_target_and_another_takes_over_when_it_goes(engine: Engine) -> None:
    first, second = PlannerLock(engine), PlannerLock(engine)
    try:
        assert first.holds("app")
        assert not second.holds("app")
        assert second.holds("other"), "each target has its own planner"
        assert first.holds("app"), "the holder keeps it"
        first.close()  # its session ends, as when the process dies
        # The server lets go of the lock once it has seen the session end: a moment later.
        deadline = time.monotonic() + 10
        while not second.holds("app") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert second.holds("app")
        assert not first.holds("app")
    finally:
        first.close()
        second.close()


def test_status_shows_which_instance_runs_what(engine: Engine, pg_url: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    plan(engine, 3)
    identify("host-a", timedelta(minutes=10))
    claim(engine, "app", limit=2)
    identify("host-b", timedelta(minutes=10))
    claim(engine, "app", limit=1)
    config = tmp_path / "config.yaml"
    (tmp_path / "hr.csv").write_text("employee_id,email\n")
    config.write_text(
        f"""state: {pg_url}
sources:
  hr: {{type: csv, path: hr.csv, key: employee_id}}
targets:
  app: {{base_url: "https://scim.example.com", auth: {{type: bearer, token: t}}, source: hr,
         mapping: {Path(__file__).resolve().parents[2] / "mappings" / "users.yaml"}}}
"""
    )
    assert main(["status", "--json", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["running_by_instance"] == {"host-a": 2, "host-b": 1}
    assert main(["status", "--config", str(config)]) == 0
    assert "running on: host-a 2  host-b 1" in capsys.readouterr().out


def test_sync_refuses_a_target_that_a_running_daemon_plans(
    engine: Engine, pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_csv(tmp_path / "hr.csv", [hr_row("E1", "Ada", "Lovelace")])
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""state: {pg_url}
sources:
  hr: {{type: csv, path: hr.csv, key: employee_id}}
targets:
  app: {{base_url: "https://scim.example.com", auth: {{type: bearer, token: t}}, source: hr, mapping: {DEMO_MAPPING}}}
"""
    )
    daemon = PlannerLock(engine)
    try:
        assert daemon.holds("app")
        assert main(["sync", "--config", str(config)]) == 3
        assert "target 'app' is being planned by a running daemon instance" in capsys.readouterr().err
    finally:
        daemon.close()


def test_a_plan_written_page_by_page_cannot_be_claimed_before_the_brake_has_counted_every_page(engine: Engine) -> None:
    """Another instance claims nothing of the first page while the next is written; the brake then holds both disables."""
    pages = [[Decision("unmatched:u1", Kind.DISABLE, Reason.RECONCILE, {"id": "u1"}, "h1")],
             [Decision("unmatched:u2", Kind.DISABLE, Reason.RECONCILE, {"id": "u2"}, "h2"),
              Decision("E1", Kind.UPDATE, Reason.RECONCILE, {"userName": "a@x"}, "h3")]]  # fmt: skip
    with engine.begin() as conn:
        writer = queue.PlanWriter(conn, "run-1", "app")
        writer.add(pages[0])
        assert claim(engine, "app") == []
        writer.add(pages[1])
        assert writer.finish(lambda leavers: leavers > 1)
    assert [op.identity_key for op in claim(engine, "app")] == ["E1"]
    with engine.connect() as conn:
        statuses = dict(conn.execute(select(OP.c.identity_key, OP.c.status)).all())
    assert statuses == {"unmatched:u1": "held", "unmatched:u2": "held", "E1": "running"}
