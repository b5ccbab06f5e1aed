"""Benchmark: planning cost per record and end-to-end sync throughput against a real SCIM server.

Prints figures; asserts nothing about time. Run from the repository root:

    .venv/bin/python benchmarks/bench_sync.py                      # both parts, defaults
    .venv/bin/python benchmarks/bench_sync.py --records 100000 --users 2000 --concurrency 4
    .venv/bin/python benchmarks/bench_sync.py --skip-e2e           # planning only
    .venv/bin/python benchmarks/bench_sync.py --skip-plan --profile e2e.prof  # cProfile of the initial cycle
    .venv/bin/python benchmarks/bench_sync.py --skip-plan --skip-e2e --load 100000  # part c only

Part a (planning, no network): N synthetic HR records written as CSV, the
shipped ``mappings/users.yaml``, and ``provisioner.planner.plan_target``
against (i) no links (every record a joiner) and (ii) links matching every
record (the steady-state cycle where nothing changed). CPU is
``time.process_time``; peak memory is tracemalloc's peak for one planning
pass streamed from the CSV, plus the process's max RSS.

Part b (end to end): ``scim2-server`` on 127.0.0.1, a config for M users,
``provisioner.sync.sync_target`` for the initial cycle, a cycle with no change
(should send 0 requests) and a cycle where a share of the users moved
(PATCH). Requests (retries included) are counted by wrapping
``httpx.AsyncClient.send`` in this process; client CPU is this process's
``process_time`` (the server runs in another process). Two bare httpx loops
give the scale: against a fresh scim2-server (the ceiling that server allows
here) and against a minimal keep-alive server (the client's own ceiling on
this machine).

Part c (``--load N``, off by default: the initial load of 100,000 takes
minutes): the real commands, each in a child process, against a fast
in-memory SCIM server (asyncio, HTTP/1.1 keep-alive, its own process). An
initial ``provisioner sync`` of N identities with its peak RSS (the child's
``ru_maxrss``), then the planning floor (read the source, hash each record,
compare it with the stored state: one query for the links), then two
``provisioner sync`` and one ``provisioner plan`` with nothing changed, each
with its CPU (the command's own, imports left out) and its ratio to the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import csv
import gc
import os
import platform
import pstats
import random
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402 - after the path is set

from provisioner.config import SourceConfig, load_config  # noqa: E402
from provisioner.demo import DEMO_MAPPING, free_port, start_scim_server  # noqa: E402
from provisioner.mapping import load_mapping  # noqa: E402
from provisioner.planner import Kind, Link, plan_target  # noqa: E402
from provisioner.sources import IdentityRecord, read_source  # noqa: E402
from provisioner.store import open_store  # noqa: E402

# The throughput benchmark's in-memory SCIM target and its way of setting the engine's logs.
from bench_throughput import Target, configure_logs  # noqa: E402

COLUMNS = (
    "employee_id", "first_name", "last_name", "email", "phone", "title",
    "department", "cost_center", "division", "manager_id", "status",
)  # fmt: skip
DEPARTMENTS = (
    ("Engineering", "CC-100", "R&D"),
    ("Sales", "CC-200", "Commercial"),
    ("Finance", "CC-300", "Corporate"),
    ("People", "CC-400", "Corporate"),
    ("Support", "CC-500", "Commercial"),
    ("Contractors", "CC-900", "External"),  # out of scope in mappings/users.yaml
)
FIRST = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Margaret", "Ken", "Radia", "Linus", "Frances", "John")
LAST = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Hamilton", "Thompson", "Perlman", "Allen")
TITLES = ("Engineer", "Senior Engineer", "Analyst", "Manager", "Account Executive", "Recruiter", "Support Agent")
TOKEN_VARIABLE = "PROVISIONER_BENCH_TOKEN"


# -- synthetic data ----------------------------------------------------------


def hr_rows(n: int, *, seed: int = 1, terminated: float = 0.02, contractors: float = 0.03) -> Iterator[dict[str, str]]:
    """N HR records shaped like examples/hr.csv: a management tree of fan-out 8, some leavers, some out of scope."""
    rng = random.Random(seed)
    for i in range(1, n + 1):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        if rng.random() < contractors:
            department = DEPARTMENTS[-1]
        else:
            department = DEPARTMENTS[rng.randrange(len(DEPARTMENTS) - 1)]
        yield {
            "employee_id": f"E{i:07d}",
            "first_name": first,
            "last_name": last,
            "email": f"{first}.{last}.{i}@example.com",
            "phone": f"+1 555 {i % 10000:04d}" if rng.random() < 0.8 else "",
            "title": rng.choice(TITLES),
            "department": department[0],
            "cost_center": department[1],
            "division": department[2],
            "manager_id": f"E{(i - 2) // 8 + 1:07d}" if i > 1 else "",
            "status": "terminated" if rng.random() < terminated else "active",
        }


def write_hr_csv(path: Path, rows: Iterator[dict[str, str]] | list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


# -- measuring -----------------------------------------------------------------


@dataclass
class Timing:
    cpu: float = 0.0
    wall: float = 0.0


@contextmanager
def timed() -> Iterator[Timing]:
    gc.collect()
    timing = Timing()
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        yield timing
    finally:
        timing.cpu = time.process_time() - cpu
        timing.wall = time.perf_counter() - wall


def max_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def per_record(timing: Timing, n: int) -> str:
    return f"{timing.cpu / n * 1e6:8.1f} µs CPU/record  ({timing.cpu:6.2f} s CPU, {timing.wall:6.2f} s wall)"


# -- part a: planning ------------------------------------------------------------


def bench_planning(records: int, folder: Path, *, trace_memory: bool) -> None:
    print(f"\n== a) planning {records:,} records (mappings/users.yaml, no network) ==")
    path = folder / "hr.csv"
    with timed() as t:
        write_hr_csv(path, hr_rows(records))
    print(f"generate CSV      {t.wall:6.2f} s wall  ({path.stat().st_size / 1e6:.1f} MB)")
    source = SourceConfig(type="csv", path=path, key="employee_id")
    mapping = load_mapping(DEMO_MAPPING)

    with timed() as t:
        loaded = list(read_source(source))
    print(f"read CSV          {per_record(t, records)}")

    identities = [r for r in loaded if isinstance(r, IdentityRecord)]
    with timed() as t:
        for record in identities:
            mapping.render(record.attributes)
    print(f"render            {per_record(t, records)}")

    with timed() as t:
        joiners = plan_target("bench", mapping, loaded, {})
    print(f"plan, no links    {per_record(t, records)}  -> {_counts(joiners.counts())}")

    # Steady state: every identity linked, with the hash of what was last applied. The hash
    # depends on the manager's id in the target, so link everyone first, then take the hashes.
    linked = {key: Link(key, f"scim-{key}", None, True) for key in (r.key for r in identities)}
    settled = plan_target("bench", mapping, loaded, linked)
    links: dict[str, Link] = {}
    for decision in settled.decisions:
        key = decision.identity_key
        links[key] = Link(key, f"scim-{key}", decision.payload_hash, decision.kind is not Kind.DISABLE)
    with timed() as t:
        steady = plan_target("bench", mapping, loaded, links)
    print(f"plan, all linked  {per_record(t, records)}  -> {_counts(steady.counts())}")
    if steady.decisions:
        print(f"  !! the steady-state plan is not empty: {len(steady.decisions)} operations")

    with timed() as t:
        streamed = plan_target("bench", mapping, read_source(source), links)
    print(f"read+plan, linked {per_record(t, records)}  (streamed from the CSV: a real no-change cycle's planning)")
    assert streamed.counts() == steady.counts()
    bench_store(folder, joiners.decisions, settled.decisions, records)
    del loaded, identities, joiners, settled, steady, streamed, linked
    gc.collect()
    print(f"max RSS so far    {max_rss_mb():6.0f} MB (the records were held in a list for the steps above)")

    if trace_memory:
        gc.collect()
        tracemalloc.start()
        plan_target("bench", mapping, read_source(source), links)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        links_mb = _links_size_mb(links)
        print(f"peak memory       {peak / 1e6:6.1f} MB traced while planning streamed from the CSV against the links"
              f" (~{peak / records:.0f} B/record; the links dict itself ~{links_mb:.0f} MB, allocated before)")


def bench_store(folder: Path, joiners: list[Any], settled: list[Any], records: int) -> None:
    """The state-database side of planning: write the initial plan to the queue, claim it, load every link."""
    from sqlalchemy import insert

    from provisioner.payload import dumps
    from provisioner.queue import claim, enqueue, load_links
    from provisioner.store import AccountLink, utcnow

    engine = open_store(f"sqlite:///{folder / 'state.db'}")
    try:
        with timed() as t:
            enqueue(engine, "bench-run", "bench", joiners)
        print(f"enqueue creates   {per_record(t, len(joiners))}  ({len(joiners):,} rows, one transaction)")
        with timed() as t:
            claimed = claim(engine, "bench")
        print(f"claim             {per_record(t, len(claimed))}  ({len(claimed):,} rows)")
        now = utcnow()
        rows = [
            {
                "target": "bench", "identity_key": d.identity_key, "scim_id": f"scim-{d.identity_key}",
                "active": True, "etag": 'W/"1"', "location": None, "applied_hash": d.payload_hash,
                "applied": dumps(d.payload) if d.payload else None, "updated_at": now,
            }
            for d in settled
        ]  # fmt: skip
        with engine.begin() as conn:
            conn.execute(insert(AccountLink.__table__), rows)
        with timed() as t:
            loaded = load_links(engine, "bench")
        print(f"load_links        {per_record(t, len(loaded))}  ({len(loaded):,} links, the planner's one query)")
    except Exception as exc:  # noqa: BLE001 - the queue API may move under this script; say so and go on
        print(f"store steps skipped: {type(exc).__name__}: {exc}")
    finally:
        engine.dispose()


def _links_size_mb(links: dict[str, Link]) -> float:
    tracemalloc.start()
    copy = {k: Link(v.identity_key, v.scim_id, v.applied_hash, v.active) for k, v in links.items()}
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del copy
    return size / 1e6


def _counts(counts: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in counts.items() if v)


# -- part b: end to end ------------------------------------------------------------


class RequestCounter:
    """Counts every HTTP request this process sends, retries included, by wrapping ``httpx.AsyncClient.send``."""

    def __init__(self) -> None:
        self.count = 0
        self.by_method: dict[str, int] = {}
        self._original: Callable[..., Any] = httpx.AsyncClient.send

    def install(self) -> None:
        original = self._original
        counter = self

        async def send(client: httpx.AsyncClient, request: httpx.Request, **options: Any) -> httpx.Response:
            counter.count += 1
            counter.by_method[request.method] = counter.by_method.get(request.method, 0) + 1
            return await original(client, request, **options)

        httpx.AsyncClient.send = send  # type: ignore[method-assign]

    def uninstall(self) -> None:
        httpx.AsyncClient.send = self._original  # type: ignore[method-assign]

    def reset(self) -> None:
        self.count = 0
        self.by_method = {}


def write_config(folder: Path, base_url: str, concurrency: int) -> Path:
    from provisioner.config import TargetConfig

    path = folder / "config.yaml"
    # The local server speaks plain HTTP; engines that refuse it by default have this switch.
    insecure = "\n    allow_insecure_http: true" if "allow_insecure_http" in TargetConfig.model_fields else ""
    path.write_text(
        f"""state: sqlite:///state.db
