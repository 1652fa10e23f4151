"""The human service: the timers of human tasks, and the operator sweep.

Every pending task's deadline is in the log (``human.requested.deadline_epoch``, projected into ``human_tasks``).
Each copy of the service looks for due tasks every ``KNEO_HUMAN_TIMER_INTERVAL_SECONDS`` and dispatches the step's
``on_timeout``; the outcome is appended at the run's current version, so a timeout fires once however many copies
run (and even when none ran at the deadline: the next one to start fires it), and it loses cleanly to a decision or a
cancel that got there first.

* ``fail``: ``human.expired`` + ``run.expired`` (terminal status ``expired``).
* ``continue``: ``human.continued`` + a synthesized ``human.decided`` (approved by ``system``); the runner goes on.
* ``escalate``: ``human.escalated`` once (``escalated_at`` stamped); the run stays paused, the task resumable.

``POST /v1/human-tasks/sweep`` asks one copy (request/reply ``kneo.rpc.human.sweep``) to do a pass now.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from nats.aio.msg import Msg

from kneo_events.errors import ConcurrencyConflict
from kneo_events.ids import run_stream
from kneo_events.kernel import Kernel
from kneo_events.schemas import (
    Command,
    EventPayload,
    HumanContinued,
    HumanDecided,
    HumanEscalated,
    HumanExpired,
    RunExpired,
    dumps,
    new_event,
    resume_human_command,
)
from kneo_events.service import WorkerService

SERVICE = "human"


class HumanService(WorkerService):
    """Fires the timeouts of human tasks; answers the operator sweep."""

    name = SERVICE

    def __init__(self, kernel: Kernel) -> None:
        super().__init__(kernel)
        self._timer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the timer loop and answer sweep requests."""
        self._timer = asyncio.create_task(self._loop(), name="human-timers")
        await self.kernel.bus.serve_requests(SERVICE, self._answer)

    async def stop(self) -> None:
        """Stop the timer loop."""
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer

    async def _loop(self) -> None:
        while True:
            try:
                await self.sweep(time.time())
            except Exception:
                self.log.exception("human timer pass failed")
            await asyncio.sleep(self.kernel.settings.human_timer_interval_seconds)

    async def _answer(self, msg: Msg) -> None:
        try:
            fired = await self.sweep(time.time())
            reply: dict[str, Any] = {"ok": True, "body": {"fired": fired, "count": len(fired)}}
        except Exception as exc:
            self.log.exception("sweep failed")
            reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)[:500]}
        await msg.respond(dumps(reply))

    async def sweep(self, now: float) -> list[dict[str, Any]]:
        """Dispatch the ``on_timeout`` of every due task; returns what fired."""
        rows = await self.kernel.store.pool.fetch(
            "SELECT continuation_id, request_id, run_id, on_timeout FROM human_tasks WHERE status = 'pending' "
            "AND deadline_epoch IS NOT NULL AND deadline_epoch <= $1 "
            "AND NOT (on_timeout = 'escalate' AND escalated_at IS NOT NULL) ORDER BY deadline_epoch LIMIT 100",
            now,
        )
        fired = []
        for row in rows:
            if await self._fire(dict(row)):
                fired.append(
                    {
                        "continuation_id": row["continuation_id"],
                        "run_id": row["run_id"],
                        "on_timeout": row["on_timeout"],
                    }
                )
        return fired

    async def _fire(self, task: dict[str, Any]) -> bool:
        run_id, cid, rid = task["run_id"], task["continuation_id"], task["request_id"]
        state = await self.kernel.store.get_run(run_id)
        if (
            state is None
            or state["status"] != "paused"
            or (state.get("awaiting_human") or {}).get("continuation_id") != cid
        ):
            return False
        stream_id = run_stream(run_id)
        meta = {"actor": "system", "correlation_id": run_id, "causation_id": f"{cid}:timeout"}
        events: list[EventPayload]
        commands = []
        if task["on_timeout"] == "continue":
            events = [
                HumanContinued(continuation_id=cid, request_id=rid),
                HumanDecided(
                    continuation_id=cid,
                    request_id=rid,
                    decision="approved",
                    reviewer="system",
                    content="approved automatically: the request timed out (on_timeout: continue)",
                ),
            ]
            commands.append(resume_human_command(run_id, stream_id, cid, {}))
        elif task["on_timeout"] == "escalate":
            events = [HumanEscalated(continuation_id=cid, request_id=rid)]
        else:
            events = [
                HumanExpired(continuation_id=cid, request_id=rid),
                RunExpired(continuation_id=cid, reason=f"human request {rid} timed out (on_timeout: fail)"),
            ]
        try:
            await self.kernel.commit(
                stream_id, [new_event(e, meta) for e in events], int(state["version"]), f"{cid}:timeout", commands
            )
        except ConcurrencyConflict:
            return False  # a decision, a cancel or another copy of this service got there first
        self.log.info("human task %s timed out: %s", cid, task["on_timeout"])
        return True

    async def handle(self, cmd: Command, msg: Msg) -> None:
        """No command is defined for this service."""
        await super().handle(cmd, msg)
