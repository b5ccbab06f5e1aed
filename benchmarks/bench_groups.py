"""Benchmark: HTTP calls for groups — 200 users in 200 groups from an empty target, then one department change.

Prints call counts (and wall time, for scale); asserts nothing. Run from the repository root:

    .venv/bin/python benchmarks/bench_groups.py
    .venv/bin/python benchmarks/bench_groups.py --users 200 --groups 200 --batch 100

Every user is a member of every group: ``groups - 5`` groups come from a
``teams`` column that lists them all, and 5 are ``dept-{{ department }}``
groups (so one department change moves one member between two of them).
Requests, retries included, are counted by wrapping ``httpx.AsyncClient.send``
in this process. The SCIM server is scim2-server on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402 - after the path is set

from provisioner.config import load_config  # noqa: E402
from provisioner.demo import DEMO_MAPPING, start_scim_server  # noqa: E402
from provisioner.mapping import load_mapping  # noqa: E402
from provisioner.store import open_store  # noqa: E402
from provisioner.sync import sync_target  # noqa: E402

COLUMNS = ("employee_id", "first_name", "last_name", "email", "phone", "title", "department",
           "cost_center", "division", "manager_id", "status", "teams")  # fmt: skip
DEPARTMENTS = ("Engineering", "Sales", "Finance", "People", "Support")
CALLS: Counter[str] = Counter()


def count_requests() -> None:
    original = httpx.AsyncClient.send

    async def send(client: httpx.AsyncClient, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        resource = request.url.path.split("/v2/", 1)[-1].split("/", 1)[0]
        CALLS[f"{request.method} {resource}"] += 1
        return await original(client, request, **kwargs)

    httpx.AsyncClient.send = send  # type: ignore[method-assign]


def write_source(path: Path, users: int, teams: list[str], moved: int | None = None) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for i in range(users):
            department = DEPARTMENTS[i % len(DEPARTMENTS)]
            if i == moved:
                department = DEPARTMENTS[(i + 1) % len(DEPARTMENTS)]
            writer.writerow([f"E{i:05d}", "Bench", f"User{i}", f"user{i}@example.com", "", "Engineer", department,
                             "", "", "", "active", ";".join(teams)])  # fmt: skip


def cycle(folder: Path, label: str) -> None:
    CALLS.clear()
    config = load_config(folder / "config.yaml")
    engine = open_store(config.state)
    started = time.perf_counter()
    report = asyncio.run(sync_target(engine, config, "bench", load_mapping(config.targets["bench"].mapping)))
    elapsed = time.perf_counter() - started
    total = sum(CALLS.values())
    detail = ", ".join(f"{k} {v}" for k, v in sorted(CALLS.items()))
    print(f"{label}: {total} HTTP calls in {elapsed:.1f} s (failed {report.failed})")
    print(f"    {detail or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--groups", type=int, default=200)
    parser.add_argument("--batch", type=int, default=100, help="max_members_per_patch")
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    teams = [f"team-{n:03d}" for n in range(args.groups - len(DEPARTMENTS))]
    count_requests()
    with start_scim_server() as server, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["BENCH_GROUPS_TOKEN"] = server.token
        (folder / "groups.yaml").write_text(
            'groups:\n  - name: "dept-{{ department | lower }}"\n  - from_column: teams\n'
        )
        (folder / "config.yaml").write_text(
            f"""state: sqlite:///state.db
sources:
  hr: {{type: csv, path: hr.csv, key: employee_id}}
targets:
  bench:
    base_url: {server.base_url}
    allow_insecure_http: true
    auth: {{type: bearer, token: "${{BENCH_GROUPS_TOKEN}}"}}
    source: hr
    mapping: {DEMO_MAPPING}
    groups: groups.yaml
    max_concurrency: {args.concurrency}
    max_members_per_patch: {args.batch}
    max_deprovision: null
    max_deprovision_share: null
"""
        )
        memberships = args.users * (len(teams) + 1)
        print(f"{args.users} users, {args.groups} groups ({len(teams)} team groups with every user, "
              f"{len(DEPARTMENTS)} department groups): {memberships} memberships, batch {args.batch}")  # fmt: skip
        write_source(folder / "hr.csv", args.users, teams)
        cycle(folder, "initial cycle from an empty target")
        cycle(folder, "next cycle, no change")
        write_source(folder / "hr.csv", args.users, teams, moved=0)
        cycle(folder, "one department change")


if __name__ == "__main__":
    main()
