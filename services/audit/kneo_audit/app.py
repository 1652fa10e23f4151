"""The audit service: the redacted audit projection (arrives with the audit issue).

Today it declares its durable consumer, acknowledges commands (none are defined for it yet) and stops cleanly.
"""

from __future__ import annotations

from kneo_events.service import WorkerService

SERVICE = "audit"


class AuditService(WorkerService):
    """Consumes ``kneo.cmd.audit.*``."""

    name = SERVICE
