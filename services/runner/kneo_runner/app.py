"""The runner service: takes ``execute_step`` commands, runs the step, appends its outcome, sends the next one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import sys
import time
from collections import OrderedDict
from pathlib import Path

from nats.aio.msg import Msg

from kneo_events.errors import ConcurrencyConflict
from kneo_events.ids import run_stream
from kneo_events.kernel import Kernel, next_command
from kneo_events.schemas import Command, execute_step_command, new_event
from kneo_events.service import WorkerService
from kneo_runner.domain import decide, is_last_branch, should_run
from kneo_runner.engine import StepCancelled, aggregate_outputs, execute_step

log = logging.getLogger("kneo.runner")
SERVICE = "runner"


class RunnerService(WorkerService):
    """Bus adapter: load state → should_run → execute → decide → append (expected version) → send next command."""

    name = SERVICE

    def __init__(self, kernel: Kernel) -> None:
        super().__init__(kernel)
        # Function steps import "module:attr" paths relative to the spec root, like spec_path.
        root = str(kernel.settings.spec_root or Path.cwd())
        if root not in sys.path:
            sys.path.append(root)
        self.runner_name = kernel.settings.runner_name or f"{socket.gethostname()}:{os.getpid()}"
        self.handlers["execute_step"] = self.execute_step
        # Runs cancelled recently (heard on the bus): a streaming step checks this between chunks.
        self.cancelled: OrderedDict[str, None] = OrderedDict()

    async def start(self) -> None:
        """Hear of cancellations at once (a run cancelled mid-step stops streaming at the next chunk)."""
        prefix = self.kernel.bus.subject("kneo.evt.run.")

        async def on_cancel(msg: Msg) -> None:
            run_id = msg.subject[len(prefix) :].split(".", 1)[0]
            self.cancelled[run_id] = None
            while len(self.cancelled) > 10_000:
                self.cancelled.popitem(last=False)

        await self.kernel.bus.subscribe_core("kneo.evt.run.*.run.cancelled", on_cancel)

    async def execute_step(self, cmd: Command, msg: Msg) -> None:
        """Run one scheduled step and record its outcome (return = ack, raise = retry with backoff)."""
        run_id = str(cmd.data["run_id"])
        step_index = int(cmd.data["step_index"])
        attempt = int(cmd.data.get("attempt", 1))
        not_before = cmd.data.get("not_before")
        if not_before is not None and float(not_before) > time.time():
            # A retry waiting for its backoff: let JetStream redeliver it then (no process holds it meanwhile).
            await msg.nak(delay=float(not_before) - time.time())
            return
        store = self.kernel.store
        state, plan = await store.get_run_with_plan(run_id)
        if state is None:
            raise LookupError(f"run {run_id} not found (yet)")
        if plan is None:
            return
        if not should_run(state, cmd.command_id):
            # Stale, duplicate, or the run is finished. If this command's handling committed but crashed before
            # sending what follows, resend it now: JetStream drops it (same Nats-Msg-Id) if it was already sent.
            follow = next_command(state)
            if follow is not None and state["status"] in ("queued", "running"):
                await self.kernel.bus.publish_command(follow)
            return
        delivery = msg.metadata.num_delivered if msg.metadata else 1
        after_version = int(state["version"])
        execution = secrets.token_hex(4)
        step_id = plan["steps"][step_index]["id"]

        async def sink(text: str, seq: int) -> None:
            if run_id in self.cancelled:
                raise StepCancelled(run_id)
            await self.kernel.bus.publish_output(
                run_id,
                {
                    "run_id": run_id,
                    "step_index": step_index,
                    "step_id": step_id,
                    "attempt": attempt,
                    "delivery": delivery,
                    "execution": execution,
                    "seq": seq,
                    "after_version": after_version,
                    "text": text,
                },
            )

        ack_wait = self.kernel.settings.command_ack_wait_seconds

        async def heartbeat() -> None:
            # Long steps: keep the message ours (in-progress acks) and hold a lease so the reconciler doesn't
            # resend a step that is still running. Steps shorter than one interval never write anything.
            while True:
                await asyncio.sleep(max(0.5, ack_wait / 3))
                with contextlib.suppress(Exception):
                    await msg.in_progress()
                with contextlib.suppress(Exception):
                    await store.extend_lease(run_id, max(ack_wait * 2, self.kernel.settings.reconcile_after_seconds))

        beat = asyncio.create_task(heartbeat())
        try:
            outcome = await execute_step(
                plan, state, step_index, attempt, sink, self.kernel.settings.provider_timeout_seconds
            )
        except StepCancelled:
            self.log.info("run %s was cancelled during step %s; stopped", run_id, step_index)
            return
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
        turn = cmd.data.get("turn")
        meta = {
            "request_id": cmd.metadata.get("request_id"),
            "causation_id": cmd.command_id,
            "correlation_id": run_id,
            "actor": "system",
            "runner": self.runner_name,
        }
        stream_id = run_stream(run_id)
        # Decide and append; when the run moved meanwhile (a sibling branch finished), decide again on the fresh
        # state with the same outcome: the step is never executed twice for a race it did not lose.
        for _ in range(20):
            aggregate = None
            if is_last_branch(plan, state, step_index):
                aggregate = await aggregate_outputs(plan, state, step_index, outcome)
            decision = decide(
                run_id,
                plan,
                state,
                step_index,
                attempt,
                outcome,
                self.kernel.settings.provider_retry_backoff_seconds,
                time.time(),
                turn=int(turn) if turn is not None else None,
                aggregate=aggregate,
            )
            events = [new_event(p, meta) for p in decision.events]
            nxt = (
                execute_step_command(run_id, stream_id, decision.next_step, cmd.metadata)
                if decision.next_step
                else None
            )
            try:
                await self.kernel.commit(
                    stream_id, events, int(state["version"]), cmd.command_id, [nxt] if nxt else [], prior_state=state
                )
                return
            except ConcurrencyConflict:
                fresh = await store.get_run(run_id)
                if fresh is None or not should_run(fresh, cmd.command_id):
                    self.log.info(
                        "run %s moved on while step %s ran (e.g. cancelled); outcome dropped", run_id, step_index
                    )
                    return
                state = fresh
        raise ConcurrencyConflict(f"run {run_id} kept changing while step {step_index} was recorded")
