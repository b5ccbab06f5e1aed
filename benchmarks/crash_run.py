"""The crash run at full size: 2,000 users, 20 % mixed faults, 3 × kill -9 of a real daemon, then cycles until nothing is due.

Prints its figures (faults injected, kills, operations, differences, failed
rows) and exits 1 if a duplicate, an unexplained difference or an open row is
left. Run from the repository root:

    .venv/bin/python benchmarks/crash_run.py
    .venv/bin/python benchmarks/crash_run.py --users 500 --rate 0.3 --seed 4

What it does is described in ``tests/crashrun.py`` (the suite runs the same at
150 users, ``tests/integration/test_crash.py``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402 - after the path is set

from tests.crashrun import crash_run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=0.2, help="share of requests given a fault")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--broken", type=int, default=5, help="users whose writes the target always refuses")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="work in this folder (kept) instead of a temporary one")
    args = parser.parse_args()
    # The cycles in this process log nothing; the daemon's log is daemon.log in the work folder.
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    with tempfile.TemporaryDirectory(prefix="crash-run-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        figures = crash_run(
            folder, users=args.users, rate=args.rate, kills=args.kills, broken=args.broken, seed=args.seed
        )
    print("\n".join(figures.lines()))
    for key, kind, error in figures.failed_rows:
        print(f"  failed: {key} {kind}: {error[:120]}")
    for key, what in figures.unexplained:
        print(f"  unexplained: {key}: {what}")
    return 1 if figures.duplicates or figures.unexplained or figures.open_rows else 0


if __name__ == "__main__":
    sys.exit(main())