sources:
  hr: {{type: csv, path: hr.csv, key: employee_id}}
targets:
  bench:
    base_url: {base_url}
    auth: {{type: bearer, token: "${{{TOKEN_VARIABLE}}}"}}
    source: hr
    mapping: {DEMO_MAPPING}
    leaver: disable
    max_concurrency: {concurrency}{insecure}
""",
        encoding="utf-8",
    )
    return path


def bench_e2e(users: int, concurrency: int, moved: float, folder: Path, profile: Path | None) -> None:
    from provisioner.sync import load_target_mapping, sync_target

    print(f"\n== b) end to end: {users:,} users, max_concurrency {concurrency}, scim2-server on 127.0.0.1 ==")
    print("   caveat: scim2-server is wsgiref's threaded server (HTTP/1.0, a new TCP connection per request,")
    print("   in-memory storage in Python): it is likely the bottleneck here, not the engine. Compare with the")
    print("   bare-client ceiling below; 'client CPU/op' is this process only and is the figure that matters.")
    counter = RequestCounter()
    counter.install()
    rows = list(hr_rows(users, seed=2))
    (folder / "e2e").mkdir()
    work = folder / "e2e"
    write_hr_csv(work / "hr.csv", rows)
    profiler = cProfile.Profile() if profile else None

    with start_scim_server() as server:
        os.environ[TOKEN_VARIABLE] = server.token
        config = load_config(write_config(work, server.base_url, concurrency))
        engine = open_store(config.state)
        mapping = load_target_mapping(config, "bench")

        def cycle(label: str) -> None:
            counter.reset()
            if profiler and label == "initial":
                profiler.enable()
            with timed() as t:
                report = asyncio.run(sync_target(engine, config, "bench", mapping))
            if profiler and label == "initial":
                profiler.disable()
            ops = sum(report.statuses.values())
            summary = " ".join(f"{k}={v}" for k, v in report.summary().items() if v)
            methods = dict(sorted(counter.by_method.items()))
            print(f"{label:<10} {t.wall:7.2f} s wall  {t.cpu:6.2f} s CPU  {ops:6d} ops  "
                  f"{counter.count:6d} requests {methods}")
            if ops:
                print(f"{'':<10} {ops / t.wall:7.0f} ops/s  {counter.count / t.wall:7.0f} requests/s  "
                      f"client CPU {t.cpu * 1000 / ops:5.2f} ms/op (planning the whole source included; "
                      f"{t.cpu / t.wall:.0%} of a core)")
            print(f"{'':<10} {summary}")

        cycle("initial")
        cycle("no change")
        changed = random.Random(3)
        for row in rows:
            if changed.random() < moved:
                row["title"] = "Principal " + row["title"]
        write_hr_csv(work / "hr.csv", rows)
        cycle(f"movers {moved:.0%}")
        engine.dispose()
    counter.uninstall()

    if profiler and profile:
        profiler.dump_stats(profile)
        print(f"\nprofile of the initial cycle written to {profile}; top 25 by own time:")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)

    bench_bare_client(min(users, 2000), concurrency)


def bench_bare_client(users: int, concurrency: int) -> None:
    """The ceiling: POST users with plain httpx (one client per worker), nothing else, against a fresh server."""

    resets = [0]

    async def run(base_url: str, token: str) -> tuple[Timing, int]:
        resets[0] = 0
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(users):
            queue.put_nowait(i)

        async def worker() -> int:
            done = 0
            async with httpx.AsyncClient(
                base_url=base_url + "/", headers={"Authorization": f"Bearer {token}"}, timeout=30
            ) as http:
                while not queue.empty():
                    i = queue.get_nowait()
                    body = {
                        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                        "userName": f"bare.{i}@example.com",
                        "name": {"givenName": "Bare", "familyName": str(i)},
                        "emails": [{"value": f"bare.{i}@example.com", "type": "work", "primary": True}],
                    }
                    while True:
                        try:
                            response = await http.post("Users", json=body)
                            break
                        except httpx.TransportError:
                            # wsgiref listens with a backlog of 5: many connections at once get reset.
                            resets[0] += 1
                    assert response.status_code in (201, 409), response.text
                    done += 1
            return done

        with timed() as t:
            done = sum(await asyncio.gather(*(worker() for _ in range(concurrency))))
        return t, done

    print()
    with start_scim_server() as server:
        t, done = asyncio.run(run(server.base_url, server.token))
    print(f"bare httpx POST loop, {concurrency} clients -> fresh scim2-server:   {done / t.wall:6.0f} requests/s, "
          f"client CPU {t.cpu * 1000 / done:5.2f} ms/request  ({done} requests, {t.wall:.2f} s wall"
          f"{f', {resets[0]} connection resets retried' if resets[0] else ''})")
    port = free_port()
    with subprocess.Popen([sys.executable, "-c", MINIMAL_SERVER, str(port)], stdout=subprocess.PIPE) as server:
        try:
            assert server.stdout is not None
            server.stdout.readline()
            t, done = asyncio.run(run(f"http://127.0.0.1:{port}/v2", "unused"))
        finally:
            server.kill()
    print(f"bare httpx POST loop, {concurrency} clients -> minimal keep-alive server: {done / t.wall:6.0f} requests/s, "
          f"client CPU {t.cpu * 1000 / done:5.2f} ms/request  (this machine's client ceiling; DESIGN.md: ~0.65 ms)")


# A keep-alive HTTP/1.1 server that answers every request with one fixed SCIM User: it costs
# next to nothing, so a client loop against it measures the client alone.
MINIMAL_SERVER = r"""
import asyncio, sys
BODY = b'{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"id":"x","userName":"u"}'
ANSWER = b"HTTP/1.1 201 Created\r\nContent-Type: application/scim+json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if length:
                await reader.readexactly(length)
            writer.write(ANSWER)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


