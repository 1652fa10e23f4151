"""Spec operations, answered by the compiler service over request/reply; and the spec half of a run."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from pydantic import BaseModel, ConfigDict, Field

from kneo_events.errors import InvalidRequest, KneoError, NotFound
from kneo_events.ids import run_stream
from kneo_events.schemas import (
    EventPayload,
    SpecCompiled,
    SpecExplained,
    SpecPolicyReported,
    SpecValidated,
    new_event,
)
from kneo_gateway.auth import Principal, require
from kneo_gateway.responses import JSONBody
from kneo_gateway.routers import runs
from kneo_gateway.runs_io import RunBody, RunRequest
from kneo_gateway.spec_source import read_source
from kneo_gateway.state import Gateway

router = APIRouter(tags=["specs"])


class SpecRequest(BaseModel):
    """A spec to operate on: ``spec_path`` (under the service's spec root) or an inline ``spec``."""

    model_config = ConfigDict(extra="forbid")
    spec_path: str | None = None
    spec: str | dict[str, Any] | None = Field(default=None, description="YAML text or a JSON object.")
    environment: str | None = Field(default=None, max_length=64)


class CompilerFailed(KneoError):
    """The compiler service answered with an error."""

    status_code = 502
    code = "compiler_error"


def _gw(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


async def _ask_compiler(gw: Gateway, operation: str, spec: Any, environment: str | None) -> dict[str, Any]:
    if isinstance(spec, bytes):
        try:
            spec = spec.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest("the spec is not UTF-8 text", field="spec_path") from None
    reply = await gw.kernel.bus.request(
        "compiler", operation, {"spec": spec, "environment": environment}, gw.settings.rpc_timeout_seconds
    )
    if not reply.get("ok"):
        raise CompilerFailed(f"the compiler could not {operation.replace('_', ' ')} the spec: {reply.get('message')}")
    body: dict[str, Any] = reply["body"]
    return body


async def _record(gw: Gateway, request: Request, principal: Principal, event: EventPayload) -> None:
    meta = {"request_id": request.state.request_id, "actor": principal.name}
    await gw.kernel.commit(f"specop-{uuid.uuid4().hex}", [new_event(event, meta)], 0)


async def _operate(
    request: Request, principal: Principal, body: SpecRequest, operation: str, event_type: type[EventPayload]
) -> JSONBody:
    gw = _gw(request)
    source, spec_path, _ = await read_source(gw, body.spec, body.spec_path)
    result = await _ask_compiler(gw, operation, source, body.environment)
    await _record(
        gw,
        request,
        principal,
        event_type(  # type: ignore[call-arg]
            operation=operation,
            valid=bool(result.get("valid")),
            environment=body.environment,
            spec_path=spec_path,
            diagnostic_count=len(result.get("diagnostics") or result.get("report", {}).get("diagnostics") or []),
        ),
    )
    return JSONBody(result)


@router.post("/specs/validate")
async def validate_spec(
    body: SpecRequest, request: Request, principal: Annotated[Principal, Depends(require("specs:read"))]
) -> JSONBody:
    """Validate a spec: ``{"valid", "diagnostics", "report"}`` (an invalid spec is 200 with ``valid: false``)."""
    return await _operate(request, principal, body, "validate", SpecValidated)


@router.post("/specs/compile")
async def compile_spec(
    body: SpecRequest, request: Request, principal: Annotated[Principal, Depends(require("specs:read"))]
) -> JSONBody:
    """Compile a spec: ``{"valid": true, "plan", "plan_hash", "diagnostics"}``, or ``{"valid": false, ...}``."""
    return await _operate(request, principal, body, "compile", SpecCompiled)


@router.post("/specs/explain")
async def explain_spec(
    body: SpecRequest, request: Request, principal: Annotated[Principal, Depends(require("specs:read"))]
) -> JSONBody:
    """What the compiled plan will do, in sentences: ``{"valid", "explanation"}``."""
    return await _operate(request, principal, body, "explain", SpecExplained)


@router.post("/specs/policy-report")
async def policy_report(
    body: SpecRequest, request: Request, principal: Annotated[Principal, Depends(require("specs:read"))]
) -> JSONBody:
    """The governance report of a spec: ``{"valid", "report"}``."""
    return await _operate(request, principal, body, "policy_report", SpecPolicyReported)


@router.post("/specs/run", response_model=RunBody, responses={202: {"model": RunBody}})
async def run_spec(
    body: RunRequest,
    request: Request,
    principal: Annotated[Principal, Depends(require("runs:write"))],
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONBody:
    """Start a run of a spec: the same request and answers as ``POST /v1/runs`` (idempotent with a key)."""
    return await runs.start_run(request, body, principal, idempotency_key, route="POST /specs/run")


@router.get("/runs/{run_id}/policy-report")
async def run_policy_report(
    run_id: str, request: Request, principal: Annotated[Principal, Depends(require("specs:read"))]
) -> JSONBody:
    """The policy report of the spec a run started with (404 unknown run, 400 when the run carries no spec)."""
    gw = _gw(request)
    request.state.run_id = run_id
    first = await gw.kernel.store.read_stream(run_stream(run_id), 1, 1)
    if not first or first[0].type != "run.created":
        raise NotFound(f"run {run_id} not found", run_id=run_id)
    spec = first[0].data.get("spec")
    if not spec:
        raise InvalidRequest(f"run {run_id} carries no spec metadata", run_id=run_id)
    environment = first[0].data.get("environment")
    result = await _ask_compiler(gw, "policy_report", spec, environment)
    await _record(
        gw,
        request,
        principal,
        SpecPolicyReported(
            operation="policy_report",
            valid=bool(result.get("valid")),
            environment=environment,
            spec_path=first[0].data.get("spec_path"),
            source="run",
            run_id=run_id,
        ),
    )
    return JSONBody(result)
