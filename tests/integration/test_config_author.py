"""What a config author runs before anything is sent: preview and plan, against a target never contacted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from provisioner.demo import DEMO_GROUPS, DEMO_MAPPING, DEMO_SOURCE

# Nothing listens there: previews and plans must not need the target.
UNREACHABLE = "https://127.0.0.1:9/v2"


def workspace(tmp_path: Path) -> Path:
    shutil.copy(DEMO_SOURCE, tmp_path / "hr.csv")
    shutil.copy(DEMO_MAPPING, tmp_path / "users.yaml")
    (tmp_path / "config.yaml").write_text(
        f"""state: sqlite:///state.db
sources:
  hr: {{type: csv, path: hr.csv, key: employee_id}}
targets:
  app:
    base_url: {UNREACHABLE}
    auth: {{type: bearer, token: "${{NEVER_SET_TOKEN}}"}}
    source: hr
    mapping: users.yaml
    groups: {DEMO_GROUPS}
"""
    )
    return tmp_path


def provisioner(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NEVER_SET_TOKEN"}
    return subprocess.run([sys.executable, "-m", "provisioner", *args, "--config", "config.yaml"],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip


def test_preview_shows_the_payload_a_record_becomes_with_references_not_yet_resolvable(tmp_path: Path) -> None:
    folder = workspace(tmp_path)

    done = provisioner(folder, "preview", "E1007")

    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    enterprise = result["payload"]["urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"]
    assert result["payload"]["userName"] == "frances.allen@example.com"
    assert enterprise["department"] == "Sales" and enterprise["manager"]["value"].startswith("ref(E1002)")
    assert result["origin"].endswith("hr.csv:8")


def test_preview_of_a_record_the_mapping_cannot_render_names_file_line_and_attribute(tmp_path: Path) -> None:
    folder = workspace(tmp_path)
    mapping = folder / "users.yaml"
    mapping.write_text(mapping.read_text().replace("  title: title", "  title: title.upper(1, 2)"))

    done = provisioner(folder, "preview", "E1001")

    assert done.returncode == 3
    assert "users.yaml:" in done.stdout and "attribute 'title'" in done.stdout
    assert "Traceback" not in done.stderr


def test_preview_of_a_key_two_records_share_says_so_at_each_line(tmp_path: Path) -> None:
    folder = workspace(tmp_path)
    source = folder / "hr.csv"
    lines = source.read_text().splitlines(keepends=True)
    source.write_text("".join(lines) + lines[1].replace("Ada", "Augusta"))

    done = provisioner(folder, "preview", "E1001")

    assert done.returncode == 3, done.stderr
    result = json.loads(done.stdout)
    assert result["origin"].endswith("hr.csv:2")
    last = len(lines) + 1
    assert result["error"] == f"employee_id 'E1001' appears 2 times (also at line {last}); none of them is used"


def test_plan_lists_group_operations_without_contacting_the_target(tmp_path: Path) -> None:
    folder = workspace(tmp_path)
    env_token = {"NEVER_SET_TOKEN": "x"}
    done = subprocess.run([sys.executable, "-m", "provisioner", "plan", "--json", "--config", "config.yaml"],
                          cwd=folder, env={**os.environ, **env_token}, capture_output=True, text=True,
                          timeout=60)  # fmt: skip

    assert done.returncode == 0, done.stderr
    [plan] = json.loads(done.stdout)
    assert plan["counts"]["create"] == 48
    # The cycle plans groups after sending its users: the 48 joiners are members by then, and
    # the plan says so.
    groups = [(op["group"], op["kind"], op["add"]) for op in plan["groups"]["operations"]]
    assert groups[0] == ("all-staff", "group_create", 48)
    assert sum(add for group, _, add in groups if group.startswith("dept-")) == 48
