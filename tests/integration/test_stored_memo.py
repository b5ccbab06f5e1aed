"""Any cycle — a one-shot ``sync`` or ``plan`` too — skips records unchanged since their account got what they render to.

The memo lives in the state database (``rendered_record``). Each test runs real
cycles against scim2-server, then changes one thing and checks two facts: which
records were rendered again, and that the plan is exactly the plan made by
rendering every record (the memo may only save work, never change a decision).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine

from provisioner.config import load_config
from provisioner.mapping import AttributeMapping
from provisioner.memo import load_memo
from provisioner.planner import Kind, Plan, RenderMemo
from provisioner.quarantine import set_paused
from provisioner.store import open_store
from provisioner.sync import load_target_mapping, plan_once
from tests.conftest import ENTERPRISE, ScimReader, Workspace, hr_row

BOSS = hr_row("E1", "Grace", "Hopper", title="CTO")
ANA = hr_row("E2", "Ana", "Lopez", manager_id="E1")
BOB = hr_row("E3", "Bob", "Stone", manager_id="E1")
# Terminated and never provisioned: renders to no account, and has none.
GONE = hr_row("E4", "Old", "Timer", status="terminated")
PEOPLE = [BOSS, ANA, BOB, GONE]


class Renders:
    """The keys of the records rendered, in order (every AttributeMapping.render call, by employee_id)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.keys: list[str] = []
        original = AttributeMapping.render

        def render(mapping: AttributeMapping, record: Any) -> Any:
            self.keys.append(record.get("employee_id"))
            return original(mapping, record)

        monkeypatch.setattr(AttributeMapping, "render", render)

    def taken(self) -> list[str]:
        keys, self.keys = sorted(self.keys), []
        return keys


@pytest.fixture
def renders(monkeypatch: pytest.MonkeyPatch) -> Renders:
    return Renders(monkeypatch)


@pytest.fixture
def loaded(workspace: Workspace, renders: Renders) -> Workspace:
    """Every person provisioned by one sync; the renders of that sync forgotten."""
    workspace.write_source(PEOPLE)
    report = workspace.sync_now()
    assert report.done["create"] == 3
    renders.taken()
    return workspace


@pytest.fixture
def engine(loaded: Workspace) -> Iterator[Engine]:
    engine = open_store(load_config(loaded.config_path).state)
    yield engine
    engine.dispose()


def plan(workspace: Workspace, engine: Engine, memo: RenderMemo | None = None) -> Plan:
    """A plan as ``provisioner plan`` makes it (the stored memo when ``memo`` is None)."""
    config = load_config(workspace.config_path)
    return plan_once(engine, config, "app", load_target_mapping(config, "app"), memo)[0]


def decisions(p: Plan) -> set[tuple[str, Kind, str | None]]:
    return {(d.identity_key, d.kind, d.payload_hash) for d in p.decisions}


def same_as_rendering_everything(workspace: Workspace, engine: Engine, renders: Renders) -> Plan:
    """The stored memo's plan, checked against a plan that renders every record."""
    remembered = plan(workspace, engine)
    rendered = renders.taken()
    fresh = plan(workspace, engine, RenderMemo())
    assert decisions(remembered) == decisions(fresh)
    assert (remembered.unchanged, sorted(remembered.settled)) == (fresh.unchanged, sorted(fresh.settled))
    renders.keys = rendered
    return remembered


def test_a_second_sync_renders_nothing_when_nothing_changed(loaded: Workspace, renders: Renders) -> None:
    # The reports were planned before their manager had an account: completed after the send.
    report = loaded.sync_now()

    assert renders.taken() == []
    assert report.summary()["unchanged"] == 4
    assert loaded.count("rendered_record") == 4


def test_plan_renders_nothing_either_and_writes_nothing(loaded: Workspace, engine: Engine, renders: Renders) -> None:
    before = loaded.query("SELECT * FROM rendered_record ORDER BY identity_key")

    p = same_as_rendering_everything(loaded, engine, renders)

    assert renders.taken() == []
    assert p.decisions == [] and p.unchanged == 4
    assert loaded.query("SELECT * FROM rendered_record ORDER BY identity_key") == before


def test_a_changed_record_is_rendered_and_updated(loaded: Workspace, renders: Renders, scim: ScimReader) -> None:
    loaded.write_source([BOSS, {**ANA, "title": "Architect"}, BOB, GONE])

    report = loaded.sync_now()

    assert renders.taken() == ["E2"]
    assert report.done["update"] == 1
    assert scim.user("ana.lopez@example.com")["title"] == "Architect"
    loaded.sync_now()
    assert renders.taken() == []


def test_a_changed_mapping_renders_every_record_again(loaded: Workspace, renders: Renders, scim: ScimReader) -> None:
    mapping = loaded.mapping_path.read_text(encoding="utf-8")
    loaded.mapping_path.write_text(mapping.replace("  title: title\n", "  title: title | upper\n"), encoding="utf-8")

    report = loaded.sync_now()

    assert renders.taken() == ["E1", "E2", "E3", "E4"]
    # "CTO" is upper case already: only the two engineers change.
    assert report.done["update"] == 2
    assert scim.user("ana.lopez@example.com")["title"] == "ENGINEER"


