"""The human service: the timers of human tasks, and the operator sweep.

Every pending task's deadline is in the log (``human.requested.deadline_epoch``, projected into ``human_tasks``).
Each copy of the service looks for due tasks every ``KNEO_HUMAN_TIMER_INTERVAL_SECONDS`` and dispatches the step's
``on_timeout``; the outcome is appended at the run's current version, so a timeout fires once however many copies
run (and even when none ran at the deadline: the next one to start fires it), and it loses cleanly to a decision or a
cancel that got there first.

* ``fail``: ``human.expired`` + ``run.expired`` (terminal status ``expired``).
* ``continue``: ``human.continued`` + a synthesized ``human.decided`` (approved by ``system``); the runner goes on.
* ``escalate``: ``human.escalated`` once (``escalated_at`` stamped); the run stays paused, the task resumable.

The same timer enforces run-level deadlines (``timeout_seconds`` on the request or ``workflow.timeout_seconds`` in the
spec; the fold keeps ``deadline_epoch`` in the run's state): a run still queued, running or paused past it gets
``run.timed_out`` (terminal status ``timed_out``; a paused run's task is closed with ``human.cancelled``). Whichever
deadline fires first wins: both are appended at the run's version, so the second finds the run changed.

``POST /v1/human-tasks/sweep`` asks one copy (request/reply ``kneo.rpc.human.sweep``) to do a pass now.

The same loop is the Jobs face's janitor (``kneo_events.sandboxes.SandboxJanitor``, docs/jobs.md): it starts held
continuations once the job they wait for ended, and deletes sandboxes past ``KNEO_SANDBOX_RETENTION_DAYS``.
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
from kneo_events.sandboxes import SandboxJanitor
from kneo_events.schemas import (
    Command,
    EventPayload,
    HumanCancelled,
    HumanContinued,
    HumanDecided,
    HumanEscalated,
    HumanExpired,
    RunExpired,
    RunTimedOut,
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
        self.janitor = SandboxJanitor(kernel)

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
                now = time.time()
                await self.sweep_runs(now)
                await self.sweep(now)
            except Exception:
                self.log.exception("human timer pass failed")
            try:
                await self.janitor.tick(now)
            except Exception:
                self.log.exception("sandbox janitor pass failed")
            await asyncio.sleep(self.kernel.settings.human_timer_interval_seconds)

    async def _answer(self, msg: Msg) -> None:
        try:
            now = time.time()
            fired = await self.sweep(now)
            timed_out = await self.sweep_runs(now)
            reply: dict[str, Any] = {
                "ok": True,
                "body": {"fired": fired, "count": len(fired), "timed_out_runs": timed_out},
            }
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

    async def sweep_runs(self, now: float) -> list[str]:
        """Force-cancel every run still going past its run-level deadline (``run.timed_out``); returns their ids."""
        rows = await self.kernel.store.pool.fetch(
            "SELECT run_id FROM runs WHERE status IN ('queued', 'running', 'paused') AND state ? 'deadline_epoch' "
            "AND (state->>'deadline_epoch')::double precision <= $1 "
            "ORDER BY (state->>'deadline_epoch')::double precision LIMIT 100",
            now,
        )
        return [r["run_id"] for r in rows if await self._time_out(r["run_id"])]

    async def _time_out(self, run_id: str) -> bool:
        stream_id = run_stream(run_id)
        meta = {"actor": "system", "correlation_id": run_id, "causation_id": f"{run_id}:deadline"}
        for _ in range(20):  # a running run moves on between our read and our append: read again
            state = await self.kernel.store.get_run(run_id)
            if state is None or state["status"] not in ("queued", "running", "paused"):
                return False
            timeout = state.get("timeout_seconds")
            events: list[EventPayload] = []
            awaiting = state.get("awaiting_human")
            if state["status"] == "paused" and isinstance(awaiting, dict):
                events.append(
                    HumanCancelled(continuation_id=awaiting["continuation_id"], request_id=awaiting["request_id"])
                )
            events.append(
                RunTimedOut(
                    reason=f"run timed out after {timeout:g}s (timeout_seconds)" if timeout else "run timed out",
                    timeout_seconds=timeout,
                    deadline_epoch=state.get("deadline_epoch"),
                )
            )
            try:
                await self.kernel.commit(
                    stream_id, [new_event(e, meta) for e in events], int(state["version"]), prior_state=state
                )
            except ConcurrencyConflict:
                continue
            self.log.info("run %s timed out", run_id)
            return True
        return False

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
