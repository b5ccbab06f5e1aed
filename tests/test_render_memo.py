"""A long-running daemon does not render records again that have not changed since their account got them."""

from __future__ import annotations

import csv
from typing import Any

from provisioner.demo import DEMO_MAPPING, DEMO_SOURCE
from provisioner.mapping import AttributeMapping, load_mapping
from provisioner.payload import loads, payload_hash, resolve_refs
from provisioner.planner import Kind, Link, Plan, RenderMemo, plan_target
from provisioner.sources import IdentityRecord


class CountingMapping:
    """The real mapping, counting how often a record is rendered."""

    def __init__(self, mapping: AttributeMapping) -> None:
        self.mapping = mapping
        self.uses_refs = mapping.uses_refs
        self.create_only = mapping.create_only
        self.match = mapping.match
        self.volatile = mapping.volatile
        self.digest = mapping.digest
        self.renders = 0

    def render(self, record: dict[str, Any]) -> Any:
        self.renders += 1
        return self.mapping.render(record)


def records(changes: dict[str, dict[str, str]] | None = None) -> list[IdentityRecord]:
    rows = list(csv.DictReader(DEMO_SOURCE.open()))
    return [
        IdentityRecord(row["employee_id"], {**row, **(changes or {}).get(row["employee_id"], {})}, f"hr.csv:{n}")
        for n, row in enumerate(rows, start=2)
    ]


def applied(plan: Plan, links: dict[str, Link], ids: dict[str, str]) -> dict[str, Link]:
    """The links as the executor leaves them: every decision applied, references resolved to ids."""
    out = dict(links)
    for d in plan.decisions:
        if d.payload is not None:
            sent, _ = resolve_refs(d.payload, ids.get)
            out[d.identity_key] = Link(d.identity_key, ids[d.identity_key], payload_hash(sent), True)
    return out


def test_unchanged_records_are_not_rendered_again_and_a_changed_one_is() -> None:
    mapping = CountingMapping(load_mapping(DEMO_MAPPING))
    memo = RenderMemo()
    ids = {r.key: f"id-{r.key}" for r in records()}
    first = plan_target("app", mapping, records(), {}, memo=memo)  # type: ignore[arg-type]
    links = applied(first, {}, ids)
    # The planner saw the managers unlinked; the executor resolved them at send time.
    # The planner saw the managers unlinked while the executor resolved them at send time: their
    # reports render once more, find what was applied, and are remembered with it.
    assert plan_target("app", mapping, records(), links, memo=memo).decisions == []  # type: ignore[arg-type]
    before = mapping.renders

    assert plan_target("app", mapping, records(), links, memo=memo).decisions == []  # type: ignore[arg-type]
    # Nothing changed: nothing renders, the two terminated records (no account, none wanted) included.
    assert mapping.renders - before == 0

    before = mapping.renders
    third = plan_target("app", mapping, records({"E1010": {"title": "CTO"}}), links, memo=memo)  # type: ignore[arg-type]

    assert [(d.identity_key, d.kind) for d in third.decisions] == [("E1010", Kind.UPDATE)]
    assert mapping.renders - before == 1


def test_a_manager_whose_account_changed_id_makes_the_reports_render_again() -> None:
    mapping = CountingMapping(load_mapping(DEMO_MAPPING))
    memo = RenderMemo()
    ids = {r.key: f"id-{r.key}" for r in records()}
    links = applied(plan_target("app", mapping, records(), {}, memo=memo), {}, ids)  # type: ignore[arg-type]
    plan_target("app", mapping, records(), links, memo=memo)  # type: ignore[arg-type]
    reports_of_e1001 = {r.key for r in records() if r.attributes["manager_id"] == "E1001"}

    links["E1001"] = Link("E1001", "id-recreated", links["E1001"].applied_hash, True)
    plan = plan_target("app", mapping, records(), links, memo=memo)  # type: ignore[arg-type]

    assert {d.identity_key for d in plan.decisions} == reports_of_e1001
    assert all(d.kind is Kind.UPDATE for d in plan.decisions)


def test_a_packed_plan_queues_the_same_operations_in_the_same_order() -> None:
    """``pack`` only changes how payloads are held: the same decisions, in reference order, the same JSON."""
    from provisioner.payload import Packed, dumps

    mapping = load_mapping(DEMO_MAPPING)
    # Reports before their managers in the source: the plan puts managers first.
    source = records()[::-1]
    plain = plan_target("app", mapping, source, {})
    packed = plan_target("app", mapping, source, {}, pack=True)

    assert [(d.identity_key, d.kind, d.payload_hash) for d in packed.decisions] == [
        (d.identity_key, d.kind, d.payload_hash) for d in plain.decisions
    ]
    assert all(isinstance(d.payload, Packed) for d in packed.decisions)
    assert [d.payload.text() for d in packed.decisions] == [dumps(d.payload) for d in plain.decisions]  # type: ignore[union-attr]
    assert [loads(d.payload.text()) for d in packed.decisions] == [d.payload for d in plain.decisions]  # type: ignore[union-attr]
    # Managers first: the ordering saw the references of the packed payloads.
    order = [d.identity_key for d in packed.decisions]
    manager_of = {r.key: r.attributes["manager_id"] for r in records()}
    reports = [key for key in order if manager_of[key] in order]
    assert reports and all(order.index(manager_of[key]) < order.index(key) for key in reports)