def test_a_comment_in_the_mapping_changes_nothing(loaded: Workspace, renders: Renders) -> None:
    mapping = loaded.mapping_path.read_text(encoding="utf-8")
    loaded.mapping_path.write_text("# reviewed\n" + mapping, encoding="utf-8")

    loaded.sync_now()

    assert renders.taken() == []


def test_a_changed_lookup_table_renders_every_record_again(workspace: Workspace, renders: Renders,
                                                           scim: ScimReader) -> None:  # fmt: skip
    mapping = workspace.mapping_path.read_text(encoding="utf-8")
    with_table = "tables:\n  titles: {Engineer: Developer}\n" + mapping.replace(
        "  title: title\n", "  title: lookup(title, 'titles', title)\n"
    )
    workspace.mapping_path.write_text(with_table, encoding="utf-8")
    workspace.write_source(PEOPLE)
    workspace.sync_now()
    assert scim.user("ana.lopez@example.com")["title"] == "Developer"
    renders.taken()

    workspace.mapping_path.write_text(with_table.replace("Developer", "Software Engineer"), encoding="utf-8")
    workspace.sync_now()

    assert len(renders.taken()) == 4
    assert scim.user("ana.lopez@example.com")["title"] == "Software Engineer"


def test_a_manager_whose_account_changed_id_makes_the_reports_render(loaded: Workspace, engine: Engine,
                                                                     renders: Renders) -> None:  # fmt: skip
    # As a reconciliation that relinked the manager to another account leaves it.
    loaded.query("UPDATE account_link SET scim_id = 'relinked' WHERE identity_key = 'E1'")

    p = same_as_rendering_everything(loaded, engine, renders)

    assert renders.taken() == ["E2", "E3"]
    assert {(d.identity_key, d.kind) for d in p.decisions} == {("E2", Kind.UPDATE), ("E3", Kind.UPDATE)}
    assert all(d.payload and d.payload[ENTERPRISE]["manager"]["value"] == "relinked" for d in p.decisions)


def test_an_account_unlinked_disabled_or_changed_is_rendered_again(loaded: Workspace, engine: Engine,
                                                                    renders: Renders) -> None:  # fmt: skip
    loaded.query("DELETE FROM account_link WHERE identity_key = 'E1'")  # deleted, or an unlink
    loaded.query("UPDATE account_link SET active = 0 WHERE identity_key = 'E2'")  # disabled by hand, reconciled
    loaded.query("UPDATE account_link SET applied_hash = 'drift' WHERE identity_key = 'E3'")  # repaired

    p = same_as_rendering_everything(loaded, engine, renders)

    assert renders.taken() == ["E1", "E2", "E3"]
    assert {(d.identity_key, d.kind) for d in p.decisions} == {
        ("E1", Kind.CREATE), ("E2", Kind.ENABLE), ("E3", Kind.UPDATE),
    }  # fmt: skip


def test_a_change_not_sent_yet_is_planned_again_until_it_is(loaded: Workspace, engine: Engine,
                                                             renders: Renders) -> None:  # fmt: skip
    """Remembered when planned is not applied: the record renders each cycle until the account holds it."""
    set_paused(engine, "app", True)
    loaded.write_source([BOSS, {**ANA, "title": "Architect"}, BOB, GONE])
    loaded.sync_now()
    assert renders.taken() == ["E2"]
    pending = loaded.query("SELECT id FROM operation WHERE identity_key = 'E2' AND status = 'pending'")
    assert len(pending) == 1

    loaded.sync_now()

    assert renders.taken() == ["E2"]
    # The open update stays as it was: neither superseded as settled, nor queued twice.
    assert loaded.query("SELECT id FROM operation WHERE identity_key = 'E2' AND status = 'pending'") == pending
    p = same_as_rendering_everything(loaded, engine, renders)
    assert [(d.identity_key, d.kind) for d in p.decisions] == [("E2", Kind.UPDATE)]


def test_a_mapping_that_reads_the_clock_is_rendered_every_cycle(workspace: Workspace, renders: Renders) -> None:
    mapping = workspace.mapping_path.read_text(encoding="utf-8")
    workspace.mapping_path.write_text(mapping.replace("  title: title\n", "  title: \"title ~ ' ' ~ now()[:4]\"\n"),
                                      encoding="utf-8")  # fmt: skip
    workspace.write_source(PEOPLE)
    workspace.sync_now()
    renders.taken()

    workspace.sync_now()

    assert renders.taken() == ["E1", "E2", "E3", "E4"]
    assert workspace.count("rendered_record") == 0


def test_an_identity_gone_from_the_source_is_forgotten(loaded: Workspace, engine: Engine, renders: Renders) -> None:
    loaded.write_source([BOSS, ANA, GONE])

    report = loaded.sync_now()

    assert renders.taken() == []
    assert report.done["disable"] == 1
    assert set(load_memo(engine, "app").entries) == {"E1", "E2", "E4"}
    # Back in the source: rendered, and enabled again.
    loaded.write_source(PEOPLE)
    assert loaded.sync_now().done["enable"] == 1
    assert renders.taken() == ["E3"]
