"""Benchmark: ops/s of one, two and three daemons on one PostgreSQL, next to one daemon on SQLite.

Prints figures; asserts nothing about time. Run from the repository root:

    .venv/bin/python benchmarks/bench_scaleout.py                  # 3,000 users, 8 in flight per daemon
    .venv/bin/python benchmarks/bench_scaleout.py --users 1000 --concurrency 4
    .venv/bin/python benchmarks/bench_scaleout.py --rounds 3 --daemons 1,2   # interleaved, medians
    .venv/bin/python benchmarks/bench_scaleout.py --durable --no-sqlite --daemons 1

Each run: a fresh state database (a private PostgreSQL from ``tests/postgres``,
or a SQLite file), a fresh fast SCIM target, and N real ``provisioner run``
processes started with the target paused. The planner queues every create;
once every daemon is up, ``provisioner target resume`` lets them send. The
figure is N users / (last operation finished - resume), read from the queue's
own timestamps, so start-up and planning are left out. Beside it, the CPU the
daemons used per operation over the same span, and PostgreSQL's (every process
of the server): on a shared machine wall time moves with the neighbours' load,
CPU much less. ``--rounds R`` runs the cases interleaved (A B C A B C …) and
prints the median and min–max of each.

PostgreSQL runs with the tests' settings (fsync and synchronous_commit off)
unless ``--durable`` is given: then every commit waits for its WAL flush, as
in a deployment. SQLite runs as the engine configures it (WAL,
synchronous=NORMAL: a commit survives a kill -9 of the process, and is flushed
at checkpoints rather than at every commit).

The target is the in-memory SCIM 2.0 server of ``bench_throughput.py`` in its
own process (HTTP/1.1 keep-alive; the daemons use POST /Users, GET by filter and
``/ServiceProviderConfig``). It is much faster than scim2-server (wsgiref,
HTTP/1.0), so the figures measure the engine and its database, not the target.
Every daemon shares this machine's cores with the target and PostgreSQL: on a
2-core machine three daemons cannot run three times as fast.
"""

from __future__ import annotations

import argparse
import os
import statistics
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402 - after the path is set

from bench_throughput import Target  # noqa: E402 - the in-memory SCIM target
from provisioner.demo import DEMO_MAPPING  # noqa: E402
from provisioner.queue import OP  # noqa: E402
from provisioner.store import as_utc, open_store  # noqa: E402
from tests.postgres.server import PostgresServer  # noqa: E402

TOKEN = "bench-token"


def write_source(path: Path, users: int) -> None:
    with path.open("w") as handle:
        handle.write("employee_id,first_name,last_name,email,phone,title,department,cost_center,division,"
                     "manager_id,status\n")  # fmt: skip
        for n in range(users):
            handle.write(f"E{n:06d},First{n},Last{n},user{n}@example.com,,Engineer,Dept{n % 7},CC-100,R&D,,active\n")


def write_config(folder: Path, state: str, base_url: str, concurrency: int, name: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(
        f"""state: {state}
sources:
  hr: {{type: csv, path: hr.csv, key: employee_id, schedule: {{every: 1h}}}}
targets:
  app:
    base_url: {base_url}
    allow_insecure_http: true
    auth: {{type: bearer, token: "{TOKEN}"}}
    source: hr
    mapping: {DEMO_MAPPING}
    max_concurrency: {concurrency}
daemon: {{listen: null, retry_interval: 1, instance: {name}, retention: null}}
"""
    )
    return path


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "provisioner", "--log-level", "warning", *args], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip


