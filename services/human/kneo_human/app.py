"""The human service: human-in-the-loop tasks (the task features arrive with the human-tasks issue).

Today it declares its durable consumer, acknowledges commands (none are defined for it yet) and stops cleanly.
"""

from __future__ import annotations

from kneo_events.service import WorkerService

SERVICE = "human"


class HumanService(WorkerService):
    """Consumes ``kneo.cmd.human.*``."""

    name = SERVICE
