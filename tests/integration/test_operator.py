"""An operator's week in two minutes: the daemon against a real SCIM server, the source changing under it.

Alerts go to a real local webhook receiver; what arrives there is what an
operator's chat channel would show.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import hr_row, write_csv
from tests.daemons import start_daemon, stop_daemon, wait_for
from tests.webhook import Receiver
from provisioner.demo import DEMO_MAPPING, ScimServer, free_port, start_scim_server



@pytest.fixture
def server() -> Iterator[ScimServer]:
    with start_scim_server() as srv:
        yield srv


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    yield hook
    hook.server.shutdown()


def people(count: int, **overrides: dict[str, str]) -> list[dict[str, str]]:
    return [
        hr_row(f"E{n:03d}", f"First{n}", f"Last{n}", **{"email": f"person{n}@example.com", **overrides.get(f"E{n:03d}", {})})
        for n in range(count)
    ]  # fmt: skip


write = write_csv


def test_the_daemon_over_changing_sources_with_alerts_metrics_and_a_clean_stop(
    tmp_path: Path, server: ScimServer, receiver: Receiver
) -> None:
    metrics_port = free_port()
    (tmp_path / "config.yaml").write_text(
        f"""state: sqlite:///state.db
sources:
  hr: {{type: csv, path: hr.csv, key: employee_id, schedule: {{every: 2s}}}}
targets:
  app:
    base_url: {server.base_url}
    allow_insecure_http: true
    auth: {{type: bearer, token: "${{APP_TOKEN}}"}}
    source: hr
    mapping: {DEMO_MAPPING}
daemon: {{listen: "127.0.0.1:{metrics_port}", retry_interval: 1}}
alerts:
  rules: {{failed_operations: 0}}
  webhook: {{url: "{receiver.url}", format: slack}}
"""
    )
    source = tmp_path / "hr.csv"
    # E004 has E003's e-mail: one userName for two people, so both are held for review before
    # anything is sent (two failed rows), and neither gets an account.
    write(source, people(20, E004={"email": "person3@example.com"}))
    daemon = start_daemon(tmp_path / "config.yaml", {"APP_TOKEN": server.token})
    http = httpx.Client(base_url=server.base_url + "/", headers={"Authorization": f"Bearer {server.token}"})

    def users() -> dict[str, dict[str, object]]:
        body = http.get("Users", params={"count": 500}).json()
        return {str(u["userName"]): u for u in body.get("Resources", [])}

    def status() -> dict[str, object]:
        out = subprocess.run([sys.executable, "-m", "provisioner", "status", "--json", "--config", "config.yaml"],
                             cwd=tmp_path, capture_output=True)  # fmt: skip
        item: dict[str, object] = json.loads(out.stdout)[0]
        assert out.returncode == (5 if item["held"] else 0 if item["ok"] else 4), out.stderr
        return item

    try:
        wait_for("the first cycle", lambda: len(users()) == 18)
        wait_for("the failed-operation alert", lambda: any("2 failed operations" in t for t in receiver.texts()))

        # A mover and a leaver.
        write(source, [r for r in people(20, E001={"department": "Sales"}, E004={"email": "person3@example.com"})
                       if r["employee_id"] != "E002"])  # fmt: skip
        wait_for("the leaver disabled", lambda: users()["person2@example.com"]["active"] is False)
        enterprise = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
        assert users()["person1@example.com"][enterprise]["department"] == "Sales"

        # The HR export comes out empty: nobody is disabled, and the operator hears of it.
        write(source, [])
        wait_for("the refused-cycle alert", lambda: any("cycle refused" in t for t in receiver.texts()))
        time.sleep(2.5)  # another cycle or two against the empty file
        assert sum(1 for u in users().values() if u["active"]) == 17

        write(source, [r for r in people(20, E001={"department": "Sales"}, E004={"email": "person3@example.com"})
                       if r["employee_id"] != "E002"])  # fmt: skip
        wait_for("the refusal resolved", lambda: any("resolved" in t and "cycles run again" in t
                                                     for t in receiver.texts()))  # fmt: skip

        # The daemon cycles every second: status may catch one running; read it between two.
        current: dict[str, object] = {}

        def between_cycles() -> bool:
            current.update(status())
            return current["last_run_status"] != "running"

        wait_for("status between two cycles", between_cycles)
        assert current["operations"]["failed"] == 2 and current["last_run_status"] in ("failed", "succeeded")
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert 'provisioner_operations_total{kind="create",outcome="succeeded",target="app"} 18.0' in metrics
        # A bad record fails alone: the cycles that ran still count as successful.
        assert 'provisioner_last_successful_cycle_timestamp_seconds{target="app"}' in metrics
        assert 'provisioner_target_ok{target="app"} 0.0' in metrics
        # The failed operations wait for review: the target is not ok, and /healthz says so.
        health = httpx.get(f"http://127.0.0.1:{metrics_port}/healthz")
        assert (health.status_code, health.json()["status"]) == (503, "failed")
        assert health.json()["targets"]["app"]["failed"] == 2
    finally:
        code = stop_daemon(daemon)
        http.close()
        print("\nalerts as they arrived:\n  " + "\n  ".join(receiver.texts()))
    assert code == 0
    assert server.token not in (tmp_path / "daemon.log").read_text()
