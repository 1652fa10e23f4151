"""The bus: NATS JetStream streams, durable pull consumers, publishing.

We drive nats-py directly (rather than through FastStream's subscriber decorators) because the hot path needs
batched pulls with a per-message ack decided *after* the handler's events commit, ``nak(delay)`` for backoff,
in-progress acks for long steps and our own dead-letter step; see docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, NotFoundError

from kneo_events import subjects
from kneo_events.errors import NotReady
from kneo_events.schemas import Command, RecordedEvent, dumps, loads
from kneo_events.settings import Settings

log = logging.getLogger("kneo.bus")

CommandHandler = Callable[[Command, Msg], Awaitable[None]]


@dataclass(frozen=True)
class StreamNames:
    """The JetStream stream names (prefixed when several platforms share one server)."""

    commands: str
    events: str
    output: str

    @classmethod
    def from_prefix(cls, prefix: str) -> StreamNames:
        """Names with an optional prefix (tests give each session its own)."""
        p = f"{prefix}_" if prefix else ""
        return cls(p + subjects.COMMANDS_STREAM, p + subjects.EVENTS_STREAM, p + subjects.OUTPUT_STREAM)


class Bus:
    """One NATS connection per process, with JetStream."""

    def __init__(self, nc: NATS, js: JetStreamContext, settings: Settings) -> None:
        self.nc = nc
        self.js = js
        self.settings = settings
        self.names = StreamNames.from_prefix(settings.bus_prefix)
        self.subject_prefix = f"{settings.bus_prefix}." if settings.bus_prefix else ""

    @classmethod
    async def connect(cls, settings: Settings, name: str = "kneo") -> Bus:
        """Connect to ``settings.nats_url`` (bounded) and declare the streams."""
        assert settings.nats_url, "nats_url must be resolved before connecting"
        try:
            nc = await asyncio.wait_for(
                nats.connect(
                    settings.nats_url,
                    name=name,
                    connect_timeout=5,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    allow_reconnect=True,
                ),
                timeout=settings.nats_connect_timeout_seconds,
            )
        except (TimeoutError, OSError, nats.errors.NoServersError) as exc:
            raise ConnectionError(
                f"cannot reach NATS at {settings.nats_url} within {settings.nats_connect_timeout_seconds:g}s "
                f"({type(exc).__name__}); check KNEO_NATS_URL"
            ) from None
        bus = cls(nc, nc.jetstream(timeout=10), settings)
        await bus.ensure_streams()
        return bus

    async def close(self) -> None:
        """Drain and close the connection (bounded)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nc.drain(), timeout=5)

    def subject(self, raw: str) -> str:
        """Apply the platform's subject prefix."""
        return self.subject_prefix + raw

    # ----------------------------------------------------------------- declaration

    async def ensure_streams(self) -> None:
        """Create or update KNEO_COMMANDS, KNEO_EVENTS and KNEO_OUTPUT (idempotent)."""
        s = self.settings
        configs = [
            api.StreamConfig(
                name=self.names.commands,
                subjects=[self.subject("kneo.cmd.>")],
                retention=api.RetentionPolicy.WORK_QUEUE,
                storage=api.StorageType.FILE,
                duplicate_window=120.0,
                num_replicas=s.stream_replicas,
            ),
            api.StreamConfig(
                name=self.names.events,
                subjects=[self.subject("kneo.evt.>")],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                max_age=s.events_max_age_days * 86400.0,
                duplicate_window=120.0,
                num_replicas=s.stream_replicas,
            ),
            api.StreamConfig(
                name=self.names.output,
                subjects=[self.subject("kneo.out.>")],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.MEMORY,
                max_age=s.output_max_age_seconds,
                num_replicas=s.stream_replicas,
            ),
        ]
        for cfg in configs:
            try:
                await self.js.add_stream(cfg)
            except BadRequestError:
                await self.js.update_stream(cfg)

    def consumer_name(self, service: str) -> str:
        """The durable consumer of one service's commands."""
        return f"{self.settings.bus_prefix + '_' if self.settings.bus_prefix else ''}kneo-{service}"

    async def ensure_consumer(self, service: str) -> None:
        """Create the service's durable pull consumer (shared by all its copies)."""
        cfg = api.ConsumerConfig(
            durable_name=self.consumer_name(service),
            filter_subject=self.subject(subjects.service_commands(service)),
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.settings.command_ack_wait_seconds,
            max_deliver=-1,  # the handler dead-letters after command_max_deliveries, see consume()
            max_ack_pending=10_000,
            deliver_policy=api.DeliverPolicy.ALL,
        )
        try:
            await self.js.add_consumer(self.names.commands, cfg)
        except BadRequestError:
            log.debug("consumer %s exists", cfg.durable_name)

    # ----------------------------------------------------------------- publishing

    async def publish_command(self, cmd: Command, msg_id: str | None = None) -> None:
        """Publish a command; JetStream de-duplicates on ``msg_id`` (default: the command id)."""
        await self.js.publish(
            self.subject(subjects.command(cmd.service, cmd.name)),
            dumps(cmd),
            stream=self.names.commands,
            headers={"Nats-Msg-Id": msg_id or cmd.command_id},
        )

    def event_subject(self, ev: RecordedEvent) -> str:
        """The subject of one committed event."""
        stype, key = subjects.split_stream_id(ev.stream_id)
        return self.subject(subjects.event(stype, key, ev.type))

    async def publish_events(self, events: Sequence[RecordedEvent]) -> None:
        """Publish committed events (``Nats-Msg-Id = event_id``) and wait for every ack."""
        futures = [
            await self.js.publish_async(
                self.event_subject(ev),
                dumps(ev.wire()),
                headers={"Nats-Msg-Id": str(ev.event_id)},
                wait_stall=5.0,
            )
            for ev in events
        ]
        if futures:
            await asyncio.wait_for(asyncio.gather(*futures), timeout=10)

    async def publish_events_nowait(self, events: Sequence[RecordedEvent]) -> list[asyncio.Future[Any]]:
        """Publish committed events without waiting; returns the futures of their JetStream acks."""
        return [
            await self.js.publish_async(
                self.event_subject(ev),
                dumps(ev.wire()),
                headers={"Nats-Msg-Id": str(ev.event_id)},
                wait_stall=5.0,
            )
            for ev in events
        ]

    async def publish_output(self, run_id: str, chunk: dict[str, object]) -> None:
        """Publish an ephemeral output chunk (no ack wait: chunks are best-effort by design)."""
        await self.nc.publish(self.subject(subjects.run_output(run_id)), dumps(chunk))

    # ----------------------------------------------------------------- consuming

    async def consume(
        self,
        service: str,
        handler: CommandHandler,
        on_dead_letter: Callable[[Command, Msg, BaseException], Awaitable[None]],
        stop: asyncio.Event,
    ) -> None:
        """Pull commands in batches and run ``handler`` on each, concurrently (bounded).

        The handler's outcome decides the ack: return → ack; raise → nak with exponential backoff; past
        ``command_max_deliveries`` → ``on_dead_letter`` records a failure event and the command is acked, so a
        poison command never blocks the queue.
        """
        await self.ensure_consumer(service)
        puller = _Puller(self, service)
        await puller.start()
        limit = self.settings.consumer_concurrency
        inflight = 0
        idle = asyncio.Event()
        idle.set()

        def done(_: object) -> None:
            nonlocal inflight
            inflight -= 1
            if inflight < limit:
                idle.set()

        tasks: set[asyncio.Task[None]] = set()
        try:
            while not stop.is_set():
                if inflight >= limit:  # back-pressure: pull no more than we can work on
                    idle.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await idle.wait()
                    continue
                await puller.request(limit - inflight)
                msg = await puller.next(timeout=0.5)
                if msg is None:
                    continue
                inflight += 1
                task = asyncio.create_task(self._handle(msg, handler, on_dead_letter))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                task.add_done_callback(done)
        finally:
            await puller.close()
            if tasks:  # let handlers in flight finish (bounded), then stop them: their messages are redelivered
                _, late = await asyncio.wait(set(tasks), timeout=self.settings.shutdown_grace_seconds)
                for task in late:
                    task.cancel()
                if late:
                    log.warning("%s: %d handlers still running at shutdown were cancelled", service, len(late))
                    await asyncio.wait(late, timeout=5)

    async def _handle(
        self,
        msg: Msg,
        handler: CommandHandler,
        on_dead_letter: Callable[[Command, Msg, BaseException], Awaitable[None]],
    ) -> None:
        try:
            try:
                cmd = Command.model_validate(loads(msg.data))
            except Exception as exc:  # unparseable: nothing can ever handle it
                log.error("dropping malformed command on %s: %s", msg.subject, exc)
                await msg.term()
                return
            try:
                await handler(cmd, msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                deliveries = msg.metadata.num_delivered
                if deliveries >= self.settings.command_max_deliveries:
                    log.error("dead-lettering %s after %d deliveries: %r", cmd.command_id, deliveries, exc)
                    try:
                        await on_dead_letter(cmd, msg, exc)
                    except Exception:  # not recorded: keep the message, it comes back after a pause
                        log.exception("could not record the dead letter of %s; retrying later", cmd.command_id)
                        await msg.nak(delay=self.settings.command_retry_backoff_seconds * 8)
                        return
                    await msg.ack()
                else:
                    delay = self.settings.command_retry_backoff_seconds * (2 ** (deliveries - 1))
                    log.warning(
                        "command %s failed (delivery %d), retry in %.2fs: %r",
                        cmd.command_id,
                        deliveries,
                        delay,
                        exc,
                    )
                    await msg.nak(delay=delay)
                return
            if not msg._ackd:  # the handler may have acked/nakked itself
                await msg.ack()
        except Exception:
            log.exception("ack failed for %s", msg.subject)

    @contextlib.asynccontextmanager
    async def keep_alive(self, msg: Msg, interval: float) -> AsyncIterator[None]:
        """Send in-progress acks every ``interval`` seconds while the block runs (long steps)."""

        async def beat() -> None:
            while True:
                await asyncio.sleep(interval)
                with contextlib.suppress(Exception):
                    await msg.in_progress()

        task = asyncio.create_task(beat())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def serve_requests(self, service: str, cb: Callable[[Msg], Awaitable[None]]) -> object:
        """Answer ``kneo.rpc.<service>.*`` requests; every copy of the service joins one queue group."""
        return await self.nc.subscribe(
            self.subject(subjects.service_rpc(service)), queue=self.consumer_name(service), cb=cb
        )

    async def request(self, service: str, operation: str, payload: Any, timeout: float) -> Any:
        """Call a service (request/reply, bounded); raises ``NotReady`` when no copy answers in time."""
        try:
            reply = await self.nc.request(
                self.subject(subjects.rpc(service, operation)), dumps(payload), timeout=timeout
            )
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, TimeoutError) as exc:
            raise NotReady(
                f"the {service} service did not answer within {timeout:g}s ({type(exc).__name__})", service=service
            ) from None
        return loads(reply.data)

    async def subscribe_core(self, subject: str, cb: Callable[[Msg], Awaitable[None]]) -> object:
        """A plain (non-JetStream) subscription, for live fan-out to SSE clients."""
        return await self.nc.subscribe(self.subject(subject), cb=cb)


