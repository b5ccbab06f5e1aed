"""Delta reads of a SCIM source: a real scim2-server as the HR system, another as the target, end to end."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit, urlunsplit

import pytest

from provisioner import sync
from provisioner.delta import DeltaRead, last_modified
from provisioner.sources import read_source
from tests.conftest import ENTERPRISE, ScimReader, Workspace
from tests.faultproxy import FaultProxy
from tests.integration.test_scim_source import MAPPING, HrSystem, hr, module_hr_server  # noqa: F401 - fixtures

WEEK_AGO = "2026-01-01 00:00:00"


@pytest.fixture
def delta_workspace(workspace: Workspace, hr: HrSystem, monkeypatch: pytest.MonkeyPatch) -> Workspace:  # noqa: F811
    """The workspace's target fed by the HR system's SCIM endpoint, read in deltas."""
    monkeypatch.setenv("HR_SCIM_TOKEN", hr.server.token)
    workspace.mapping_path.write_text(MAPPING, encoding="utf-8")
    text = workspace.config_path.read_text(encoding="utf-8").replace(
        f"    type: csv\n    path: {workspace.source_path.name}\n    key: employee_id\n",
        f"    type: scim\n    base_url: {hr.server.base_url}\n    allow_insecure_http: true\n"
        f"    auth: {{type: bearer, token: \"${{HR_SCIM_TOKEN}}\"}}\n    key: employeeNumber\n    page_size: 2\n"
        "    filter: 'active eq true'\n    delta: true\n    delta_overlap: 0s\n",
    )
    workspace.config_path.write_text(text, encoding="utf-8")
    return workspace


def seed(hr: HrSystem) -> dict[str, dict[str, Any]]:  # noqa: F811
    people = [("ada", "Ada", "Lovelace"), ("alan", "Alan", "Turing"),
              ("grace", "Grace", "Hopper"), ("edsger", "Edsger", "Dijkstra")]  # fmt: skip
    added = (hr.add(user, given, family, f"E{n}", active=True) for n, (user, given, family) in enumerate(people, 1))
    return {f"E{n}": user for n, user in enumerate(added, 1)}


def rename(hr: HrSystem, user: dict[str, Any], family: str) -> None:  # noqa: F811
    body = {k: v for k, v in user.items() if k != "meta"}
    body["name"] = {**user["name"], "familyName": family}
    hr.http.put(f"Users/{user['id']}", json=body).raise_for_status()


def planned(report: Any) -> dict[str, int]:
    return {kind: count for kind, count in report.planned.items() if count and kind != "unchanged"}


def test_a_delta_cycle_sends_only_the_changed_user_and_a_deletion_waits_for_the_full_read(
    delta_workspace: Workspace, hr: HrSystem, scim: ScimReader  # noqa: F811
) -> None:
    users = seed(hr)

    with delta_workspace.config_path.open("a", encoding="utf-8") as config:
        config.write("    max_deprovision: 0\n")
    first = delta_workspace.sync_now()
    [(watermark, full_read_at)] = delta_workspace.query("SELECT watermark, full_read_at FROM source_watermark")
    rename(hr, users["E2"], "Turing-Smith")
    changed = delta_workspace.sync_now()
    hr.http.delete(f"Users/{users['E3']['id']}").raise_for_status()
    after_delete = delta_workspace.sync_now()
    active_after_delete = {u["userName"]: u["active"] for u in scim.all()}
    # A day later: the next cycle reads everyone.
    delta_workspace.query("UPDATE source_watermark SET full_read_at = ?", WEEK_AGO)
    full = delta_workspace.sync_now()

    assert planned(first) == {"create": 4}
    assert watermark == max(u["meta"]["lastModified"] for u in users.values()).replace("+00:00", "Z")
    assert full_read_at is not None
    # Only Alan was read and planned: the three others are neither unchanged nor leavers.
    assert planned(changed) == {"update": 1} and changed.unchanged == 0 and changed.held == 0
    assert {u["userName"]: u["name"]["familyName"] for u in scim.all()}["alan@example.com"] == "Turing-Smith"
    assert planned(after_delete) == {} and after_delete.unchanged == 0
    assert all(active_after_delete.values()) and len(active_after_delete) == 4
    # The full read finds Grace gone: a leaver, held by the deletion brake (max_deprovision: 0).
    assert planned(full) == {"disable": 1} and full.unchanged == 3 and full.held == 1
    assert delta_workspace.query("SELECT identity_key FROM operation WHERE status = 'held'") == [("E3",)]
    assert {u["userName"]: u["active"] for u in scim.all()}["grace@example.com"] is True


def test_a_user_made_inactive_in_hr_is_a_leaver_of_the_delta_that_reads_them(
    delta_workspace: Workspace, hr: HrSystem, scim: ScimReader  # noqa: F811
) -> None:
    users = seed(hr)
    text = delta_workspace.config_path.read_text(encoding="utf-8").replace("    filter: 'active eq true'\n", "")
    delta_workspace.config_path.write_text(text, encoding="utf-8")
    mapping = delta_workspace.mapping_path.read_text(encoding="utf-8")
    delta_workspace.mapping_path.write_text(mapping.replace("scope:", "leaver_when: active == false\nscope:"))
    delta_workspace.sync_now()

    body = {k: v for k, v in users["E4"].items() if k != "meta"} | {"active": False}
    hr.http.put(f"Users/{users['E4']['id']}", json=body).raise_for_status()
    report = delta_workspace.sync_now()

    assert planned(report) == {"disable": 1} and report.unchanged == 0
    assert {u["userName"]: u["active"] for u in scim.all()}["edsger@example.com"] is False


class FilterIgnoringProxy(FaultProxy):
    """An HR system that drops ``filter`` from every request and answers with everyone (no fault injected)."""

    def forward(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes | None) -> Any:
        parts = urlsplit(path)
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "filter"])
        return super().forward(method, urlunsplit(parts._replace(query=query)), headers, body)


def test_an_hr_system_that_ignores_the_filter_is_read_whole_and_still_nobody_is_a_leaver(
    delta_workspace: Workspace, hr: HrSystem, scim: ScimReader  # noqa: F811
) -> None:
    users = seed(hr)
    proxy = FilterIgnoringProxy(hr.server.base_url).start()
    try:
        text = delta_workspace.config_path.read_text(encoding="utf-8")
        delta_workspace.config_path.write_text(text.replace(hr.server.base_url, proxy.base_url), encoding="utf-8")
        first = delta_workspace.sync_now()
        rename(hr, users["E2"], "Turing-Smith")
        hr.http.delete(f"Users/{users['E3']['id']}").raise_for_status()
        changed = delta_workspace.sync_now()
        asked = [unquote_plus(e.path) for e in proxy.events if e.method == "GET" and "/Users" in e.path]
    finally:
        proxy.stop()

    assert planned(first) == {"create": 4}
    # The delta asked for changes since the watermark and got everyone but Grace (deleted): each one is
    # planned against its own account, Grace against none, so nobody is a leaver.
    assert any('(active eq true) and (meta.lastModified gt "' in path for path in asked)
    assert planned(changed) == {"update": 1} and changed.unchanged == 2 and changed.held == 0
    assert {u["userName"]: u["active"] for u in scim.all()} == dict.fromkeys(
        ["ada@example.com", "alan@example.com", "grace@example.com", "edsger@example.com"], True
    )


def test_a_cycle_that_crashes_before_its_plan_is_queued_keeps_the_watermark_and_the_next_reads_the_change(
    delta_workspace: Workspace, hr: HrSystem, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    users = seed(hr)
    delta_workspace.sync_now()
    before = delta_workspace.query("SELECT watermark FROM source_watermark")
    rename(hr, users["E2"], "Turing-Smith")

    def crash(*args: Any) -> None:
        raise RuntimeError("power cut")

    with monkeypatch.context() as patch:
        patch.setattr(sync, "queue_plan", crash)
        with pytest.raises(RuntimeError):
            delta_workspace.sync_now()
    after_crash = delta_workspace.query("SELECT watermark FROM source_watermark")
    report = delta_workspace.sync_now()

    assert after_crash == before
    assert planned(report) == {"update": 1}
    assert delta_workspace.query("SELECT watermark FROM source_watermark") != before


def test_a_source_asking_for_some_attributes_also_asks_for_last_modified(
    hr: HrSystem,  # noqa: F811
) -> None:
    users = seed(hr)
    source = hr.source(attributes=["userName", f"{ENTERPRISE}:employeeNumber"], delta=True)
    read = DeltaRead("app", "hr", source, since=None, previous=None)

    records = list(read.watch(read_source(read.config())))

    assert len(records) == 4
    assert read.seen == max(last_modified(u) for u in users.values())
