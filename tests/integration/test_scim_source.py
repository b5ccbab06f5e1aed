"""SCIM sources: users pulled from an HR system's SCIM endpoint (a real scim2-server), paged and flattened."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from provisioner.checker import check_target
from provisioner.config import ScimSourceConfig, load_config
from provisioner.demo import ScimServer, free_port, start_scim_server
from provisioner.errors import SourceError
from provisioner.sources import BadRecord, IdentityRecord, read_source, source_columns
from tests.conftest import ENTERPRISE, TOKEN_VARIABLE, ScimReader, Workspace, empty_server
from tests.integration.test_cli import provisioner

CORE = "urn:ietf:params:scim:schemas:core:2.0:User"


@pytest.fixture(scope="module")
def module_hr_server() -> Iterator[ScimServer]:
    """The HR system: a scim2-server of its own, apart from the target the workspace provisions."""
    with start_scim_server() as server:
        yield server


@pytest.fixture
def hr(module_hr_server: ScimServer) -> Iterator[HrSystem]:
    empty_server(module_hr_server)
    system = HrSystem(module_hr_server)
    yield system
    system.http.close()


class HrSystem:
    """Seeds the HR system's users over plain HTTP."""

    def __init__(self, server: ScimServer) -> None:
        self.server = server
        self.http = httpx.Client(
            base_url=server.base_url + "/",
            headers={"Authorization": f"Bearer {server.token}", "Content-Type": "application/scim+json"},
            timeout=10,
        )

    def add(self, user_name: str, given: str, family: str, number: str, **extra: Any) -> dict[str, Any]:
        body = {
            "schemas": [CORE, ENTERPRISE],
            "userName": user_name,
            "externalId": number,
            "name": {"givenName": given, "familyName": family},
            "emails": [{"value": f"{user_name}@home.example", "type": "home"},
                       {"value": f"{user_name}@example.com", "type": "work", "primary": True}],
            ENTERPRISE: {"employeeNumber": number, "department": "Engineering"},
            **extra,
        }  # fmt: skip
        response = self.http.post("Users", json=body)
        response.raise_for_status()
        return dict(response.json())

    def source(self, **options: Any) -> ScimSourceConfig:
        return ScimSourceConfig.model_validate({
            "type": "scim", "base_url": self.server.base_url, "allow_insecure_http": True,
            "auth": {"type": "bearer", "token": self.server.token}, "key": "employeeNumber", **options,
        })  # fmt: skip


def test_users_become_records_addressed_by_scim_paths_short_extension_names_and_types(hr: HrSystem) -> None:
    ada = hr.add("ada", "Ada", "Lovelace", "E1", phoneNumbers=[{"value": "+44 1", "type": "mobile"}])
    source = hr.source()

    [record] = list(read_source(source))

    assert isinstance(record, IdentityRecord)
    assert (record.key, record.origin) == ("E1", f"{hr.server.base_url}/Users/{ada['id']}")
    columns = record.attributes
    assert columns["userName"] == "ada"
    assert columns["name"] == {"givenName": "Ada", "familyName": "Lovelace"}
    assert columns["employeeNumber"] == "E1" and columns["department"] == "Engineering"
    assert columns[ENTERPRISE] == {"employeeNumber": "E1", "department": "Engineering"}
    assert (columns["emails_primary"], columns["emails_work"], columns["emails_home"]) == (
        "ada@example.com", "ada@example.com", "ada@home.example",
    )  # fmt: skip
    assert columns["phoneNumbers_mobile"] == columns["phoneNumbers_primary"] == "+44 1"
    assert columns["meta"]["lastModified"] == ada["meta"]["lastModified"]


def test_every_page_is_read_and_a_filter_and_attributes_are_sent(hr: HrSystem) -> None:
    for number in range(1, 8):
        hr.add(f"user{number}", "U", str(number), f"E{number}")

    every = list(read_source(hr.source(page_size=2)))
    some = list(read_source(hr.source(page_size=2, filter='userName sw "user1" or userName eq "user5"',
                                      attributes=["userName", f"{ENTERPRISE}:employeeNumber"])))  # fmt: skip

    assert sorted(r.key for r in every) == [f"E{n}" for n in range(1, 8)]
    assert sorted(r.key for r in some) == ["E1", "E5"]
    assert all(isinstance(r, IdentityRecord) and "name" not in r.attributes for r in some)


def test_a_delta_filter_on_last_modified_reads_only_what_changed(hr: HrSystem) -> None:
    first = hr.add("ada", "Ada", "Lovelace", "E1")
    hr.add("alan", "Alan", "Turing", "E2")
    since = first["meta"]["lastModified"]

    changed = list(read_source(hr.source(filter=f'meta.lastModified gt "{since}"')))

    assert [r.key for r in changed] == ["E2"]


def test_two_users_with_one_key_are_both_rejected_naming_their_urls(hr: HrSystem) -> None:
    ada = hr.add("ada", "Ada", "Lovelace", "E1")
    twin = hr.add("augusta", "Augusta", "King", "E1")
    hr.add("alan", "Alan", "Turing", "E2")

    records = list(read_source(hr.source()))

    bad = sorted((r.key, r.origin) for r in records if isinstance(r, BadRecord))
    assert bad == sorted([("E1", f"{hr.server.base_url}/Users/{ada['id']}"),
                          ("E1", f"{hr.server.base_url}/Users/{twin['id']}")])  # fmt: skip
    assert [r.key for r in records if isinstance(r, IdentityRecord)] == ["E2"]