def wait_for(predicate, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU of each live process (Linux ``/proc``); a process gone or unreadable is left out."""
    used: dict[int, float] = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        used[pid] = (int(fields[11]) + int(fields[12])) / _TICK
    return used


def spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two readings (a process that started meanwhile counts from zero)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def server_pids(data: Path) -> list[int]:
    """The PostgreSQL server's processes: the postmaster (first line of postmaster.pid) and its children."""
    try:
        postmaster = int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == postmaster:
                    children.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return [postmaster, *children]


@dataclass(frozen=True)
class Result:
    """One measured run."""

    rate: float  # operations per second, resume to the last finished_at
    sent_by: dict[str, int]  # operations sent by each instance
    daemon_cpu_ms: float  # CPU of every daemon per operation, resume to done
    db_cpu_ms: float | None  # CPU of the PostgreSQL server per operation; None: SQLite


def run_once(
    state: str, daemons: int, users: int, concurrency: int, db_pids: Callable[[], list[int]] | None = None
) -> Result:
    """One measured run; ``db_pids`` lists the database server's processes (None: SQLite, in the daemons)."""
    processes: list[subprocess.Popen[bytes]] = []
    with Target() as target, tempfile.TemporaryDirectory(prefix="bench-scaleout-") as tmp:
        folder = Path(tmp)
        write_source(folder / "hr.csv", users)
        configs = [write_config(folder, state, target.base_url, concurrency, f"d{i + 1}") for i in range(daemons)]
        engine = open_store(state)
        try:
            cli("target", "pause", "app", "--config", str(configs[0]))
            logs = [config.with_suffix(".log") for config in configs]
            for config, log in zip(configs, logs, strict=True):
                command = [sys.executable, "-m", "provisioner", "--log-format", "json", "--log-level", "warning",
                           "run", "--config", str(config)]  # fmt: skip
                processes.append(subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT))

            def queued() -> bool:
                with engine.connect() as conn:
                    return conn.execute(select(func.count()).select_from(OP)).scalar_one() >= users

            wait_for(queued, 300, "the plan")
            time.sleep(3)  # every daemon imported and scheduled (they log nothing at warning level)
            daemon_pids = [process.pid for process in processes]
            daemon_cpu = cpu_seconds(daemon_pids)
            db_cpu = cpu_seconds(db_pids()) if db_pids else {}
            resumed = datetime.now().astimezone()
            cli("target", "resume", "app", "--config", str(configs[0]))

            def done() -> bool:
                with engine.connect() as conn:
                    query = select(func.count()).select_from(OP).where(OP.c.status == "succeeded")
                    return conn.execute(query).scalar_one() >= users

            wait_for(done, 1800, "every operation")
            daemon_used = spent(daemon_cpu, cpu_seconds(daemon_pids))
            db_used = spent(db_cpu, cpu_seconds(db_pids())) if db_pids else None
            with engine.connect() as conn:
                last = as_utc(conn.execute(select(func.max(OP.c.finished_at))).scalar_one())
                sent_by = dict(conn.execute(select(OP.c.claimed_by, func.count()).group_by(OP.c.claimed_by)).all())
            return Result(
                rate=users / (last - resumed).total_seconds(),
                sent_by={str(k): int(v) for k, v in sent_by.items()},
                daemon_cpu_ms=daemon_used * 1000 / users,
                db_cpu_ms=None if db_used is None else db_used * 1000 / users,
            )
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                process.wait(timeout=60)
            engine.dispose()


def spread(values: list[float], digits: int = 1) -> str:
    """Median [min–max], or the one value."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8, help="max_concurrency of each daemon")
    parser.add_argument("--daemons", default="1,2,3", help="daemon counts on PostgreSQL, comma-separated")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every case")
    parser.add_argument("--sqlite", action=argparse.BooleanOptionalAction, default=True, help="the SQLite case")
    parser.add_argument("--durable", action="store_true",
                        help="PostgreSQL with its own defaults (fsync, synchronous_commit on), not the tests' settings")
    args = parser.parse_args()
    counts = [int(n) for n in args.daemons.split(",") if n]
    print(f"{args.users} creates, {args.concurrency} in flight per daemon, {os.cpu_count()} CPUs, "
          f"PostgreSQL {'durable (fsync, synchronous_commit on)' if args.durable else 'with fsync off'}, "
          f"load average {os.getloadavg()[0]:.1f} at start; CPU in ms per operation")
    results: dict[str, list[Result]] = {}

    def show(case: str, result: Result) -> None:
        results.setdefault(case, []).append(result)
        shares = ", ".join(f"{name} {count}" for name, count in sorted(result.sent_by.items()))
        db = "" if result.db_cpu_ms is None else f", PostgreSQL {result.db_cpu_ms:.2f}"
        print(f"  {case}: {result.rate:7.1f} ops/s  CPU: daemons {result.daemon_cpu_ms:.2f}{db}  ({shares})",
              flush=True)  # fmt: skip

    with PostgresServer(durable=args.durable) as pg, tempfile.TemporaryDirectory(prefix="bench-sqlite-") as tmp:
        for round_number in range(args.rounds):
            if args.sqlite:
                state = f"sqlite:///{Path(tmp) / f'state{round_number}.db'}"
                show("SQLite,     1 daemon ", run_once(state, 1, args.users, args.concurrency))
            for daemons in counts:
                url = pg.create_database(f"bench_{round_number}_{daemons}")
                result = run_once(url, daemons, args.users, args.concurrency, lambda: server_pids(pg.data))
                show(f"PostgreSQL, {daemons} daemon{'s' if daemons > 1 else ' '}", result)
    if args.rounds > 1:
        print(f"median [min–max] of {args.rounds} interleaved rounds")
        for case, runs in results.items():
            db = [r.db_cpu_ms for r in runs if r.db_cpu_ms is not None]
            cpu = spread([r.daemon_cpu_ms for r in runs], 2) + (f", PostgreSQL {spread(db, 2)}" if db else "")
            print(f"  {case}: {spread([r.rate for r in runs]):>7} ops/s  CPU: daemons {cpu}")


if __name__ == "__main__":
    main()
