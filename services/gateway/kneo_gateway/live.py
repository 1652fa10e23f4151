"""Live fan-out of run events and output chunks from NATS to the SSE clients and waiters of this process.

A run gets a NATS subscription (its events and its output) while at least one client of this process listens to
it, shared by all of them; each client has a bounded queue. A client that can't keep up is marked ``lagged``
instead of slowing anyone down: it re-reads the events it missed from Postgres (the output chunks it missed are
gone, they are ephemeral by design). Events committed by this very process arrive at once through
``on_local_commit`` as well; listeners de-duplicate by stream version.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

from nats.aio.msg import Msg

from kneo_events import subjects
from kneo_events.bus import Bus
from kneo_events.schemas import RecordedEvent, loads


class Listener:
    """One consumer of one run's live items: ``("event", wire)`` or ``("chunk", chunk)``.

    ``event_types``: when given, only events of those types are delivered, and no chunks (a waiter).
    """

    def __init__(self, size: int, event_types: frozenset[str] | None = None) -> None:
        self.queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(maxsize=size)
        self.lagged = False
        self.event_types = event_types

    def push(self, kind: str, item: dict[str, Any]) -> None:
        """Deliver without ever blocking the hub; overflow marks the listener lagged."""
        if self.event_types is not None and (kind != "event" or item.get("type") not in self.event_types):
            return
        try:
            self.queue.put_nowait((kind, item))
        except asyncio.QueueFull:
            self.lagged = True


class _RunTopic:
    def __init__(self) -> None:
        self.listeners: set[Listener] = set()
        self.subs: list[Any] = []
        self.ready = asyncio.Event()


class LiveHub:
    """Routes live bus messages to the listeners of each run."""

    def __init__(self, bus: Bus, buffer: int) -> None:
        self.bus = bus
        self.buffer = buffer
        self.topics: dict[str, _RunTopic] = {}
        # Waiters for a run's own milestones (run.succeeded, run.failed, …) share one subscription to every run's
        # ``run.*`` events (a few per run), so a sync request costs no subscribe/flush round trip of its own.
        self.waiters: dict[str, set[Listener]] = {}
        self._lifecycle_sub: Any = None
        self._human_sub: Any = None
        self._lifecycle_prefix = ""

    async def start(self) -> None:
        """Subscribe to every run's lifecycle events (``kneo.evt.run.*.run.*``) for waiters."""
        self._lifecycle_prefix = self.bus.subject("kneo.evt.run.")
        self._lifecycle_sub = await self.bus.subscribe_core("kneo.evt.run.*.run.*", self._on_lifecycle)
        self._human_sub = await self.bus.subscribe_core("kneo.evt.run.*.human.requested", self._on_lifecycle)

    async def stop(self) -> None:
        """Drop every subscription."""
        for topic in self.topics.values():
            await self._unsubscribe(topic)
        self.topics.clear()
        for sub in (self._lifecycle_sub, self._human_sub):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        self._lifecycle_sub = self._human_sub = None

    async def _on_lifecycle(self, msg: Msg) -> None:
        run_id = msg.subject[len(self._lifecycle_prefix) :].split(".", 1)[0]
        targets = self.waiters.get(run_id)
        if targets:
            wire = loads(msg.data)
            for listener in list(targets):
                listener.push("event", wire)

    @contextlib.contextmanager
    def wait_for(self, run_id: str, event_types: frozenset[str]) -> Iterator[Listener]:
        """Hear of a run's lifecycle events (``run.*`` and ``human.requested``) for the duration of the block."""
        listener = Listener(self.buffer, event_types)
        self.waiters.setdefault(run_id, set()).add(listener)
        try:
            yield listener
        finally:
            group = self.waiters.get(run_id)
            if group is not None:
                group.discard(listener)
                if not group:
                    del self.waiters[run_id]

    def on_local_commit(self, events: list[RecordedEvent]) -> None:
        """Events committed by this process: deliver them now (the bus copy arrives later, de-duplicated)."""
        if not self.topics and not self.waiters:
            return
        for ev in events:
            if not ev.stream_id.startswith("run-"):
                continue
            run_id = ev.stream_id[4:]
            targets = [*(self.topics[run_id].listeners if run_id in self.topics else ()), *self.waiters.get(run_id, ())]
            if targets:
                wire = ev.wire()
                for listener in targets:
                    listener.push("event", wire)

    @contextlib.asynccontextmanager
    async def listen(self, run_id: str, event_types: frozenset[str] | None = None) -> AsyncIterator[Listener]:
        """Listen to one run for the duration of the block; the subscription is in place when the block starts."""
        listener = Listener(self.buffer, event_types)
        topic = self.topics.get(run_id)
        if topic is None:
            topic = self.topics[run_id] = _RunTopic()
            topic.listeners.add(listener)
            try:
                await self._subscribe(run_id, topic)
                topic.ready.set()
            except BaseException:
                del self.topics[run_id]
                await self._unsubscribe(topic)
                raise
        else:
            topic.listeners.add(listener)
            await asyncio.wait_for(topic.ready.wait(), timeout=10)  # the first listener's subscription is in place
        try:
            yield listener
        finally:
            topic.listeners.discard(listener)
            if not topic.listeners and self.topics.get(run_id) is topic:
                del self.topics[run_id]
                await self._unsubscribe(topic)

    async def _subscribe(self, run_id: str, topic: _RunTopic) -> None:
        def deliver(kind: str) -> Any:
            async def cb(msg: Msg) -> None:
                item = loads(msg.data)
                for listener in list(topic.listeners):
                    listener.push(kind, item)

            return cb

        topic.subs.append(await self.bus.subscribe_core(subjects.stream_events("run", run_id), deliver("event")))
        topic.subs.append(await self.bus.subscribe_core(subjects.run_output(run_id), deliver("chunk")))
        await self.bus.nc.flush(timeout=5)  # the server has our subscriptions before we read history

    @staticmethod
    async def _unsubscribe(topic: _RunTopic) -> None:
        for sub in topic.subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        topic.subs.clear()
