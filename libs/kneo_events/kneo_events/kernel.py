"""The write path every service shares: append → publish events → send the next commands.

* ``Kernel.commit`` appends (inline projections included), hands the recorded events to the publisher and sends
  the follow-up commands. Publishing is the fast path; the outbox relay republishes anything whose publish was
  not confirmed within a grace period (a crash between commit and publish), and JetStream de-duplicates on
  ``Nats-Msg-Id = event_id`` so consumers see each event once.
* The reconciler re-sends the next command of any run that made no progress past a deadline, so a lost command
  delays a run but never strands it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kneo_events.bus import Bus
from kneo_events.errors import ConcurrencyConflict
from kneo_events.schemas import (
    Command,
    CommandDeadLettered,
    HumanContinueFailed,
    NewEvent,
    RecordedEvent,
    RunFailed,
    StepScheduled,
    compile_run_command,
    execute_step_command,
    new_event,
    resume_human_command,
)
from kneo_events.settings import Settings
from kneo_events.store import UNKNOWN, AppendResult, EventStore

log = logging.getLogger("kneo.kernel")
_RECONCILER_LOCK = 0x4B4E4543


@dataclass
class Kernel:
    """Store + bus + background publisher of one process."""

    settings: Settings
    store: EventStore
    bus: Bus
    _queue: asyncio.Queue[AppendResult] = field(default_factory=lambda: asyncio.Queue(maxsize=10_000))
    _done: list[int] = field(default_factory=list)
    _ack_tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # In-process listeners of committed events (the gateway's live hub when it shares this process): they hear
    # of a commit at once instead of through the bus.
    local_listeners: list[Any] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    # ------------------------------------------------------------------ lifecycle

    def start(self, *, relay: bool = True, reconciler: bool = False) -> None:
        """Start the background publisher (and, when asked, the relay and the reconciler)."""
        self._tasks.append(asyncio.create_task(self._publisher(), name="kneo-publisher"))
        if relay:
            self._tasks.append(asyncio.create_task(self._relay_loop(), name="kneo-relay"))
        if reconciler:
            self._tasks.append(asyncio.create_task(self._reconcile_loop(), name="kneo-reconciler"))

    async def stop(self) -> None:
        """Flush what is queued for publishing (bounded), then stop background tasks."""
        self._stop.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout=5)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        with contextlib.suppress(Exception):
            await self.store.outbox_done(self._done)
        self._tasks.clear()

    # ------------------------------------------------------------------ the write path

    async def commit(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        expected_version: int | None,
        command_id: str | None = None,
        commands: Sequence[Command] = (),
        *,
        prior_state: Any = UNKNOWN,
    ) -> AppendResult:
        """Append, queue the events for publishing, then send ``commands`` (after the commit, never before).

        On a repeated ``command_id`` nothing is appended and the commands are re-sent (they are idempotent), so a
        redelivered command whose first handling crashed after commit still moves the run on.
        """
        result = await self.store.append(stream_id, events, expected_version, command_id, prior_state=prior_state)
        if result.duplicate and stream_id.startswith("run-"):
            # The command was handled before (and maybe crashed before sending what follows): resend what the
            # stored state says comes next, not what this attempt decided (which may differ).
            state = await self.store.get_run(stream_id.removeprefix("run-"))
            commands = next_commands(state) if state and state["status"] in ("queued", "running") else []
        if not result.duplicate and result.events:
            for listener in self.local_listeners:
                listener(result.events)
            try:
                self._queue.put_nowait(result)
            except asyncio.QueueFull:  # back-pressure: the outbox relay publishes it after the grace period
                log.warning("publish queue full; %s v%d left to the relay", stream_id, result.version)
        for cmd in commands:
            try:
                await self.bus.publish_command(cmd)
            except Exception as exc:  # the intent is in the log: the reconciler will resend it
                log.warning("publishing %s failed, the reconciler will resend it: %r", cmd.command_id, exc)
        return result

    async def _publisher(self) -> None:
        """Publish queued appends, pipelined: up to 8 batches wait for their acks at once, in order of sending."""
        inflight = asyncio.Semaphore(8)
        flusher = asyncio.create_task(self._flush_outbox_done())
        try:
            while True:
                batch = [await self._queue.get()]
                while not self._queue.empty() and len(batch) < 256:
                    batch.append(self._queue.get_nowait())
                await inflight.acquire()
                try:
                    acks = await self.bus.publish_events_nowait([e for r in batch for e in r.events])
                except Exception as exc:  # left in the outbox: the relay publishes it
                    log.warning("publishing %d appends failed, the relay will retry: %r", len(batch), exc)
                    inflight.release()
                    for _ in batch:
                        self._queue.task_done()
                    continue
                task = asyncio.create_task(self._await_acks(batch, acks, inflight))
                self._ack_tasks.add(task)
                task.add_done_callback(self._ack_tasks.discard)
        finally:
            flusher.cancel()

    async def _await_acks(self, batch: list[AppendResult], acks: list[Any], inflight: asyncio.Semaphore) -> None:
        try:
            await asyncio.wait_for(asyncio.gather(*acks), timeout=10)
            self._done.extend(r.outbox_id for r in batch if r.outbox_id is not None)
        except Exception as exc:  # left in the outbox: the relay publishes it
            log.warning("%d appends unconfirmed by JetStream, the relay will retry: %r", len(batch), exc)
        finally:
            inflight.release()
            for _ in batch:
                self._queue.task_done()

    async def _flush_outbox_done(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            if self._done:
                done, self._done = self._done, []
                try:
                    await self.store.outbox_done(done)
                except Exception as exc:
                    log.warning("outbox cleanup failed (harmless, relay republishes de-duplicated): %r", exc)

    async def dead_letter(self, cmd: Command, deliveries: int, exc: BaseException) -> None:
        """Append ``command.dead_lettered`` (and ``run.failed`` when the run is still going) for a poison command."""
        run_id = str(cmd.data.get("run_id", ""))
        state = await self.store.get_run(run_id) if run_id else None
        events = [
            new_event(
                CommandDeadLettered(command_id=cmd.command_id, name=cmd.name, deliveries=deliveries, error=repr(exc))
            )
        ]
        decision = (state or {}).get("human_decision") or {}
        if cmd.name == "resume_human" and decision.get("reviewer") == "system" and state is not None:
            # the approval an on_timeout: continue synthesized could not be carried out
            events.append(
                new_event(
                    HumanContinueFailed(
                        continuation_id=str(decision.get("continuation_id")),
                        request_id=str(decision.get("request_id")),
                        error=repr(exc)[:500],
                    )
                )
            )
        if state is not None and state["status"] in ("queued", "running"):
            events.append(
                new_event(RunFailed(error=f"command {cmd.name} failed repeatedly: {exc!r}", code="dead_lettered"))
            )
        # A command for a run that does not exist must not create one: record it on a stream of its own.
        stream_id = cmd.stream_id if state is not None else f"deadletter-{cmd.command_id}"
        for attempt in range(10):
            try:
                await self.commit(stream_id, events, None, f"{cmd.command_id}:dead")
                return
            except ConcurrencyConflict:  # a run writer (which doesn't take the per-stream lock) got there first
                if attempt == 9:
                    raise
                await asyncio.sleep(0.01 * (attempt + 1))

    # ------------------------------------------------------------------ relay

    async def relay_once(self, grace_seconds: float | None = None) -> int:
        """Publish events whose fast-path publish was never confirmed; returns how many were republished."""
        grace = self.settings.relay_grace_seconds if grace_seconds is None else grace_seconds
        async with self.store.claim_outbox(grace) as (ids, events):
            if events:
                await self.bus.publish_events(events)
                log.info("relay republished %d events from %d appends", len(events), len(ids))
        return len(events)

    async def _relay_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.relay_interval_seconds)
            # While our own publisher has a backlog, old entries are most likely still on their way (an overloaded
            # process, not a crashed one): wait six times longer before republishing them.
            grace = self.settings.relay_grace_seconds * (6 if self._queue.qsize() else 1)
            try:
                while await self.relay_once(grace) > 0:
                    pass
            except Exception as exc:
                log.warning("relay pass failed: %r", exc)

    # ------------------------------------------------------------------ reconciler

    async def reconcile_once(self, older_than_seconds: float | None = None) -> list[str]:
        """Re-send the next command of every stalled run (one reconciler at a time across processes)."""
        after = self.settings.reconcile_after_seconds if older_than_seconds is None else older_than_seconds
        resent: list[str] = []
        async with self.store.pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _RECONCILER_LOCK):
                return resent
            try:
                for state in await self.store.stalled_runs(after):
                    commands = next_commands(state)
                    stamp = int(asyncio.get_running_loop().time() * 1000)
                    for cmd in commands:
                        await self.bus.publish_command(cmd, msg_id=f"{cmd.command_id}:reconcile:{stamp}")
                        resent.append(cmd.command_id)
                    if commands:
                        await self.store.extend_lease(str(state["run_id"]), after)  # one resend per deadline
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _RECONCILER_LOCK)
        if resent:
            log.warning("reconciler resent %d commands: %s", len(resent), resent[:5])
        return resent

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reconcile_interval_seconds)
            try:
                await self.reconcile_once()
            except Exception as exc:
                log.warning("reconcile pass failed: %r", exc)


def next_commands(state: dict[str, Any]) -> list[Command]:
    """The commands that move a non-terminal run on, derived from its state alone (one per pending step)."""
    run_id = str(state["run_id"])
    stream_id = f"run-{run_id}"
    meta: dict[str, Any] = {}
    pending = state.get("pending") or {}
    if not pending and isinstance(state.get("next_step"), dict):
        pending = {"_": state["next_step"]}
    if pending:
        return [
            execute_step_command(run_id, stream_id, StepScheduled.model_validate(p), meta) for p in pending.values()
        ]
    awaiting, decided = state.get("awaiting_human"), state.get("human_decision")
    if state.get("status") == "running" and isinstance(awaiting, dict) and isinstance(decided, dict):
        return [resume_human_command(run_id, stream_id, str(awaiting["continuation_id"]), meta)]
    if state.get("status") == "queued" and not state.get("workflow_kind"):
        return [compile_run_command(run_id, stream_id, meta)]
    return []


def next_command(state: dict[str, Any]) -> Command | None:
    """The first of :func:`next_commands` (for single-cursor runs, the one command)."""
    commands = next_commands(state)
    return commands[0] if commands else None


def wire_events(events: Sequence[RecordedEvent]) -> list[dict[str, object]]:
    """Events in their published JSON shape."""
    return [e.wire() for e in events]