class _Puller:
    """A continuous pull on one durable consumer: messages are handed out as they arrive, never held back.

    (nats-py's ``fetch`` waits to fill its batch once it has a first message, which holds that message for up
    to the fetch timeout.) We keep at most ``want`` messages requested ahead, as pull requests that expire after
    a few seconds; the server's 404/408 status replies tell how many of a request went unused.
    """

    EXPIRES = 5.0

    def __init__(self, bus: Bus, service: str) -> None:
        self.bus = bus
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{bus.names.commands}.{bus.consumer_name(service)}"
        self.inbox = bus.nc.new_inbox()
        self.queue: asyncio.Queue[Msg] = asyncio.Queue()
        self.pending = 0  # requested, not yet delivered nor expired
        self.last_request = 0.0
        self.sub: Any = None

    async def start(self) -> None:
        async def on_msg(msg: Msg) -> None:
            self.queue.put_nowait(msg)

        self.sub = await self.bus.nc.subscribe(self.inbox, cb=on_msg)

    async def close(self) -> None:
        """Stop pulling; messages delivered to us but not handed out go back to the queue at once."""
        with contextlib.suppress(Exception):
            await self.sub.unsubscribe()
        while not self.queue.empty():
            msg = self.queue.get_nowait()
            if msg.headers and msg.headers.get("Status"):
                continue
            with contextlib.suppress(Exception):
                await msg.nak()

    async def request(self, want: int) -> None:
        """Top the outstanding pull requests up to ``want`` messages (in batches, not one by one)."""
        loop = asyncio.get_running_loop()
        if self.pending and loop.time() - self.last_request > self.EXPIRES + 2:
            self.pending = 0  # our requests expired without a status reply reaching us (e.g. a reconnect)
        want = min(want, self.bus.settings.consumer_batch)
        if self.pending > want // 2:
            return
        n = want - self.pending
        if n <= 0:
            return
        body = dumps({"batch": n, "expires": int(self.EXPIRES * 1e9)})
        try:
            await self.bus.nc.publish(self.next_subject, body, reply=self.inbox)
        except Exception as exc:  # disconnected: nats-py reconnects; try again shortly
            log.debug("pull request failed: %r", exc)
            await asyncio.sleep(0.2)
            return
        self.pending += n
        self.last_request = loop.time()

    async def next(self, timeout: float) -> Msg | None:
        """The next command message, or ``None`` (timeout, or a status reply that was accounted for)."""
        if self.queue.empty():
            try:
                async with asyncio.timeout(timeout):
                    msg = await self.queue.get()
            except TimeoutError:
                return None
        else:
            msg = self.queue.get_nowait()
        status = msg.headers.get("Status") if msg.headers else None
        if status is None and not msg.data and msg.headers and "Status" in str(msg.headers):
            status = "unknown"
        if status:
            unused = msg.headers.get("Nats-Pending-Messages") if msg.headers else None
            self.pending = max(0, self.pending - int(unused)) if unused else 0
            if status not in ("404", "408", "409"):
                log.warning("pull status %s %s", status, msg.headers.get("Description") if msg.headers else "")
            return None
        self.pending = max(0, self.pending - 1)
        return msg


async def delete_streams(bus: Bus) -> None:
    """Remove the platform's streams (tests use this to clean up a prefixed platform)."""
    for name in (bus.names.commands, bus.names.events, bus.names.output):
        with contextlib.suppress(NotFoundError):
            await bus.js.delete_stream(name)
