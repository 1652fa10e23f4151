"""The webhooks service: signed delivery of run and job endings to subscribers, with retries (docs/webhooks.md).

Two loops, like the audit service's one:

* **intents** (:mod:`kneo_webhooks.intents`) follows the log from its saved position and records one delivery row
  per subscribed webhook for every terminal run event (``run.*``, and ``job.*`` for a job). The bus only wakes it:
  it listens to the terminal events' subjects, and looks at least every ``KNEO_WEBHOOKS_POLL_INTERVAL_SECONDS``.
  One copy advances it at a time (an advisory lock).
* **sender** (:mod:`kneo_webhooks.delivery`) leases due deliveries and attempts them, up to
  ``KNEO_WEBHOOKS_CONCURRENCY`` at once; every copy sends, none sends a delivery another one holds.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
from nats.aio.msg import Msg

from kneo_events.kernel import Kernel
from kneo_events.sealing import load_keyring
from kneo_events.service import WorkerService
from kneo_webhooks.delivery import Sender
from kneo_webhooks.intents import RUN_TERMINAL_EVENTS, catch_up

SERVICE = "webhooks"
# An event published just after commit can still sit behind an older transaction that is running (read_all stops
# there): when a wake-up finds nothing new, look again shortly, a few times (as the audit service does).
_RETRY_DELAYS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
# After a pass, wake-ups are gathered this long, so a busy platform costs one pass per window, not one per run.
_COALESCE_SECONDS = 0.05


class WebhooksService(WorkerService):
    """Records delivery intents from the log and sends them; no commands."""

    name = SERVICE

    def __init__(self, kernel: Kernel) -> None:
        super().__init__(kernel)
        self._wake_intents = asyncio.Event()
        self._wake_sender = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[object] = []
        self._client: httpx.AsyncClient | None = None
        self.sender: Sender | None = None
        self._any_webhook = True  # refreshed on every pass of the intents loop

    async def start(self) -> None:
        """Load the sealing keys, listen for run endings, start both loops."""
        s = self.kernel.settings
        secret_key = s.webhooks_secret_key.get_secret_value() if s.webhooks_secret_key else None
        keyring = await asyncio.to_thread(load_keyring, secret_key, s.data_dir)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(s.webhooks_timeout_seconds),
            follow_redirects=False,  # a redirect could point anywhere, private networks included
            trust_env=False,  # no proxy from the environment: the address we check is the one we connect to
            limits=httpx.Limits(max_connections=s.webhooks_concurrency, max_keepalive_connections=8),
        )
        self.sender = Sender(self.kernel.store, s, keyring, self._client)

        async def wake(_msg: Msg) -> None:
            if self._any_webhook:  # with none registered, the poll alone keeps the position moving
                self._wake_intents.set()

        for event_type in sorted(RUN_TERMINAL_EVENTS):
            self._subs.append(await self.kernel.bus.subscribe_core(f"kneo.evt.*.*.{event_type}", wake))
        self._tasks.append(asyncio.create_task(self._intents_loop(), name="webhooks-intents"))
        self._tasks.append(asyncio.create_task(self._send_loop(), name="webhooks-sender"))

    async def stop(self) -> None:
        """Stop both loops (an attempt in flight records its interruption), the subscriptions and the client."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()  # type: ignore[attr-defined]
        self._subs.clear()
        if self._client is not None:
            await self._client.aclose()

    async def _intents_loop(self) -> None:
        interval = self.kernel.settings.webhooks_poll_interval_seconds
        while True:
            woken = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake_intents.wait()
                    woken = True
            self._wake_intents.clear()
            try:
                self._any_webhook = bool(
                    await self.kernel.store.pool.fetchval(
                        "SELECT EXISTS (SELECT 1 FROM webhooks WHERE status = 'active')"
                    )
                )
                read, recorded = await catch_up(self.kernel.store)
                if woken and not read:
                    for delay in _RETRY_DELAYS:
                        await asyncio.sleep(delay)
                        read, recorded = await catch_up(self.kernel.store)
                        if read:
                            break
                if recorded:
                    self._wake_sender.set()
            except Exception:
                self.log.exception("webhook intents pass failed; retrying on the next pass")
            if woken:
                await asyncio.sleep(_COALESCE_SECONDS)

    async def _send_loop(self) -> None:
        assert self.sender is not None
        sender = self.sender
        s = self.kernel.settings
        while True:
            wait = s.webhooks_poll_interval_seconds
            try:
                await sender.sweep()
                claimed = await sender.claim(s.webhooks_concurrency)
                if claimed:
                    await asyncio.gather(*(sender.attempt(c) for c in claimed))
                    continue
                due = await sender.seconds_until_due()
                if due is not None:
                    wait = min(wait, max(due, 0.02))  # never a busy loop on a row it cannot take
            except Exception:
                self.log.exception("webhook send pass failed; retrying on the next pass")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake_sender.wait()
            self._wake_sender.clear()
