"""Benchmark: the engine's cost per operation next to a plain httpx loop, paired and interleaved.

Prints figures; asserts nothing about time. Run from the repository root:

    .venv/bin/python benchmarks/bench_throughput.py                    # 5,000 users, 3 pairs, 4 and 16 in flight
    .venv/bin/python benchmarks/bench_throughput.py --users 1000 --pairs 5 --concurrency 16
    .venv/bin/python benchmarks/bench_throughput.py --users 2000 --pairs 1 --profile engine.prof

Both sides run the same workload against the same kind of target: M creates,
then 20 % of the users moved (their ``title`` changed: one PATCH each), then
10 % leavers (``active`` false: one PATCH each), every answer checked. They run
A B A B … (engine, loop, engine, loop), each run against a fresh target, at
every concurrency asked for; the figures are the median [min–max] of the
per-pair ratios engine ÷ loop, so that the load other processes put on the
machine falls on both sides of each ratio alike.

- **engine**: ``provisioner.sync.sync_target`` for three cycles (initial,
  movers, leavers) from a CSV source with a mapping that has no ``ref()``,
  ``max_concurrency`` N, a SQLite state file, logs on as ``provisioner sync``
  writes them (JSON lines, to /dev/null here). Its CPU includes planning,
  the queue and the logs: everything a cycle costs.
- **loop**: N workers, each with its own ``httpx.AsyncClient``, sending the
  same bodies (POST, then PATCH ``title``, then PATCH ``active``), checking
  each status and that the answer holds what was sent.

The target is a small in-memory SCIM 2.0 server in its own process (so its
CPU is not counted as the client's): HTTP/1.1 keep-alive on asyncio streams,
users in a dict, POST (409 on a taken userName), GET by id, GET with
``filter=userName eq "…"``, GET of every user paged by ``startIndex`` and
``count``, PUT, PATCH (add/replace/remove by path, or without one), DELETE
and ``/ServiceProviderConfig`` (PATCH supported, no ETags); Groups only as seeded, read only. Other
benchmarks use it too (``Target(seed=…)`` starts it holding Users already).
Client CPU is ``time.process_time`` of this process.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import itertools
import json
import os
import pstats
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

USER = "urn:ietf:params:scim:schemas:core:2.0:User"
LIST = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
SPC = {
    "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
    "patch": {"supported": True},
    "bulk": {"supported": False, "maxOperations": 0, "maxPayloadSize": 0},
    "filter": {"supported": True, "maxResults": 200},
    "changePassword": {"supported": False},
    "sort": {"supported": False},
    "etag": {"supported": False},
    "authenticationSchemes": [],
}
TOKEN = "bench-token"
MOVERS = 0.2
LEAVERS = 0.1

# The mapping both sides send: no ref(), no extension (the loop has neither).
MAPPING = """\
resource: User
match: userName
leaver_when: "status == 'terminated'"
attributes:
  userName: email | lower
  externalId: employee_id
  name:
    givenName: first_name
    familyName: last_name
  displayName: "{{ first_name }} {{ last_name }}"
  title: title
  emails:
    - value: email | lower
      type: "'work'"
      primary: true
