"""The audit service: keeps the redacted ``audit_events`` projection of the log (``GET /v1/audit-events``).

It reads the log itself (the gap-free ``read_all`` order, from its saved position), so a record can't be lost to a
missed bus message and a restart resumes where it stopped. The bus only wakes it: it listens to the subjects of the
audited event types and does a pass as soon as one is published, and at least every
``KNEO_AUDIT_POLL_INTERVAL_SECONDS``. Several copies are safe: one projects at a time (an advisory lock).
"""

from __future__ import annotations

import asyncio
import contextlib

from nats.aio.msg import Msg

from kneo_audit.projection import AUDITED, catch_up
from kneo_events.kernel import Kernel
from kneo_events.service import WorkerService

SERVICE = "audit"
# An event published just after commit can still sit behind an older transaction that is running (read_all stops
# there): when a wake-up finds nothing new, look again shortly, a few times.
_RETRY_DELAYS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
# After a pass, wake-ups are gathered this long: one pass then takes many events (a busy platform wakes the service
# for every run), which keeps the projection's cost per run small at the price of this much lag.
_COALESCE_SECONDS = 0.05


class AuditService(WorkerService):
    """Projects audited events into ``audit_events``; no commands."""

    name = SERVICE

    def __init__(self, kernel: Kernel) -> None:
        super().__init__(kernel)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._subs: list[object] = []

    async def start(self) -> None:
        """Listen for audited events and start the projection loop."""

        async def wake(_msg: Msg) -> None:
            self._wake.set()

        for event_type in AUDITED:
            self._subs.append(await self.kernel.bus.subscribe_core(f"kneo.evt.*.*.{event_type}", wake))
        self._task = asyncio.create_task(self._loop(), name="audit-projection")

    async def stop(self) -> None:
        """Stop the loop and the subscriptions."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()  # type: ignore[attr-defined]
        self._subs.clear()

    async def _loop(self) -> None:
        interval = self.kernel.settings.audit_poll_interval_seconds
        while True:
            woken = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()
                    woken = True
            self._wake.clear()
            try:
                read = await catch_up(self.kernel.store)
                if woken and not read:
                    for delay in _RETRY_DELAYS:
                        await asyncio.sleep(delay)
                        if await catch_up(self.kernel.store):
                            break
            except Exception:
                self.log.exception("audit projection pass failed; retrying on the next pass")
            if woken:
                await asyncio.sleep(_COALESCE_SECONDS)
