"""The lifecycle's words, shared by the planner, the queue and the command line.

Plain constants with no import of the engine: the command line lists them as choices
(``queue list --status``, ``--reason``) while ``provisioner --help`` stays fast. The exit
codes are here for the same reason: the command line and ``provisioner.health`` share them.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why, in the lifecycle's words."""

    JOINER = "joiner"
    MOVER = "mover"
    LEAVER = "leaver"
    REHIRE = "rehire"
    # What reading the target back found (provisioner.reconcile), not a change in the source.
    RECONCILE = "reconcile"


# Where a queue row is in its life (DESIGN.md, "The flow of one cycle").
STATUSES = (
    "pending", "running", "retry_wait", "held", "succeeded", "failed", "resolved", "cancelled", "superseded",
)  # fmt: skip


# Exit codes of the command line (README, "Exit codes"). 0, 4 and 5 are what the targets' health
# says at the end of ``sync`` and ``status`` (provisioner.health.exit_code).
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_NOT_OK = 4  # operations failed or wait for a retry, or a target is paused or quarantined
EXIT_SAFETY_STOP = 5  # a refused cycle, or operations held by a brake
# What a shell reports for a command whose reader closed the pipe (128 + SIGPIPE).
EXIT_BROKEN_PIPE = 141