# -- part c: the 100k cycle, as the commands run it ------------------------------------


# Runs one provisioner command in a fresh process and writes what it cost: CPU of the command
# itself (imports apart), CPU of the imports, peak RSS of the process (ru_maxrss, KiB on Linux).
COMMAND = r"""
import json, resource, sys, time
started = time.process_time()
from provisioner.cli import main
# The CLI imports what a command runs when it runs it: load those modules here, so that the
# command's CPU stays its own work, as the floor's does.
import provisioner.config, provisioner.lock, provisioner.ondemand, provisioner.probe, provisioner.store, provisioner.sync
imported = time.process_time()
code = main(sys.argv[2:])
ran = time.process_time()
with open(sys.argv[1], "w") as out:
    json.dump({"code": code, "import_cpu": imported - started, "cpu": ran - imported,
               "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, out)
"""


def run_command(work: Path, *args: str) -> dict[str, Any]:
    """One ``provisioner`` command in a child process; what it cost, and its wall time."""
    import json

    result = work / "command.json"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", COMMAND, str(result), *args, "--log-level", "warning"], cwd=work,
                   stdout=subprocess.DEVNULL, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    figures = json.loads(result.read_text())
    figures["wall"] = time.perf_counter() - started
    return figures


def planning_floor(config_path: Path, target: str) -> Timing:
    """Read the source, hash every record, compare it with the stored state: what no cycle can skip."""
    import hashlib

    import orjson
    from sqlalchemy import select

    from provisioner.queue import LINK

    config = load_config(config_path)
    engine = open_store(config.state)
    source = config.sources[config.targets[target].source]
    with timed() as t:
        with engine.connect() as conn:
            rows = conn.execute(select(LINK.c.identity_key, LINK.c.applied_hash).where(LINK.c.target == target))
            stored = {key: digest for key, digest in rows}
        same = 0
        for record in read_source(source):
            if isinstance(record, IdentityRecord):
                digest = hashlib.blake2b(orjson.dumps(record.attributes, option=orjson.OPT_SORT_KEYS), digest_size=16)
                same += stored.get(record.key) == digest.hexdigest()
    engine.dispose()
    return t


