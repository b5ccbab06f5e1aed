"""Benchmark: CPU of starting the command line — ``--help``, ``status``, ``check`` — against the bare interpreter.

Prints the median and min–max CPU (user + system, of the child process) of N runs of each
command, run in interleaved rounds (A B C … A B C …) so that a busy machine weighs on all of
them alike; asserts nothing. Run from the repository root:

    .venv/bin/python benchmarks/bench_startup.py
    .venv/bin/python benchmarks/bench_startup.py --runs 31

``status`` and ``check`` run against a throwaway config (a CSV source, one target on an
address where nothing listens: neither command talks to the target) in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """state: sqlite:///state.db
sources:
  hr:
    type: csv
    path: {root}/examples/hr.csv
    key: employee_id
targets:
  app:
    base_url: http://127.0.0.1:9/scim/v2
    allow_insecure_http: true
    auth: {{type: bearer, token: "${{BENCH_TOKEN}}"}}
    source: hr
    mapping: {root}/mappings/users.yaml
    leaver: disable
"""


def cpu_of(argv: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Seconds of CPU (user + system) the child spent, from the rusage of waited-for children."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="runs of each command (default 15)")
    args = parser.parse_args()

    python = sys.executable
    commands = {
        "python -c pass": [python, "-c", "pass"],
        "provisioner --help": [python, "-m", "provisioner", "--help"],
        "provisioner sync --help": [python, "-m", "provisioner", "sync", "--help"],
        "provisioner status": [python, "-m", "provisioner", "status", "--log-format", "json"],
        "provisioner check": [python, "-m", "provisioner", "check", "--log-format", "json"],
    }
    with tempfile.TemporaryDirectory() as folder:
        cwd = Path(folder)
        (cwd / "config.yaml").write_text(CONFIG.format(root=ROOT), encoding="utf-8")
        env = {**os.environ, "BENCH_TOKEN": "bench-token-not-a-secret", "PYTHONPATH": str(ROOT)}
        cpu_of(commands["provisioner status"], cwd, env)  # creates the state database, warms the caches
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, argv in commands.items():
                times[name].append(cpu_of(argv, cwd, env))

    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"{args.runs} interleaved runs each")  # fmt: skip
    print(f"{'command':<26}{'CPU median':>12}  min–max")
    for name, samples in times.items():
        print(f"{name:<26}{statistics.median(samples):>10.3f} s  {min(samples):.3f}–{max(samples):.3f} s")


if __name__ == "__main__":
    main()
