"""``provisioner probe`` against servers whose deviations we know: it suggests the quirk of each, and cleans up."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from provisioner import probe as probe_module
from provisioner.cli import main
from provisioner.demo import DEMO_MAPPING
from tests.servers.deviant import DeviantServer, start_deviant_server
from tests.servers.scimmy_server import NodeMissing, start_scimmy_server

TOKEN_VARIABLE = "PROVISIONER_PROBE_TEST_TOKEN"

# What `probe --write --suggest` must print for each deviation (a conformant server: nothing).
SUGGESTED: dict[str, dict[str, Any]] = {
    "none": {},
    "filter_ignored": {"filter": "client"},
    "group_members_not_returned": {"group_members_returned": False},
    "member_removal_ignored": {"member_removal": "list", "verify_writes": True},
    "no_put": {"put": False},
    "patch_501": {"member_removal": "list"},
    "count_rejected": {"page_count": False},
    "members_by_username": {"group_create_with_members": True, "member_value": "userName"},
    "extension_unsupported": {},
    "attribute_dropped": {"verify_writes": True},
    "immutable_username": {},
}
# Deviations no quirk covers: reported as observations.
OBSERVED = {
    "extension_unsupported": {"discovery.resource_types", "attribute.enterprise"},
    "attribute_dropped": {"attribute.title"},
    "immutable_username": {"user.rename"},
}


def write_config(folder: Path, base_url: str) -> Path:
    """A config with one target ``app`` at ``base_url``; the token is read from the environment."""
    (folder / "hr.csv").write_text("employee_id\n", encoding="utf-8")
    path = folder / "config.yaml"
    path.write_text(
        f"""state: sqlite:///state.db
sources:
  hr: {{type: csv, path: hr.csv, key: employee_id}}
targets:
  app:
    base_url: {base_url}
    allow_insecure_http: true
    auth: {{type: bearer, token: "${{{TOKEN_VARIABLE}}}"}}
    source: hr
    mapping: {DEMO_MAPPING}
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def deviant(request: pytest.FixtureRequest) -> Iterator[DeviantServer]:
    name, options = request.param if isinstance(request.param, tuple) else (request.param, {})
    server = start_deviant_server(() if name == "none" else {name}, **options)
    try:
        yield server
    finally:
        server.stop()


def run_probe(tmp_path: Path, server: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
              *options: str) -> tuple[int, str, str]:  # fmt: skip
    monkeypatch.setenv(TOKEN_VARIABLE, server.token)
    config = write_config(tmp_path, server.base_url)
    code = main(["probe", "--config", str(config), "--target", "app", *options])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("deviant", sorted(SUGGESTED), indirect=True)
