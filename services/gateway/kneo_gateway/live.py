"""Live fan-out of run events and output chunks from NATS to the SSE clients and waiters of this process.

One core subscription per subject family per gateway process; each client has a bounded queue. A client that
can't keep up is marked ``lagged`` instead of slowing anyone down: it re-reads the events it missed from Postgres
(the output chunks it missed are gone, they are ephemeral by design).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

from nats.aio.msg import Msg

from kneo_events.bus import Bus
from kneo_events.schemas import loads


class Listener:
    """One consumer of one run's live items: ``("event", wire)`` or ``("chunk", chunk)``."""

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(maxsize=size)
        self.lagged = False

    def push(self, item: tuple[str, dict[str, Any]]) -> None:
        """Deliver without ever blocking the hub; overflow marks the listener lagged."""
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.lagged = True


class LiveHub:
    """Routes live bus messages to the listeners of each run."""

    def __init__(self, bus: Bus, buffer: int) -> None:
        self.bus = bus
        self.buffer = buffer
        self.listeners: dict[str, set[Listener]] = {}
        self._subs: list[Any] = []
        self._evt_prefix = bus.subject("kneo.evt.run.")
        self._out_prefix = bus.subject("kneo.out.")

    def on_local_commit(self, events: list[Any]) -> None:
        """Events committed by this very process: deliver them now (the bus copy arrives later, de-duplicated)."""
        if not self.listeners:
            return
        for ev in events:
            run_id = ev.stream_id.removeprefix("run-")
            targets = self.listeners.get(run_id) if ev.stream_id.startswith("run-") else None
            if targets:
                wire = ev.wire()
                for listener in list(targets):
                    listener.push(("event", wire))

    async def start(self) -> None:
        """Subscribe to every run's events and output."""
        self._subs.append(await self.bus.subscribe_core("kneo.evt.run.>", self._on_event))
        self._subs.append(await self.bus.subscribe_core("kneo.out.>", self._on_output))

    async def stop(self) -> None:
        """Unsubscribe."""
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()

    async def _on_event(self, msg: Msg) -> None:
        run_id = msg.subject[len(self._evt_prefix) :].split(".", 1)[0]
        targets = self.listeners.get(run_id)
        if targets:
            wire = loads(msg.data)
            for listener in list(targets):
                listener.push(("event", wire))

    async def _on_output(self, msg: Msg) -> None:
        run_id = msg.subject[len(self._out_prefix) :]
        targets = self.listeners.get(run_id)
        if targets:
            chunk = loads(msg.data)
            for listener in list(targets):
                listener.push(("chunk", chunk))

    @contextlib.contextmanager
    def listen(self, run_id: str) -> Iterator[Listener]:
        """Register a listener for one run for the duration of the block."""
        listener = Listener(self.buffer)
        self.listeners.setdefault(run_id, set()).add(listener)
        try:
            yield listener
        finally:
            group = self.listeners.get(run_id)
            if group is not None:
                group.discard(listener)
                if not group:
                    del self.listeners[run_id]
