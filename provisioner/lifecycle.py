"""The lifecycle's words, shared by the planner, the queue and the command line.

Plain constants with no import of the engine: the command line lists them as choices
(``queue list --status``, ``--reason``) while ``provisioner --help`` stays fast.
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
