"""The runner service: takes ``execute_step`` commands, runs the step, appends its outcome, sends the next one."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import socket
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg

from kneo_events.checkpoints import CheckpointLimits, pack
from kneo_events.errors import ConcurrencyConflict
from kneo_events.ids import run_stream
from kneo_events.kernel import Kernel, next_commands
from kneo_events.redaction import redact_text
from kneo_events.schemas import (
    CheckpointSaved,
    Command,
    EventPayload,
    HumanRequested,
    execute_step_command,
    new_event,
)
from kneo_events.service import WorkerService
from kneo_runner.domain import Outcome, decide, human_outcome, is_last_branch, should_run
from kneo_runner.engine import StepCancelled, aggregate_outputs, execute_step, render_prompt
from kneo_runner.hooks import RunnerToolHooks

log = logging.getLogger("kneo.runner")
SERVICE = "runner"
BUILTIN_PACKAGES = ("kneo_runner.connectors",)  # always importable: the built-in tools the faces' specs use


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
        self.handlers["resume_human"] = self.resume_human
        # the spec's own packages (KNEO_SERV_FUNCTION_PACKAGES) and the runner's built-in connectors
        configured = tuple(p.strip() for p in kernel.settings.function_packages.split(",") if p.strip())
        self.allowed_packages = (*configured, *(p for p in BUILTIN_PACKAGES if p not in configured))
        self.checkpoint_limits = CheckpointLimits.from_settings(kernel.settings)
        # Runs cancelled recently (heard on the bus): a streaming step checks this between chunks.
        self.cancelled: OrderedDict[str, None] = OrderedDict()

    def _stored(self, payload: EventPayload) -> EventPayload:
        """A checkpoint's state is stored packed: compressed or previewed past the limits (kneo_events.checkpoints)."""
        if isinstance(payload, CheckpointSaved):
            return payload.model_copy(update={"state": pack(payload.state, self.checkpoint_limits)})
        return payload

    async def start(self) -> None:
        """Hear of cancellations at once (a run cancelled mid-step stops streaming at the next chunk)."""
        prefix = self.kernel.bus.subject("kneo.evt.run.")

        async def on_cancel(msg: Msg) -> None:
            run_id = msg.subject[len(prefix) :].split(".", 1)[0]
            self.cancelled[run_id] = None
            while len(self.cancelled) > 10_000:
                self.cancelled.popitem(last=False)

        await self.kernel.bus.subscribe_core("kneo.evt.run.*.run.cancelled", on_cancel)
        await self.kernel.bus.subscribe_core("kneo.evt.run.*.run.timed_out", on_cancel)  # a force-cancel too

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
            if state["status"] in ("queued", "running"):
                for follow in next_commands(state):  # every pending step (concurrent branches too)
                    await self.kernel.bus.publish_command(follow)
            return
        turn_raw = cmd.data.get("turn")
        turn = int(turn_raw) if turn_raw is not None else step_index
        if plan["steps"][step_index].get("kind") == "human":
            await self._request_human(cmd, plan, state, step_index, turn)
            return
        delivery = msg.metadata.num_delivered if msg.metadata else 1
        after_version = int(state["version"])
        execution = secrets.token_hex(4)
        step_id = plan["steps"][step_index]["id"]

        # one sequence per step execution for text chunks and live tool items alike (SSE orders and de-duplicates)
        counter = itertools.count()

        async def publish(item: dict[str, Any]) -> None:
            await self.kernel.bus.publish_output(
                run_id,
                {
                    "run_id": run_id,
                    "step_index": step_index,
                    "step_id": step_id,
                    "attempt": attempt,
                    "delivery": delivery,
                    "execution": execution,
                    "seq": next(counter),
                    "after_version": after_version,
                    **item,
                },
            )

        async def sink(text: str, seq: int) -> None:
            if run_id in self.cancelled:
                raise StepCancelled(run_id)
            await publish({"text": text})

        knap = (state.get("metadata") or {}).get("knap") or {}
        hooks = RunnerToolHooks(
            publish,
            lambda: run_id in self.cancelled,
            store.pool if knap.get("smart_cache") else None,
            knap.get("chat_id"),
            self.kernel.settings.knap_cache_ttl_seconds,
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
                plan,
                state,
                step_index,
                attempt,
                sink,
                # KNEO_SERV_PROVIDER_TIMEOUT_SECONDS bounds each provider request, not the step (which may take
                # several model turns and tool calls)
                self.kernel.settings.step_timeout_seconds,
                self.allowed_packages,
                settings=self.kernel.settings,
                hooks=hooks,
            )
            # still under the heartbeat: recording (and a concurrent run's aggregation) keeps the message ours
            await self._record(cmd, plan, state, step_index, attempt, turn, outcome)
        except StepCancelled:
            self.log.info("run %s was cancelled during step %s; stopped", run_id, step_index)
            return
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat

    async def _record(
        self,
        cmd: Command,
        plan: dict[str, Any],
        state: dict[str, Any],
        step_index: int,
        attempt: int,
        turn: int,
        outcome: Outcome,
    ) -> None:
        """Decide what the outcome means and append it; on a lost race decide again on the fresh state."""
        run_id = str(cmd.data["run_id"])
        store = self.kernel.store
        meta = {
            "request_id": cmd.metadata.get("request_id"),
            "causation_id": cmd.command_id,
            "correlation_id": run_id,
            "actor": "system",
            "runner": self.runner_name,
        }
        stream_id = run_stream(run_id)
        for _ in range(20):
            aggregate = None
            if is_last_branch(plan, state, step_index):
                aggregate = await aggregate_outputs(plan, state, step_index, outcome, self.allowed_packages)
            decision = decide(
                run_id,
                plan,
                state,
                step_index,
                attempt,
                outcome,
                self.kernel.settings.provider_retry_backoff_seconds,
                time.time(),
                turn=turn,
                aggregate=aggregate,
            )
            events = [new_event(self._stored(p), meta) for p in decision.events]
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
                if fresh is None or not self._still_mine(fresh, cmd):
                    self.log.info(
                        "run %s moved on while step %s ran (e.g. cancelled); outcome dropped", run_id, step_index
                    )
                    return
                state = fresh
        raise ConcurrencyConflict(f"run {run_id} kept changing while step {step_index} was recorded")

    @staticmethod
    def _still_mine(state: dict[str, Any], cmd: Command) -> bool:
        if cmd.name == "resume_human":
            return state["status"] == "running" and bool(state.get("human_decision"))
        return should_run(state, cmd.command_id)

    # ------------------------------------------------------------------ human steps

    async def _request_human(
        self, cmd: Command, plan: dict[str, Any], state: dict[str, Any], step_index: int, turn: int
    ) -> None:
        """A human step: pause the run with its request (the human service decides; resume_human continues)."""
        step = plan["steps"][step_index]
        run_id = str(cmd.data["run_id"])
        timeout = step.get("timeout_seconds")
        prompt = render_prompt(step.get("prompt"), state.get("input"), state.get("step_outputs", {}), step["id"])
        request = HumanRequested(
            continuation_id=f"cont_{secrets.token_hex(8)}",
            request_id=f"req_{secrets.token_hex(8)}",
            step_index=step_index,
            step_id=step["id"],
            turn=turn,
            prompt=redact_text(prompt),
            options=list(step.get("options") or []),
            reviewers=list(step.get("reviewers") or []),
            timeout_seconds=timeout,
            deadline_epoch=round(time.time() + float(timeout), 3) if timeout else None,
            on_timeout=step.get("on_timeout") or "fail",
        )
        meta = {
            "request_id": cmd.metadata.get("request_id"),
            "causation_id": cmd.command_id,
            "correlation_id": run_id,
            "actor": "system",
            "runner": self.runner_name,
        }
        try:
            await self.kernel.commit(
                run_stream(run_id), [new_event(request, meta)], int(state["version"]), cmd.command_id, prior_state=state
            )
        except ConcurrencyConflict:
            fresh = await self.kernel.store.get_run(run_id)
            if fresh is not None and should_run(fresh, cmd.command_id):
                raise
            # cancelled (or handled) meanwhile: nothing to pause

    async def resume_human(self, cmd: Command, msg: Msg) -> None:
        """Continue a run whose human step was decided: the decision is the step's outcome."""
        run_id = str(cmd.data["run_id"])
        state, plan = await self.kernel.store.get_run_with_plan(run_id)
        if state is None or plan is None or not self._still_mine(state, cmd):
            return
        awaiting, decision = state.get("awaiting_human") or {}, state["human_decision"]
        if decision.get("continuation_id") != awaiting.get("continuation_id"):
            return
        step_index = int(awaiting["step_index"])
        turn = int(awaiting.get("turn") if awaiting.get("turn") is not None else step_index)
        await self._record(cmd, plan, state, step_index, 1, turn, human_outcome(decision, state))