def test_a_user_without_the_key_is_a_bad_record_alone(hr: HrSystem) -> None:
    hr.add("ada", "Ada", "Lovelace", "E1")
    hr.add("nobody", "No", "Body", "E9", **{ENTERPRISE: {"department": "Engineering"}})

    records = list(read_source(hr.source()))

    assert sorted((type(r).__name__, r.key) for r in records) == [("BadRecord", ""), ("IdentityRecord", "E1")]


def test_the_source_is_read_from_inside_a_running_event_loop(hr: HrSystem) -> None:
    """The daemon plans inside its event loop: the source's own loop runs in a thread of its own."""
    hr.add("ada", "Ada", "Lovelace", "E1")

    async def plan() -> list[str]:
        return [record.key for record in read_source(hr.source())]

    assert asyncio.run(plan()) == ["E1"]


def test_a_refused_token_is_a_one_line_source_error_without_the_token(hr: HrSystem) -> None:
    source = hr.source(auth={"type": "bearer", "token": "wrong-token-value-123"}, retry={"max_attempts": 1})

    with pytest.raises(SourceError) as raised:
        list(read_source(source))

    assert str(raised.value).startswith(f"{hr.server.base_url}/Users: ")
    assert "401" in str(raised.value)
    assert "wrong-token-value-123" not in str(raised.value)
    assert "\n" not in str(raised.value)


def test_columns_come_from_the_servers_schemas(hr: HrSystem) -> None:
    columns = source_columns(hr.source())

    assert columns is not None
    assert {"userName", "name", "emails", "emails_work", "emails_primary", "phoneNumbers_mobile", "externalId",
            "employeeNumber", "manager", "department", ENTERPRISE} <= columns  # fmt: skip
    assert "emial" not in columns


MAPPING = """resource: User
match: userName
scope: "department != 'Contractors'"
attributes:
  userName: emails_work
  externalId: employeeNumber
  name:
    givenName: name.givenName
    familyName: name.familyName
  displayName: "{{ name.givenName }} {{ name.familyName }}"
  emails:
    - value: emails_work
      type: "'work'"
      primary: true
  urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:
    employeeNumber: employeeNumber
    department: department
"""


def scim_source_workspace(workspace: Workspace, hr: HrSystem) -> None:
    """The workspace's target fed by the HR system's SCIM endpoint instead of its CSV file."""
    workspace.mapping_path.write_text(MAPPING, encoding="utf-8")
    text = workspace.config_path.read_text(encoding="utf-8")
    text = text.replace(
        f"    type: csv\n    path: {workspace.source_path.name}\n    key: employee_id\n",
        f"    type: scim\n    base_url: {hr.server.base_url}\n    allow_insecure_http: true\n"
        f"    auth: {{type: bearer, token: \"${{HR_SCIM_TOKEN}}\"}}\n    key: employeeNumber\n    page_size: 2\n",
    )
    workspace.config_path.write_text(text, encoding="utf-8")


def run(workspace: Workspace, hr: HrSystem, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI, with the HR system's token in the environment the config reads it from."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HR_SCIM_TOKEN", hr.server.token)
        return provisioner(workspace, *args)


def test_check_and_sync_provision_the_hr_systems_users_into_the_target(
    workspace: Workspace, scim: ScimReader, hr: HrSystem
) -> None:
    for number, (user, given, family) in enumerate([("ada", "Ada", "Lovelace"), ("alan", "Alan", "Turing"),
                                                    ("grace", "Grace", "Hopper")], start=1):  # fmt: skip
        hr.add(user, given, family, f"E{number}")
    scim_source_workspace(workspace, hr)

    checked = run(workspace, hr, "check")
    synced = run(workspace, hr, "sync")

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert synced.returncode == 0, synced.stdout + synced.stderr
    users = {user["userName"]: user for user in scim.all()}
    assert sorted(users) == ["ada@example.com", "alan@example.com", "grace@example.com"]
    assert users["ada@example.com"]["name"]["givenName"] == "Ada"
    assert users["ada@example.com"][ENTERPRISE]["employeeNumber"] == "E1"
    assert hr.server.token not in synced.stdout + synced.stderr


def test_check_names_a_column_the_hr_systems_schema_does_not_have(workspace: Workspace, hr: HrSystem) -> None:
    scim_source_workspace(workspace, hr)
    text = workspace.mapping_path.read_text(encoding="utf-8")
    workspace.mapping_path.write_text(text.replace("  externalId: employeeNumber", "  externalId: employeNumber"))

    checked = run(workspace, hr, "check")

    assert checked.returncode != 0
    assert "'employeNumber' (did you mean 'employeeNumber'?)" in checked.stdout + checked.stderr
    assert "Traceback" not in checked.stderr


def test_check_of_an_hr_system_that_does_not_answer_is_one_diagnostic_naming_it(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    workspace.mapping_path.write_text(MAPPING, encoding="utf-8")
    text = workspace.config_path.read_text(encoding="utf-8").replace(
        f"    type: csv\n    path: {workspace.source_path.name}\n    key: employee_id\n",
        f"    type: scim\n    base_url: http://127.0.0.1:{free_port()}/v2\n    allow_insecure_http: true\n"
        "    auth: {type: bearer, token: hr-token-never-shown}\n    key: employeeNumber\n"
        "    retry: {max_attempts: 1}\n",
    )
    workspace.config_path.write_text(text, encoding="utf-8")
    monkeypatch.setenv(TOKEN_VARIABLE, workspace.server.token)
    config = load_config(workspace.config_path)

    [diagnostic] = check_target(config, "app")

    assert str(diagnostic).startswith(f"{config.sources['hr'].describe()}: ")
    assert "hr-token-never-shown" not in str(diagnostic)
    assert "\n" not in str(diagnostic)
