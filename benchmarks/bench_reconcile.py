"""Benchmark: reconciling 10k and 100k accounts — wall time, peak RSS and requests.

Prints figures; asserts nothing. Run from the repository root:

    .venv/bin/python benchmarks/bench_reconcile.py                       # 10,000 and 100,000 accounts
    .venv/bin/python benchmarks/bench_reconcile.py --accounts 10000 --page-size 500
    .venv/bin/python benchmarks/bench_reconcile.py --mode json                 # `provisioner reconcile --json`
    .venv/bin/python benchmarks/bench_reconcile.py --mode repair --drifted 100000  # --repair, every account drifted
    .venv/bin/python benchmarks/bench_reconcile.py --group-size 100            # and groups of 100 members each

For N accounts: an HR file of N people (every tenth the manager of the next
nine), a state database where every one is linked, and the in-memory SCIM
target of ``bench_throughput.py`` in another process, started holding exactly
what the shipped mapping renders for them (so every account is ``linked``
without drift): ``GET /Users`` paged by ``startIndex``/``count`` (it ignores
``attributes=`` and sends whole accounts) and ``GET /Users/{id}``. The reconciliation
(``provisioner.reconcile.reconcile_target``, report only) runs in a fresh
child process, so that its peak RSS is its own: the source read and rendered,
the pages read and classified, the findings kept; ``baseline_rss_mb`` is the
same process before it reconciles (interpreter, imports, config). Requests are
the client's own count (``ScimClient.history``).

``--mode json`` runs ``provisioner reconcile --json`` itself (``cli.main``,
its output to /dev/null); ``--mode repair`` runs ``reconcile_target`` with
``repair=True, send=False``: the reactions planned and queued, nothing sent
(sending is the executor's, measured by ``bench_throughput.py``).
``--drifted N``: the first N accounts in the target hold another
``department`` than the source says, so that each is ``linked`` with drift
and a repair queues N updates. ``--group-size K``: the target also manages
groups (``mappings/groups.yaml``) and holds one group per K accounts, each
linked in the state database with its K members in the member state, and one
member that is no account of ours (a foreign member) more in the target.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import ENTERPRISE, hr_row, write_csv  # noqa: E402 - after the path is set

TOKEN = "bench-token"


def people(count: int) -> list[dict[str, str]]:
    return [
        hr_row(f"E{n:06d}", f"First{n}", f"Last{n}", email=f"user{n}@example.com", department=f"Dept{n % 7}",
               manager_id=f"E{(n // 10) * 10:06d}" if n % 10 else "")
        for n in range(count)
    ]  # fmt: skip


def accounts(count: int, drifted: int = 0) -> Iterator[dict[str, Any]]:
    """What the mapping renders for ``count`` people, each with id ``u`` + key: the target's accounts.

    The first ``drifted`` hold another department than the one rendered.
    """
    from provisioner.demo import DEMO_MAPPING
    from provisioner.mapping import load_mapping
    from provisioner.payload import resolve_refs

    mapping = load_mapping(DEMO_MAPPING)
    for n, row in enumerate(people(count)):
        payload = resolve_refs(mapping.render(row).payload, lambda key: f"u{key}")[0]
        payload["id"] = f"u{row['employee_id']}"
        if n < drifted:
            payload[ENTERPRISE]["department"] = "Changed by hand"
        yield payload


def groups(count: int, size: int) -> Iterator[dict[str, Any]]:
    """One group per ``size`` accounts (ids ``g0``, ``g1``…): its accounts, and one foreign member."""
    for g, start in enumerate(range(0, count, size)):
        members = [{"value": f"uE{n:06d}"} for n in range(start, min(start + size, count))]
        yield {"id": f"g{g}", "displayName": f"team-{g}", "members": [*members, {"value": f"foreign-{g}"}]}


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MB.

    Linux's ``VmHWM`` is the process's own; ``ru_maxrss`` is not: a child keeps
    the peak its parent had when it forked (exec does not reset it), and this
    script's parent holds the N people it wrote.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reconcile(config_path: Path, mode: str) -> None:
    """Run one reconciliation (``mode``: report, json, repair) and print its figures as JSON (in a fresh process)."""
    import asyncio

    from provisioner import cli
    from provisioner.config import load_config
    from provisioner.reconcile import reconcile_target
    from provisioner.store import open_store
    from provisioner.sync import load_target_mapping

    config = load_config(config_path)
    mapping = load_target_mapping(config, "app")
    engine = open_store(config.state)
    # What the process holds before reconciling: the interpreter, the imports, the config and mapping.
    baseline = peak_rss_mb()
    started = time.perf_counter()
    cpu = time.process_time()
    figures: dict[str, Any] = {}
    if mode == "json":
        out = sys.stdout
        with open(os.devnull, "w", encoding="utf-8") as sys.stdout:
            code = cli.main(["reconcile", "--config", str(config_path), "--json"])
        sys.stdout = out
        figures["exit"] = code
    else:
        report = asyncio.run(reconcile_target(engine, config, "app", mapping, repair=mode == "repair", send=False))
        figures.update(requests=report.requests, counts=report.counts(), drifted=report.drifted)
        if report.groups:
            figures["groups"] = report.group_counts()
        if report.repaired:
            figures["queued"] = dict(report.queued)
    print(json.dumps({
        "seconds": round(time.perf_counter() - started, 2),
        "cpu_seconds": round(time.process_time() - cpu, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "baseline_rss_mb": round(baseline, 1),
        **figures,
    }))  # fmt: skip


def bench(count: int, page_size: int, mode: str = "report", drifted: int = 0, group_size: int = 0) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="bench-reconcile-"))
    write_csv(folder / "hr.csv", people(count))
    # The throughput benchmark's in-memory target, holding the accounts from the start.
    from bench_throughput import Target

    seed = itertools.chain(accounts(count, drifted), groups(count, group_size) if group_size else ())
    with Target(seed=seed) as target:
        (folder / "config.yaml").write_text(f"""state: sqlite:///state.db