"""


# ---------------------------------------------------------------- the target (its own process)


class _Store:
    """Users by id (in the order they came), and their ids by ``userName`` in lower case; Groups seeded, read only."""

    def __init__(self, seed: Path | None = None) -> None:
        self.users: dict[str, dict[str, Any]] = {}
        self.by_name: dict[str, str] = {}
        self.groups: dict[str, dict[str, Any]] = {}
        if seed is not None:
            with seed.open(encoding="utf-8") as lines:
                for line in lines:
                    if line.strip():
                        self.add(json.loads(line))

    def add(self, resource: dict[str, Any]) -> None:
        """Hold ``resource`` as it is, under its ``id`` (a new one when it has none); one without userName is a Group."""
        if "id" not in resource:
            resource["id"] = uuid.uuid4().hex
        if "userName" not in resource:
            self.groups[resource["id"]] = resource
            return
        self.users[resource["id"]] = resource
        self.by_name[str(resource.get("userName", "")).lower()] = resource["id"]


def _apply_patch(resource: dict[str, Any], operations: list[dict[str, Any]]) -> None:
    for op in operations:
        kind = str(op.get("op", "")).lower()
        path = op.get("path")
        value = op.get("value")
        if not path:
            if isinstance(value, dict):
                resource.update(value)
            continue
        if path.startswith("urn:"):
            urn, _, attribute = path.rpartition(":")
            container = resource.setdefault(urn, {})
        elif "." in path:
            parent, _, attribute = path.partition(".")
            container = resource.setdefault(parent, {})
        else:
            container, attribute = resource, path
        if kind == "remove":
            container.pop(attribute, None)
        else:
            container[attribute] = value


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, store: _Store) -> None:
    def answer(status: int, body: Any = None, location: str | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        head = f"HTTP/1.1 {status} X\r\nContent-Type: application/scim+json\r\nContent-Length: {len(data)}\r\n"
        if location:
            head += f"Location: {location}\r\n"
        writer.write(head.encode() + b"\r\n" + data)

    def error(status: int, detail: str, scim_type: str | None = None) -> None:
        body: dict[str, Any] = {"schemas": [ERROR], "status": str(status), "detail": detail}
        if scim_type:
            body["scimType"] = scim_type
        answer(status, body)

    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                if line[:15].lower() == "content-length:":
                    length = int(line[15:])
            raw = await reader.readexactly(length) if length else b""
            path, _, query = target.partition("?")
            parts = [p for p in path.split("/") if p]
            if parts and parts[0] == "v2":
                parts = parts[1:]
            if parts == ["ServiceProviderConfig"]:
                answer(200, SPC)
            elif parts and parts[0] == "Groups" and method == "GET":
                # Read only, for reconciliation: listed by startIndex/count (no filter), or one by id.
                if len(parts) == 2:
                    group = store.groups.get(parts[1])
                    if group is None:
                        error(404, f"no group {parts[1]}")
                    else:
                        answer(200, group)
                    continue
                params = parse_qs(query)
                start = max(int(params.get("startIndex", ["1"])[0]), 1)
                count = max(int(params.get("count", ["200"])[0]), 0)
                found = list(itertools.islice(store.groups.values(), start - 1, start - 1 + count))
                answer(200, {"schemas": [LIST], "totalResults": len(store.groups), "startIndex": start,
                             "itemsPerPage": len(found), "Resources": found})  # fmt: skip
            elif not parts or parts[0] != "Users":
                error(404, f"no {path}")
            elif len(parts) == 1 and method == "POST":
                body = json.loads(raw)
                name = str(body.get("userName", "")).lower()
                if name in store.by_name:
                    error(409, "userName taken", "uniqueness")
                    continue
                resource_id = uuid.uuid4().hex
                body["id"] = resource_id
                body["meta"] = {"resourceType": "User", "location": f"/v2/Users/{resource_id}"}
                store.add(body)
                answer(201, body, body["meta"]["location"])
            elif len(parts) == 1 and method == "GET":
                params = parse_qs(query)
                match = re.search(r'userName eq "((?:[^"\\]|\\.)*)"', params.get("filter", [""])[0])
                if match:
                    found_id = store.by_name.get(match.group(1).lower())
                    everyone = [store.users[found_id]] if found_id else []
                else:
                    everyone = store.users.values()
                # RFC 7644 §3.4.2.4: startIndex counts from 1 (less reads as 1), count as asked (200 unasked).
                start = max(int(params.get("startIndex", ["1"])[0]), 1)
                count = max(int(params.get("count", ["200"])[0]), 0)
                found = list(itertools.islice(everyone, start - 1, start - 1 + count))
                answer(200, {"schemas": [LIST], "totalResults": len(everyone), "startIndex": start,
                             "itemsPerPage": len(found), "Resources": found})  # fmt: skip
            elif len(parts) == 2:
                resource = store.users.get(parts[1])
                if resource is None:
                    error(404, f"no user {parts[1]}")
                elif method == "GET":
                    answer(200, resource)
                elif method == "DELETE":
                    del store.users[parts[1]]
                    store.by_name.pop(str(resource.get("userName", "")).lower(), None)
                    answer(204)
                elif method == "PUT":
                    body = json.loads(raw)
                    body["id"], body["meta"] = resource["id"], resource["meta"]
                    store.by_name.pop(str(resource.get("userName", "")).lower(), None)
                    store.by_name[str(body.get("userName", "")).lower()] = resource["id"]
                    store.users[parts[1]] = body
                    answer(200, body)
                elif method == "PATCH":
                    body = json.loads(raw)
                    old_name = str(resource.get("userName", "")).lower()
                    _apply_patch(resource, body.get("Operations", []))
                    store.by_name.pop(old_name, None)
                    store.by_name[str(resource.get("userName", "")).lower()] = resource["id"]
                    answer(200, resource)
                else:
                    error(405, method)
            else:
                error(405, method)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def serve(port: int, seed: Path | None = None) -> None:
    """Run the in-memory target until killed (``--serve PORT``); prints ``ready`` once listening.

    ``seed`` (``--seed FILE``): JSON lines, one User each, held from the start under their own ``id``.
    """

    async def main() -> None:
        store = _Store(seed)
        server = await asyncio.start_server(lambda r, w: _handle(r, w, store), "127.0.0.1", port, backlog=256)
        print("ready", flush=True)
        await server.serve_forever()

    asyncio.run(main())


class Target:
    """A fresh target process for one run.

    ``seed``: Users it holds from the start, each under its own ``id`` (one is made for a User
    without), as when they were created in an earlier run: listed and found by filter alike.
    """

    def __init__(self, seed: Iterable[dict[str, Any]] = ()) -> None:
        self.seed = seed

    def __enter__(self) -> Target:
        from provisioner.demo import free_port

        self.port = free_port()
        command = [sys.executable, __file__, "--serve", str(self.port)]
        with tempfile.TemporaryDirectory(prefix="bench-target-") as tmp:
            seed = Path(tmp) / "seed.jsonl"
            with seed.open("w", encoding="utf-8") as lines:
                for resource in self.seed:
                    lines.write(json.dumps(resource) + "\n")
            self.process = subprocess.Popen([*command, "--seed", str(seed)], stdout=subprocess.PIPE)
            assert self.process.stdout is not None
            # The file is read by the time the target says it is ready.
            if self.process.stdout.readline().strip() != b"ready":
                raise SystemExit("the target did not start")
        self.base_url = f"http://127.0.0.1:{self.port}/v2"
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.kill()
        self.process.wait()


# ---------------------------------------------------------------- the workload


def rows(users: int) -> list[dict[str, str]]:
    return [
        {"employee_id": f"E{n:06d}", "first_name": f"First{n}", "last_name": f"Last{n}",
         "email": f"user{n}@example.com", "title": "Engineer", "status": "active"}  # fmt: skip
        for n in range(users)
    ]


def movers(users: int) -> range:
    return range(0, int(users * MOVERS))


def leavers(users: int) -> range:
    return range(users - int(users * LEAVERS), users)


def body_of(row: dict[str, str]) -> dict[str, Any]:
    """The User the mapping renders from a row (what the loop sends)."""
    email = row["email"].lower()
    return {
        "schemas": [USER],
        "userName": email,
        "externalId": row["employee_id"],
        "name": {"givenName": row["first_name"], "familyName": row["last_name"]},
        "displayName": f"{row['first_name']} {row['last_name']}",
        "title": row["title"],
        "emails": [{"value": email, "type": "work", "primary": True}],
        "active": True,
    }


def write_csv(path: Path, data: list[dict[str, str]]) -> None:
    columns = list(data[0])
    lines = [",".join(columns)] + [",".join(row[c] for c in columns) for row in data]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


class Measure:
    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0
        self.ops = 0

    def __enter__(self) -> Measure:
        gc.collect()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu


# ---------------------------------------------------------------- the engine


def configure_logs(mode: str) -> None:
    """The engine logs one line per operation: keep that cost in, but not the terminal's.

    ``mode`` is ``"json"`` (logs on as ``provisioner sync`` writes them, JSON lines at info
    level, sent to /dev/null) or ``"off"`` (nothing below critical is even formatted).
    """
    import logging

    import structlog

    from provisioner import logs

    if mode == "off":
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
        return
    stderr = sys.stderr
    sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    try:
        logs.configure("info", "json")
    finally:
        sys.stderr = stderr


def run_engine(users: int, concurrency: int, profiler: cProfile.Profile | None = None) -> Measure:
    from provisioner.config import load_config
    from provisioner.store import open_store
    from provisioner.sync import load_target_mapping, sync_target

    data = rows(users)
    measure = Measure()
    with Target() as target, tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        folder = Path(tmp)
        (folder / "users.yaml").write_text(MAPPING, encoding="utf-8")
        write_csv(folder / "hr.csv", data)
        (folder / "config.yaml").write_text(
            f"""state: sqlite:///{folder}/state.db
