"""The compiler service: compiles the spec of every new run (``compile_run``) and records the outcome."""

from __future__ import annotations

import logging
from typing import Any

import anyio
from nats.aio.msg import Msg

from kneo_compiler.operations import OPERATIONS, run_operation
from kneo_compiler.spec import SpecProblem, compile_spec
from kneo_events.errors import ConcurrencyConflict
from kneo_events.ids import run_stream
from kneo_events.kernel import Kernel, next_commands
from kneo_events.schemas import (
    Command,
    EnvironmentPolicyEnforcement,
    RunCompiled,
    RunFailed,
    StepScheduled,
    dumps,
    execute_step_command,
    loads,
    new_event,
    step_command_id,
)
from kneo_events.service import WorkerService

log = logging.getLogger("kneo.compiler")
SERVICE = "compiler"


class CompilerService(WorkerService):
    """Bus adapter: load the run, compile, append ``run.compiled`` + the first ``step.scheduled``.

    A spec that does not compile ends the run with ``run.failed`` carrying the diagnostics.
    """

    name = SERVICE

    def __init__(self, kernel: Kernel) -> None:
        super().__init__(kernel)
        self.handlers["compile_run"] = self.compile_run

    async def compile_run(self, cmd: Command, msg: Msg) -> None:
        """Compile a new run's spec: ``run.compiled`` + the first ``step.scheduled``, or ``run.failed``."""
        run_id = str(cmd.data["run_id"])
        stream_id = run_stream(run_id)
        store = self.kernel.store
        # One round trip: the run's state, its run.created payload and its environment's service policy.
        row = await store.pool.fetchrow(
            "SELECT r.state, e.data AS created, p.policy FROM runs r "
            "JOIN events e ON e.stream_id = $2 AND e.version = 1 "
            "LEFT JOIN environment_policies p ON p.environment = e.data->>'environment' WHERE r.run_id = $1",
            run_id,
            stream_id,
        )
        if row is None:
            raise LookupError(f"run {run_id} not found (yet)")
        state = dict(row["state"])
        if state["status"] != "queued" or state.get("workflow_kind"):
            # Already compiled (resend the first step in case the earlier handling crashed before sending it;
            # JetStream drops the duplicate), or cancelled meanwhile.
            if state["status"] in ("queued", "running"):
                for follow in next_commands(state):  # every pending step (concurrent branches too)
                    await self.kernel.bus.publish_command(follow)
            return
        created: dict[str, Any] = row["created"]
        policy = EnvironmentPolicyEnforcement.model_validate(dict(row["policy"])) if row["policy"] else None
        meta = {
            "request_id": cmd.metadata.get("request_id"),
            "causation_id": cmd.command_id,
            "correlation_id": run_id,
            "actor": cmd.metadata.get("actor", "system"),
        }
        commands: list[Command] = []
        try:
            plan = compile_spec(created["spec"], created.get("environment"), policy=policy)
        except SpecProblem as exc:
            events = [
                new_event(
                    RunFailed(
                        error=str(exc),
                        code="invalid_spec",
                        diagnostics=[d.model_dump() for d in exc.diagnostics],
                    ),
                    meta,
                )
            ]
        else:
            # A concurrent workflow fans out: every branch is scheduled now, as its own command.
            starts = (
                list(range(len(plan["steps"])))
                if plan["workflow"]["kind"] == "concurrent"
                else [int(plan.get("entry", 0))]
            )
            scheduled_steps = [
                StepScheduled(
                    step_index=index,
                    step_id=plan["steps"][index]["id"],
                    attempt=1,
                    command_id=step_command_id(run_id, turn, 1),
                    turn=turn,
                )
                for turn, index in enumerate(starts)
            ]
            events = [
                new_event(
                    RunCompiled(
                        plan=plan,
                        plan_hash=plan["hash"],
                        agent_name=plan["agent"]["name"],
                        workflow_name=plan["workflow"]["name"],
                        workflow_kind=plan["workflow"]["kind"],
                        step_count=len(plan["steps"]),
                    ),
                    meta,
                ),
                *(new_event(s, meta) for s in scheduled_steps),
            ]
            commands.extend(execute_step_command(run_id, stream_id, s, cmd.metadata) for s in scheduled_steps)
        try:
            await self.kernel.commit(stream_id, events, state["version"], cmd.command_id, commands, prior_state=state)
        except ConcurrencyConflict:
            fresh = await store.get_run(run_id)
            if fresh and fresh["status"] != "queued":
                return  # cancelled (or compiled) concurrently
            raise

    async def _service_policy(self, environment: str | None) -> EnvironmentPolicyEnforcement | None:
        """The service-managed policy of an environment (``PUT /v1/policies/environment/{env}``), if any."""
        if not environment:
            return None
        row = await self.kernel.store.pool.fetchrow(
            "SELECT policy FROM environment_policies WHERE environment = $1", environment
        )
        return EnvironmentPolicyEnforcement.model_validate(dict(row["policy"])) if row else None

    # ------------------------------------------------------------------ spec requests (request/reply)

    async def start(self) -> None:
        """Answer the gateway's spec requests (``kneo.rpc.compiler.<operation>``)."""
        await self.kernel.bus.serve_requests(SERVICE, self.answer)

    async def answer(self, msg: Msg) -> None:
        """One spec request: ``{"spec", "environment"}`` → ``{"ok": true, "body"}`` (or ``ok: false``)."""
        operation = msg.subject.rsplit(".", 1)[-1]
        try:
            request = loads(msg.data)
            if operation not in OPERATIONS or not isinstance(request, dict):
                raise ValueError(f"unknown spec operation {operation!r}")
            environment = request.get("environment")
            policy = await self._service_policy(environment)
            body = await anyio.to_thread.run_sync(run_operation, operation, request["spec"], environment, policy)
            reply: dict[str, Any] = {"ok": True, "body": body}
        except Exception as exc:  # a reply always goes back: the caller must never wait for a timeout
            self.log.exception("spec request %s failed", operation)
            reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)[:500]}
        await msg.respond(dumps(reply))
