"""The crash run at a size that fits the suite: a real daemon killed three times with kill -9 behind 20 % faults.

See :mod:`tests.crashrun`; ``benchmarks/crash_run.py`` runs it at 2,000 users and prints its figures.
"""

from __future__ import annotations

from pathlib import Path

from tests.crashrun import crash_run


def test_kill_9_three_times_behind_20_percent_faults_ends_in_the_desired_state_or_a_failed_row(tmp_path: Path) -> None:
    figures = crash_run(tmp_path, users=150, rate=0.2, kills=3, broken=3, seed=11)
    report = "\n".join(figures.lines())

    assert figures.kills == 3 and figures.kills_mid_work >= 1, report
    assert sum(figures.faults.values()) > 0.1 * figures.requests, report
    assert figures.duplicates == [], report
    assert figures.unexplained == [], f"{report}\n{figures.unexplained}"
    assert figures.open_rows == {}, report
    assert figures.failed_rows, "the broken users fail, each alone"
    assert all("400" in error for _, _, error in figures.failed_rows), figures.failed_rows
