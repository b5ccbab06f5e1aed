"""Benchmark: ops/s of one, two and three daemons on one PostgreSQL, next to one daemon on SQLite.

Prints figures; asserts nothing about time. Run from the repository root:

    .venv/bin/python benchmarks/bench_scaleout.py                  # 3,000 users, 8 in flight per daemon
    .venv/bin/python benchmarks/bench_scaleout.py --users 1000 --concurrency 4

Each run: a fresh state database (a private PostgreSQL from ``tests/postgres``,
or a SQLite file), a fresh fast SCIM target, and N real ``provisioner run``
processes started with the target paused. The planner queues every create;
once every daemon is up, ``provisioner target resume`` lets them send. The
figure is N users / (last operation finished - resume), read from the queue's
own timestamps, so start-up and planning are left out.

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
import signal
import subprocess
import sys
import tempfile
import time
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


def run_once(state: str, daemons: int, users: int, concurrency: int) -> tuple[float, dict[str, int]]:
    """One measured run; returns (ops/s, operations sent by instance)."""
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
            resumed = datetime.now().astimezone()
            cli("target", "resume", "app", "--config", str(configs[0]))

            def done() -> bool:
                with engine.connect() as conn:
                    query = select(func.count()).select_from(OP).where(OP.c.status == "succeeded")
                    return conn.execute(query).scalar_one() >= users

            wait_for(done, 1800, "every operation")
            with engine.connect() as conn:
                last = as_utc(conn.execute(select(func.max(OP.c.finished_at))).scalar_one())
                sent_by = dict(conn.execute(select(OP.c.claimed_by, func.count()).group_by(OP.c.claimed_by)).all())
            return users / (last - resumed).total_seconds(), {str(k): int(v) for k, v in sent_by.items()}
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                process.wait(timeout=60)
            engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8, help="max_concurrency of each daemon")
    args = parser.parse_args()
    print(f"{args.users} creates, {args.concurrency} in flight per daemon, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory(prefix="bench-sqlite-") as tmp:
        rate, _ = run_once(f"sqlite:///{Path(tmp) / 'state.db'}", 1, args.users, args.concurrency)
        print(f"  SQLite,     1 daemon : {rate:7.1f} ops/s")
    with PostgresServer() as pg:
        for daemons in (1, 2, 3):
            rate, sent_by = run_once(pg.create_database(f"bench_{daemons}"), daemons, args.users, args.concurrency)
            shares = ", ".join(f"{name} {count}" for name, count in sorted(sent_by.items()))
            print(f"  PostgreSQL, {daemons} daemon{'s' if daemons > 1 else ' '}: {rate:7.1f} ops/s  ({shares})")


if __name__ == "__main__":
    main()