sources: {{hr: {{type: csv, path: hr.csv, key: employee_id}}}}
targets:
  app:
    base_url: {target.base_url}
    allow_insecure_http: true
    auth: {{type: bearer, token: "{TOKEN}"}}
    source: hr
    mapping: {ROOT / "mappings" / "users.yaml"}
    reconcile: {{page_size: {page_size}}}
""" + (f"    groups: {ROOT / 'mappings' / 'groups.yaml'}\n" if group_size else ""))
        from provisioner.store import open_store

        open_store(f"sqlite:///{folder / 'state.db'}").dispose()
        with sqlite3.connect(folder / "state.db") as conn:
            conn.executemany(
                "INSERT INTO account_link (target, identity_key, scim_id, active, updated_at) VALUES (?, ?, ?, 1, ?)",
                [("app", f"E{n:06d}", f"uE{n:06d}", "2026-01-01 00:00:00") for n in range(count)],
            )
            for group in groups(count, group_size) if group_size else ():
                conn.execute("INSERT INTO group_link (target, group_key, scim_id, display_name, updated_at) "
                             "VALUES (?, ?, ?, ?, ?)",
                             ("app", f"team:{group['id']}", group["id"], group["displayName"], "2026-01-01 00:00:00"))  # fmt: skip
                conn.executemany(
                    "INSERT INTO group_member_state (target, group_key, member_id, identity_key) VALUES (?, ?, ?, ?)",
                    [("app", f"team:{group['id']}", m["value"], m["value"][1:]) for m in group["members"][:-1]],
                )
        child = subprocess.run([sys.executable, __file__, "--reconcile", str(folder / "config.yaml"),
                                "--mode", mode, "--log-level", "warning"], capture_output=True, text=True)  # fmt: skip
        if child.returncode:
            raise SystemExit(child.stderr[-2000:])
        return {"accounts": count, "mode": mode, "drifted_in_target": drifted, "group_size": group_size,
                "page_size": page_size,
                **json.loads(child.stdout.strip().splitlines()[-1])}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--page-size", type=int, default=100)
    parser.add_argument("--mode", choices=("report", "json", "repair"), default="report",
                        help="report only, `reconcile --json`, or --repair (queued, not sent)")
    parser.add_argument("--drifted", type=int, default=0, help="accounts whose department differs in the target")
    parser.add_argument("--group-size", type=int, default=0, help="one managed group per this many accounts (0: none)")
    parser.add_argument("--reconcile", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default="warning", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reconcile:
        from provisioner import logs

        logs.configure(args.log_level, "json")
        reconcile(args.reconcile, args.mode)
        return
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    for count in args.accounts:
        print(json.dumps(bench(count, args.page_size, args.mode, min(args.drifted, count), args.group_size)))


if __name__ == "__main__":
    main()