def test_probe_write_suggests_the_quirk_of_each_deviation_and_cleans_up(
    deviant: DeviantServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    name = next(iter(deviant.deviations), "none")
    code, out, err = run_probe(tmp_path, deviant, monkeypatch, capsys, "--write", "--suggest")
    assert code == 0, err
    assert yaml.safe_load(out) == {"quirks": SUGGESTED[name]}
    assert out.startswith("quirks:")
    assert deviant.dump() == {"Users": [], "Groups": []}
    assert deviant.token not in out + err


@pytest.mark.parametrize("deviant", sorted(OBSERVED), indirect=True)
def test_probe_reports_what_no_quirk_covers(
    deviant: DeviantServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    name = next(iter(deviant.deviations))
    code, out, err = run_probe(tmp_path, deviant, monkeypatch, capsys, "--write", "--json")
    assert code == 0, err
    report = json.loads(out)
    deviating = {o["behaviour"] for o in report["observations"] if o["outcome"] == "DEVIATES"}
    assert deviating == OBSERVED[name]


def test_probe_suggests_nothing_for_scimmy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        server = start_scimmy_server()
    except NodeMissing as error:
        pytest.fail(str(error))
    try:
        code, out, err = run_probe(tmp_path, server, monkeypatch, capsys, "--write", "--suggest")
        assert code == 0, err
        assert yaml.safe_load(out) == {"quirks": {}}
        assert server.dump() == {"Users": [], "Groups": []}
    finally:
        server.stop()


@pytest.mark.parametrize("deviant", [("immutable_username", {"rename_status": 500})], indirect=True)
def test_probe_names_a_rename_refused_with_500(
    deviant: DeviantServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_probe(tmp_path, deviant, monkeypatch, capsys, "--write")
    assert code == 0
    assert "DEVIATES  user.rename: a userName rename answered 500 scimType=mutability" in out


@pytest.mark.parametrize("deviant", ["none"], indirect=True)
def test_probe_prints_one_line_per_behaviour(
    deviant: DeviantServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_probe(tmp_path, deviant, monkeypatch, capsys, "--write")
    assert code == 0
    lines = out.splitlines()
    behaviours = [line.split()[1].rstrip(":") for line in lines if line.startswith(("ok ", "DEVIATES ", "unknown "))]
    assert len(behaviours) == len(set(behaviours)) > 15
    assert [line for line in lines if line.startswith(("DEVIATES", "unknown"))] == []
    assert lines[-1] == "suggested: no quirks (the defaults fit)"


@pytest.mark.parametrize("deviant", ["filter_ignored"], indirect=True)
def test_probe_without_write_only_reads_and_still_sees_an_ignored_filter(
    deviant: DeviantServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {deviant.token}"}
    for name in ("ann", "bob"):
        body = {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": name}
        assert httpx.post(deviant.base_url + "/Users", json=body, headers=headers).status_code == 201
    before = deviant.dump()
    deviant.reset_requests()
    code, out, _ = run_probe(tmp_path, deviant, monkeypatch, capsys, "--suggest")
    assert code == 0
    assert yaml.safe_load(out) == {"quirks": {"filter": "client"}}
    assert {method for method, _, _ in deviant.requests} == {"GET"}
    assert deviant.dump() == before


@pytest.mark.parametrize("deviant", ["none"], indirect=True)
def test_probe_without_write_on_an_empty_target_says_what_it_cannot_tell(
    deviant: DeviantServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_probe(tmp_path, deviant, monkeypatch, capsys)
    assert code == 0
    assert "unknown   filter.users_match: no account to look up (run with --write)" in out
    assert {method for method, _, _ in deviant.requests} == {"GET"}


@pytest.mark.parametrize("deviant", ["none"], indirect=True)
@pytest.mark.parametrize("interruption", [RuntimeError("boom"), asyncio.CancelledError()])
def test_probe_deletes_what_it_made_when_interrupted(
    deviant: DeviantServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    interruption: BaseException,
) -> None:
    """An error or a cancellation (Ctrl-C) in the middle of the writes still deletes every test resource."""

    async def interrupted(self: probe_module.Probe, user_id: str, name: str) -> None:
        assert deviant.dump()["Users"], "the probe had made its test users"
        raise interruption

    monkeypatch.setattr(probe_module.Probe, "rename", interrupted)
    monkeypatch.setenv(TOKEN_VARIABLE, deviant.token)
    config = write_config(tmp_path, deviant.base_url)
    with pytest.raises(type(interruption)):
        asyncio.run(probe_module.run_probe(config, "app", write=True))
    assert deviant.dump() == {"Users": [], "Groups": []}


def test_probe_of_an_unknown_target_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(TOKEN_VARIABLE, "x")
    config = write_config(tmp_path, "http://127.0.0.1:9/v2")
    assert main(["probe", "--config", str(config), "--target", "nope"]) == 3
    assert "no target 'nope' (targets: app)" in capsys.readouterr().err


def test_probe_of_a_target_that_does_not_answer_exits_4(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from provisioner.demo import free_port

    monkeypatch.setenv(TOKEN_VARIABLE, "x")
    config = write_config(tmp_path, f"http://127.0.0.1:{free_port()}/v2")
    assert main(["probe", "--config", str(config), "--target", "app"]) == 4
    err = capsys.readouterr().err
    assert err.startswith("error: cannot probe app:") and "Traceback" not in err
