"""The shape every worker service shares: a handler per command name, dead letters recorded in the log."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg

from kneo_events.kernel import Kernel
from kneo_events.schemas import Command

Handler = Callable[[Command, Msg], Awaitable[None]]


class WorkerService:
    """Base of the worker services: dispatches commands by name to ``handlers``; unknown names are logged and acked.

    Subclasses set ``name`` and fill ``handlers`` in ``__init__``.
    """

    name = "worker"

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.log = logging.getLogger(f"kneo.{self.name}")
        self.handlers: dict[str, Handler] = {}

    async def start(self) -> None:
        """Start what the service runs besides its command consumer (request/reply handlers); none by default."""

    async def stop(self) -> None:
        """Stop what :meth:`start` started; nothing by default."""

    async def handle(self, cmd: Command, msg: Msg) -> None:
        """Handle one command (return = ack, raise = retry with backoff)."""
        handler = self.handlers.get(cmd.name)
        if handler is None:
            self.log.warning("%s service has no handler for %s (%s); acknowledged", self.name, cmd.name, cmd.command_id)
            return
        await handler(cmd, msg)

    async def dead_letter(self, cmd: Command, msg: Msg, exc: BaseException) -> None:
        """Record a command that kept failing (its run fails instead of waiting forever)."""
        await self.kernel.dead_letter(cmd, msg.metadata.num_delivered, exc)