def bench_load(identities: int, concurrency: int, folder: Path) -> None:
    print(f"\n== c) {identities:,} identities: initial load, then cycles with nothing changed "
          f"(each command in its own process, fast in-memory SCIM server) ==")
    work = folder / "load"
    work.mkdir()
    write_hr_csv(work / "hr.csv", hr_rows(identities, seed=4))
    # The throughput benchmark's in-memory target: keep-alive HTTP/1.1, in a process of its own.
    with Target() as target:
        os.environ[TOKEN_VARIABLE] = "bench"
        config = write_config(work, target.base_url, concurrency)
        load = run_command(work, "sync", "--config", str(config))
        print(f"initial sync      {load['wall']:7.1f} s wall  {load['cpu']:6.1f} s CPU  "
              f"peak RSS {load['maxrss_kb'] / 1024:5.0f} MB  (exit {load['code']}; "
              f"{identities / load['wall']:.0f} identities/s)")
        floor = planning_floor(config, "bench")
        print(f"planning floor    {per_record(floor, identities)}  (read + hash + compare with the stored state)")
        for label, args in (("no-change sync 1", ("sync",)), ("no-change sync 2", ("sync",)),
                            ("no-change plan", ("plan",))):  # fmt: skip
            figures = run_command(work, *args, "--config", str(config))
            print(f"{label:<17} {figures['cpu'] / identities * 1e6:8.1f} µs CPU/record  "
                  f"({figures['cpu']:6.2f} s CPU, {figures['wall']:6.2f} s wall with imports, "
                  f"{figures['import_cpu']:.2f} s CPU of imports, peak RSS {figures['maxrss_kb'] / 1024:.0f} MB, "
                  f"exit {figures['code']})  {figures['cpu'] / floor.cpu:4.1f}× the floor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000, help="records to plan in part a (default 100000)")
    parser.add_argument("--users", type=int, default=2_000, help="users to sync in part b (default 2000)")
    parser.add_argument("--concurrency", type=int, default=4, help="max_concurrency of the target (default 4)")
    parser.add_argument("--moved", type=float, default=0.1, help="share of users moved in the third cycle (0.1)")
    parser.add_argument("--load", type=int, default=0,
                        help="identities of part c, the initial load and no-change cycles (off unless given)")
    parser.add_argument("--skip-plan", action="store_true", help="skip part a")
    parser.add_argument("--skip-e2e", action="store_true", help="skip part b")
    parser.add_argument("--no-tracemalloc", action="store_true", help="skip the traced-memory pass of part a")
    parser.add_argument("--profile", type=Path, help="write a cProfile of part b's initial cycle to this file")
    parser.add_argument(
        "--log",
        choices=("json", "off"),
        default="json",
        help="engine logs: JSON lines at info level to /dev/null, as `provisioner sync` makes them (default), or off",
    )
    args = parser.parse_args()
    configure_logs(args.log)

    print(f"python {platform.python_version()} on {platform.machine()}, nproc {len(os.sched_getaffinity(0))}, "
          f"load average {os.getloadavg()[0]:.1f} at start, engine logs: {args.log}")
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        folder = Path(tmp)
        if not args.skip_plan:
            bench_planning(args.records, folder, trace_memory=not args.no_tracemalloc)
        if not args.skip_e2e:
            bench_e2e(args.users, args.concurrency, args.moved, folder, args.profile)
        if args.load:
            bench_load(args.load, args.concurrency, folder)


if __name__ == "__main__":
    main()