sources:
  hr: {{type: csv, path: {folder}/hr.csv, key: employee_id}}
targets:
  bench:
    base_url: {target.base_url}
    allow_insecure_http: true
    auth: {{type: bearer, token: "{TOKEN}"}}
    source: hr
    mapping: {folder}/users.yaml
    leaver: disable
    max_concurrency: {concurrency}
    # The leavers are the workload here, not a mistake for the brake to hold.
    max_deprovision: null
    max_deprovision_share: null
""",
            encoding="utf-8",
        )
        config = load_config(folder / "config.yaml")
        engine = open_store(config.state)
        mapping = load_target_mapping(config, "bench")
        expected = {"create": users, "update": len(movers(users)), "disable": len(leavers(users))}

        def cycle(kind: str) -> None:
            if profiler:
                profiler.enable()
            with measure:
                report = asyncio.run(sync_target(engine, config, "bench", mapping))
            if profiler:
                profiler.disable()
            done = report.done[kind]
            if done != expected[kind] or report.failed or report.deferred:
                raise SystemExit(f"engine: {kind} cycle did {dict(report.done)}, {report.summary()}")
            measure.ops += done

        cycle("create")
        for n in movers(users):
            data[n]["title"] = "Principal Engineer"
        write_csv(folder / "hr.csv", data)
        cycle("update")
        for n in leavers(users):
            data[n]["status"] = "terminated"
        write_csv(folder / "hr.csv", data)
        cycle("disable")
        engine.dispose()
    return measure


# ---------------------------------------------------------------- the plain loop


async def _loop(base_url: str, users: int, concurrency: int, measure: Measure) -> None:
    import httpx

    data = rows(users)
    ids: dict[int, str] = {}
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/scim+json"}
    clients = [httpx.AsyncClient(base_url=base_url + "/", headers=headers, timeout=30) for _ in range(concurrency)]

    async def phase(work: list[int], send: Any) -> None:
        queue = list(reversed(work))

        async def worker(http: httpx.AsyncClient) -> None:
            while queue:
                await send(http, queue.pop())

        with measure:
            await asyncio.gather(*(worker(http) for http in clients))
        measure.ops += len(work)

    async def create(http: httpx.AsyncClient, n: int) -> None:
        body = body_of(data[n])
        response = await http.post("Users", json=body)
        answer = response.json()
        if response.status_code != 201 or answer.get("userName") != body["userName"] or not answer.get("id"):
            raise SystemExit(f"loop: POST answered {response.status_code} {response.text[:200]}")
        ids[n] = answer["id"]

    async def move(http: httpx.AsyncClient, n: int) -> None:
        operations = [{"op": "replace", "path": "title", "value": "Principal Engineer"}]
        response = await http.patch(f"Users/{ids[n]}", json={"schemas": [PATCH_OP], "Operations": operations})
        if response.status_code != 200 or response.json().get("title") != "Principal Engineer":
            raise SystemExit(f"loop: PATCH answered {response.status_code} {response.text[:200]}")

    async def leave(http: httpx.AsyncClient, n: int) -> None:
        operations = [{"op": "replace", "path": "active", "value": False}]
        response = await http.patch(f"Users/{ids[n]}", json={"schemas": [PATCH_OP], "Operations": operations})
        if response.status_code != 200 or response.json().get("active") is not False:
            raise SystemExit(f"loop: PATCH answered {response.status_code} {response.text[:200]}")

    try:
        await phase(list(range(users)), create)
        await phase(list(movers(users)), move)
        await phase(list(leavers(users)), leave)
    finally:
        await asyncio.gather(*(http.aclose() for http in clients))


def run_loop(users: int, concurrency: int) -> Measure:
    measure = Measure()
    with Target() as target:
        asyncio.run(_loop(target.base_url, users, concurrency, measure))
    return measure


# ---------------------------------------------------------------- pairs and figures


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=5_000, help="creates per run (default 5000)")
    parser.add_argument("--pairs", type=int, default=3, help="engine/loop pairs per concurrency (default 3)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 16], help="in flight (default 4 16)")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the engine runs here (slows them down)")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.seed)
        return
    configure_logs("json")
    profiler = cProfile.Profile(time.process_time) if args.profile else None  # CPU, not wall: the machine is shared
    ops = args.users + len(movers(args.users)) + len(leavers(args.users))
    print(f"{args.users:,} creates, {len(movers(args.users)):,} movers, {len(leavers(args.users)):,} leavers "
          f"= {ops:,} operations a run; {args.pairs} pairs at each of {args.concurrency} in flight; "
          f"nproc {os.cpu_count()}, Python {'.'.join(map(str, sys.version_info[:3]))}")
    for concurrency in args.concurrency:
        ratios_rate: list[float] = []
        ratios_cpu: list[float] = []
        absolute: dict[str, list[float]] = {"engine ops/s": [], "engine ms CPU/op": [], "loop ops/s": [],
                                            "loop ms CPU/op": [], "load": []}  # fmt: skip
        print(f"\n== {concurrency} in flight ==")
        for pair in range(args.pairs):
            load = os.getloadavg()[0]
            a = run_engine(args.users, concurrency, profiler)
            b = run_loop(args.users, concurrency)
            rate_a, rate_b = a.ops / a.wall, b.ops / b.wall
            cpu_a, cpu_b = a.cpu * 1000 / a.ops, b.cpu * 1000 / b.ops
            ratios_rate.append(rate_a / rate_b)
            ratios_cpu.append(cpu_a / cpu_b)
            for name, value in zip(absolute, (rate_a, cpu_a, rate_b, cpu_b, load), strict=True):
                absolute[name].append(value)
            print(f"pair {pair + 1}: engine {rate_a:6.0f} ops/s {cpu_a:5.2f} ms CPU/op | loop {rate_b:6.0f} ops/s "
                  f"{cpu_b:5.2f} ms CPU/op | ratio ops/s {ratios_rate[-1]:.2f}, CPU/op {ratios_cpu[-1]:.2f} "
                  f"| load {load:.1f}→{os.getloadavg()[0]:.1f}", flush=True)
        print(f"engine ÷ loop at {concurrency} in flight: ops/s {spread(ratios_rate)}, "
              f"client CPU per op {spread(ratios_cpu)}", flush=True)
        print("  absolute: " + ", ".join(f"{name} {spread(values, '{:.0f}' if 'ops' in name else '{:.2f}')}"
                                         for name, values in absolute.items()), flush=True)
    if profiler and args.profile:
        profiler.dump_stats(args.profile)
        print(f"\nprofile of the engine runs written to {args.profile}; top 30 by own time:")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
