"""The audit service: the redacted audit projection. This slice declares its consumer and acknowledges commands."""

from __future__ import annotations

import logging

from nats.aio.msg import Msg

from kneo_events.kernel import Kernel
from kneo_events.schemas import Command

log = logging.getLogger("kneo.audit")
SERVICE = "audit"


class AuditService:
    """Consumes ``kneo.cmd.audit.*`` (the audit projection arrives with the audit issue)."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    async def handle(self, cmd: Command, msg: Msg) -> None:
        """No command is defined for this service yet: log and acknowledge."""
        log.warning("audit service: no handler for %s (%s); acknowledged", cmd.name, cmd.command_id)

    async def dead_letter(self, cmd: Command, msg: Msg, exc: BaseException) -> None:
        """Record a command that kept failing."""
        await self.kernel.dead_letter(cmd, msg.metadata.num_delivered, exc)
