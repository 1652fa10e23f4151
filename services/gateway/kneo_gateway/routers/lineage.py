"""Run continuation and fork (time travel): a NEW run that starts where another run stood at a step boundary.

``POST /runs/{run_id}/continue`` starts a stopped run's continuation from its last completed step boundary;
``POST /runs/{run_id}/fork?from_sequence=N`` re-runs a run from its checkpoint ``N`` on. Either way the source run
is never changed (a terminal status never changes); the new run's stream opens with ``run.created`` (the source's
spec and input), ``run.compiled`` (the source's plan, so the step indexes line up), ``run.continued`` /
``run.forked`` (the link and the carried state) and the ``step.scheduled`` of its first step, in one append. The
``execute_step`` command follows the commit exactly as for a compiled new run, and the reconciler resends it like
any other run's. Where the new run starts is decided by :mod:`kneo_gateway.lineage`.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from kneo_events.errors import ConcurrencyConflict, InvalidState, PayloadTooLarge
from kneo_events.ids import new_run_id, run_stream
from kneo_events.projections import fold_run
from kneo_events.schemas import (
    EventPayload,
    RunCompiled,
    RunContinued,
    RunCreated,
    RunForked,
    StepScheduled,
    dumps,
    execute_step_command,
    new_event,
    step_command_id,
    upcast,
)
from kneo_gateway.auth import Principal, require
from kneo_gateway.idempotency import request_hash, validate_key
from kneo_gateway.lineage import StartPoint, continuation_point, edit_outputs, fork_point
from kneo_gateway.responses import JSONBody
from kneo_gateway.routers.inspect import load_stream
from kneo_gateway.routers.runs import _SETTLE_TYPES, _settled, _wait_settled
from kneo_gateway.runs_io import RunBody, run_body
from kneo_gateway.state import Gateway

router = APIRouter(tags=["runs"])
JSON = dict[str, Any]


class ContinueRequest(BaseModel):
    """``POST /v1/runs/{run_id}/continue`` (the body is optional)."""

    model_config = ConfigDict(extra="forbid")
    async_mode: bool = Field(default=False, description="Answer 202 at once instead of waiting (bounded) for the end.")


class ForkRequest(BaseModel):
    """``POST /v1/runs/{run_id}/fork`` (the body is optional)."""

    model_config = ConfigDict(extra="forbid")
    async_mode: bool = Field(default=False, description="Answer 202 at once instead of waiting (bounded) for the end.")
    input: str | None = Field(
        default=None, description="Replaces the run's input for the steps after the checkpoint (default: the same)."
    )
    step_outputs: JSON | None = Field(
        default=None,
        description="Replaces outputs of steps completed at the checkpoint (step id → output) before going on.",
    )


def _gw(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


_RESPONSES: dict[int | str, dict[str, Any]] = {202: {"model": RunBody}}


@router.post("/runs/{run_id}/continue", response_model=RunBody, responses=_RESPONSES)
async def continue_run(
    run_id: str,
    request: Request,
    principal: Annotated[Principal, Depends(require("runs:write"))],
    body: Annotated[ContinueRequest | None, Body()] = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONBody:
    """Continue a failed, cancelled or timed-out run from its last completed step boundary, as a NEW run.

    The new run carries the source's completed steps' outputs (they are not executed again) and starts with the
    step the source stopped at; its ``metadata.continued_from`` names the source. Sync mode waits (bounded) for
    the new run to end: 200; async mode (or a sync wait that runs out) answers 202. When
    ``GET /runs/{run_id}/recovery`` says ``can_continue: false``: 409 ``invalid_state`` with its ``reason``, and
    nothing is appended. With an ``Idempotency-Key``, a repeat replays the first response and starts nothing.
    """
    req = body or ContinueRequest()
    events = await load_stream(request, run_id)
    cont = continuation_point(events)
    if cont.start is None:
        raise InvalidState(f"run {run_id} can't continue: {cont.reason}", run_id=run_id, reason=cont.reason)
    start = cont.start
    source_status = str(fold_run(None, events)["status"])

    def link(new_id: str, actor: str) -> EventPayload:
        return RunContinued(
            source_run_id=run_id,
            source_status=source_status,
            source_version=start.source_version,
            from_step_index=start.step_index,
            from_step_id=start.step_id,
            turn=start.turn,
            carried=start.carried,
            actor=actor,
        )

    return await _branch(
        request,
        principal,
        idempotency_key,
        route=f"POST /runs/{run_id}/continue",
        payload=req.model_dump(mode="json"),
        events=events,
        start=start,
        link=link,
        async_mode=req.async_mode,
        new_input=None,
    )


@router.post("/runs/{run_id}/fork", response_model=RunBody, responses=_RESPONSES)
async def fork_run(
    run_id: str,
    request: Request,
    principal: Annotated[Principal, Depends(require("runs:write"))],
    from_sequence: Annotated[int, Query(description="The checkpoint to start from (GET .../checkpoints).")],
    body: Annotated[ForkRequest | None, Body()] = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONBody:
    """Time travel: a NEW run that starts from checkpoint ``from_sequence`` of this run (any status).

    Same plan, the source's state at that checkpoint (step outputs, transcript, graph edge counts…), then it
    executes the step the source ran after the checkpoint and everything after it; ``metadata.forked_from`` names
    the source and the sequence, and its checkpoints go on numbering from ``from_sequence``. A sequence the run
    doesn't have: 400 ``invalid_request`` (with ``available``); a checkpoint no step follows: 409
    ``invalid_state``. Nothing is appended on a refusal. Sync/async and Idempotency-Key as for ``POST /runs``.
    """
    req = body or ForkRequest()
    s = _gw(request).settings
    if req.input is not None and len(req.input) > s.max_input_chars:
        raise PayloadTooLarge(f"input exceeds {s.max_input_chars} characters", field="input", limit=s.max_input_chars)
    if req.step_outputs is not None and len(dumps(req.step_outputs)) > s.max_input_chars:
        raise PayloadTooLarge(
            f"step_outputs exceeds {s.max_input_chars} bytes", field="step_outputs", limit=s.max_input_chars
        )
    events = await load_stream(request, run_id)
    start = fork_point(events, run_id, from_sequence)
    if req.step_outputs:
        start = replace(start, carried=edit_outputs(start.carried, req.step_outputs, run_id, from_sequence))

    def link(new_id: str, actor: str) -> EventPayload:
        return RunForked(
            source_run_id=run_id,
            source_version=start.source_version,
            sequence=from_sequence,
            from_step_index=start.step_index,
            from_step_id=start.step_id,
            turn=start.turn,
            carried=start.carried,
            actor=actor,
        )

    return await _branch(
        request,
        principal,
        idempotency_key,
        route=f"POST /runs/{run_id}/fork",
        payload={"from_sequence": from_sequence, **req.model_dump(mode="json")},
        events=events,
        start=start,
        link=link,
        async_mode=req.async_mode,
        new_input=req.input,
    )


async def _branch(
    request: Request,
    principal: Principal,
    idempotency_key: str | None,
    *,
    route: str,
    payload: JSON,
    events: list[Any],
    start: StartPoint,
    link: Any,
    async_mode: bool,
    new_input: str | None,
) -> JSONBody:
    """Start the new run (once per Idempotency-Key and route) and answer as the mode asks."""
    gw = _gw(request)
    starter = _BranchStart(gw, request, principal.name, events, start, link, async_mode, new_input)
    if idempotency_key is None:
        code, out = await starter.run(new_run_id())
        return JSONBody(out, status_code=code)
    key = validate_key(idempotency_key)
    claim = await gw.idempotency.claim(
        principal.name, route, key, request_hash(payload), new_run_id(), gw.settings.sync_wait_seconds + 5
    )
    if claim.replay is not None:
        return JSONBody(claim.replay[1], status_code=claim.replay[0], headers={"Idempotent-Replayed": "true"})
    assert claim.resource_id is not None
    try:
        code, out = await starter.run(claim.resource_id)
    except BaseException:
        await asyncio.shield(starter.settle_claim(route, key))
        raise
    await gw.idempotency.complete(principal.name, route, key, code, out)
    return JSONBody(out, status_code=code)


class _BranchStart:
    """Append the new run's opening events (+ its first ``execute_step``) and answer as the mode asks."""

    def __init__(
        self,
        gw: Gateway,
        request: Request,
        actor: str,
        events: list[Any],
        start: StartPoint,
        link: Any,
        async_mode: bool,
        new_input: str | None,
    ) -> None:
        self.gw, self.request, self.actor = gw, request, actor
        self.events, self.start, self.link = events, start, link
        self.async_mode, self.new_input = async_mode, new_input
        self.run_id: str | None = None

    def opening(self, run_id: str, meta: JSON) -> tuple[list[Any], StepScheduled]:
        source_created = next(e for e in self.events if e.type == "run.created")
        source_compiled = next(e for e in self.events if e.type == "run.compiled")
        created = upcast(RunCreated.type, source_created.data)
        assert isinstance(created, RunCreated)
        changes: JSON = {"run_id": run_id, "async_mode": self.async_mode, "face": "kneo"}
        if self.new_input is not None:
            changes["input"] = self.new_input
        created = created.model_copy(update=changes)
        compiled = upcast(RunCompiled.type, source_compiled.data)
        st = self.start
        scheduled = StepScheduled(
            step_index=st.step_index,
            step_id=st.step_id,
            attempt=st.attempt,
            command_id=step_command_id(run_id, st.turn, st.attempt),
            turn=st.turn,
        )
        payloads = [created, compiled, self.link(run_id, self.actor), scheduled]
        return [new_event(p, meta) for p in payloads], scheduled

    async def run(self, run_id: str) -> tuple[int, JSON]:
        gw = self.gw
        self.run_id = run_id
        stream_id = run_stream(run_id)
        rid = self.request.state.request_id
        meta = {"request_id": rid, "correlation_id": run_id, "actor": self.actor}
        events, scheduled = self.opening(run_id, meta)
        cmd = execute_step_command(run_id, stream_id, scheduled, {"request_id": rid, "actor": self.actor})
        with gw.hub.wait_for(run_id, _SETTLE_TYPES) as listener:
            try:
                result = await gw.kernel.commit(stream_id, events, 0, None, [cmd], prior_state=None)
            except ConcurrencyConflict:
                # Only a taken-over idempotency claim reuses a run id: that run exists already.
                state = await gw.kernel.store.get_run(run_id)
                assert state is not None
                return (200 if _settled(state) else 202), run_body(state)
            if self.async_mode:
                state = await gw.kernel.store.get_run(run_id)
                return 202, run_body(state or {"run_id": run_id, "status": "running"})
            settled = await _wait_settled(gw, run_id, listener, result.version, gw.settings.sync_wait_seconds)
        state = await gw.kernel.store.get_run(run_id)
        assert state is not None
        return (200 if (settled or _settled(state)) else 202), run_body(state)

    async def settle_claim(self, route: str, key: str) -> None:
        """The request failed or was cut off: keep the claim if the new run exists (answer = its state), else drop."""
        idem = self.gw.idempotency
        if self.run_id is not None:
            state = await self.gw.kernel.store.get_run(self.run_id)
            if state is not None:
                await idem.complete(self.actor, route, key, 200 if _settled(state) else 202, run_body(state))
                return
        await idem.release(self.actor, route, key)
