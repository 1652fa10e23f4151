"""Human tasks: list, read and resume the requests that paused runs (the task side of human steps).

A decision is a ``human.decided`` event appended at the run's current version, so two resumes of the same request
cannot both win (the loser gets 409 ``resource_locked``) and a resume racing a cancel loses cleanly; the runner
continues the run from it (``resume_human``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from kneo_events.errors import ConcurrencyConflict, InvalidRequest, InvalidState, NotFound, PayloadTooLarge
from kneo_events.ids import run_stream
from kneo_events.redaction import redact
from kneo_events.schemas import HumanDecided, new_event, resume_human_command
from kneo_gateway.auth import Forbidden, Principal, require
from kneo_gateway.idempotency import request_hash, validate_key
from kneo_gateway.paging import page_params
from kneo_gateway.responses import JSONBody
from kneo_gateway.runs_io import run_body
from kneo_gateway.state import Gateway

router = APIRouter(tags=["human tasks"])
SORT_FIELDS = ("created_at", "updated_at", "deadline_epoch")
_COLUMNS = (
    "continuation_id, request_id, run_id, workflow_kind, step_id, prompt, options, reviewers, deadline_epoch, "
    "on_timeout, escalated_at, status, decision, created_at, updated_at"
)


class ResumeRequest(BaseModel):
    """A reviewer's decision on one human request."""

    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(max_length=64)
    decision: Literal["approved", "rejected", "edited", "selected", "provided"]
    content: str | None = None
    selected_option: str | None = Field(default=None, max_length=1000)


def _gw(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


def _task(row: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "continuation_id": row["continuation_id"],
        "run_id": row["run_id"],
        "workflow_kind": row["workflow_kind"],
        "step_id": row["step_id"],
        "status": row["status"],
        "request": {
            "request_id": row["request_id"],
            "prompt": row["prompt"],
            "options": row["options"],
            "reviewers": row["reviewers"],
            "deadline_epoch": row["deadline_epoch"],
            "on_timeout": row["on_timeout"],
        },
        "escalated_at": row["escalated_at"].isoformat() if row["escalated_at"] else None,
        "decision": row["decision"],
        "created_at": row["created_at"].isoformat(),
        "updated_at": row["updated_at"].isoformat(),
    }
    return redact(out)  # type: ignore[no-any-return]


@router.get("/human-tasks", dependencies=[Depends(require("human:read"))])
async def list_tasks(
    request: Request,
    run_id: str | None = None,
    workflow_kind: str | None = None,
    status: str | None = None,
    limit: Annotated[int, Query()] = 100,
    offset: Annotated[int, Query()] = 0,
    sort_by: str = "created_at",
    sort_order: str = "desc",
) -> JSONBody:
    """Human tasks, newest first; filters run_id, workflow_kind, status."""
    gw = _gw(request)
    limit = page_params(limit, offset, sort_by, sort_order, SORT_FIELDS, gw.settings.max_list_items)
    where = (
        "WHERE ($1::text IS NULL OR run_id = $1) AND ($2::text IS NULL OR workflow_kind = $2) "
        "AND ($3::text IS NULL OR status = $3)"
    )
    pool = gw.kernel.store.pool
    rows = await pool.fetch(
        f"SELECT {_COLUMNS} FROM human_tasks {where} ORDER BY {sort_by} {sort_order.upper()} NULLS LAST, "
        f"continuation_id LIMIT $4 OFFSET $5",
        run_id,
        workflow_kind,
        status,
        limit,
        offset,
    )
    total = await pool.fetchval(f"SELECT count(*) FROM human_tasks {where}", run_id, workflow_kind, status)
    tasks = [_task(r) for r in rows]
    return JSONBody(
        {
            "tasks": tasks,
            "count": len(tasks),
            "total": int(total),
            "limit": limit,
            "offset": offset,
            "sort_by": sort_by,
            "sort_order": sort_order,
        }
    )


async def _load(gw: Gateway, continuation_id: str) -> Any:
    row = await gw.kernel.store.pool.fetchrow(
        f"SELECT {_COLUMNS} FROM human_tasks WHERE continuation_id = $1", continuation_id
    )
    if row is None:
        raise NotFound(f"human task {continuation_id} not found", continuation_id=continuation_id)
    return row


@router.post("/human-tasks/sweep")
async def sweep_tasks(request: Request, principal: Annotated[Principal, Depends(require("human:write"))]) -> JSONBody:
    """Admin: fire the timeouts of every due task now (the human service also does so on its own)."""
    gw = _gw(request)
    if gw.auth.enabled and principal.role != "admin":
        raise Forbidden("only an admin key may sweep human tasks", required_role="admin")
    reply = await gw.kernel.bus.request("human", "sweep", {}, gw.settings.rpc_timeout_seconds)
    if not reply.get("ok"):
        raise InvalidState(f"the sweep failed: {reply.get('message')}")
    return JSONBody(reply["body"])


@router.get("/human-tasks/{continuation_id}", dependencies=[Depends(require("human:read"))])
async def get_task(continuation_id: str, request: Request) -> JSONBody:
    """One human task."""
    request.state.continuation_id = continuation_id
    return JSONBody(_task(await _load(_gw(request), continuation_id)))


async def _resume(
    continuation_id: str,
    body: ResumeRequest,
    request: Request,
    principal: Principal,
    idempotency_key: str | None,
) -> JSONBody:
    gw = _gw(request)
    request.state.continuation_id = continuation_id
    if body.content is not None and len(body.content) > gw.settings.max_human_content_chars:
        limit = gw.settings.max_human_content_chars
        raise PayloadTooLarge(f"content exceeds {limit} characters", field="content", limit=limit)
    if idempotency_key is None:
        return await _decide(gw, request, principal, continuation_id, body)
    key, route = validate_key(idempotency_key), "POST /human-tasks/resume"
    claim = await gw.idempotency.claim(
        principal.name,
        route,
        key,
        request_hash({"continuation_id": continuation_id, **body.model_dump(mode="json")}),
        continuation_id,
        30.0,
    )
    if claim.replay is not None:
        return JSONBody(claim.replay[1], status_code=claim.replay[0], headers={"Idempotent-Replayed": "true"})
    try:
        response = await _decide(gw, request, principal, continuation_id, body)
    except BaseException:
        await gw.idempotency.release(principal.name, route, key)
        raise
    await gw.idempotency.complete(principal.name, route, key, response.status_code, orjson_body(response))
    return response


def orjson_body(response: JSONBody) -> Any:
    """The JSON a response carries (stored for an idempotent replay)."""
    return orjson.loads(response.body)


async def _decide(
    gw: Gateway, request: Request, principal: Principal, continuation_id: str, body: ResumeRequest
) -> JSONBody:
    task = await _load(gw, continuation_id)
    if task["status"] != "pending":
        raise InvalidState(
            f"human task {continuation_id} is {task['status']}; only a pending task can be resumed",
            continuation_id=continuation_id,
            status=task["status"],
        )
    if body.request_id != task["request_id"]:
        raise InvalidRequest("request_id does not match the task's pending request", field="request_id")
    reviewers = list(task["reviewers"] or [])
    if reviewers and gw.auth.enabled and principal.name not in reviewers:
        raise Forbidden(
            f"only the step's reviewers may decide this task: {', '.join(reviewers)}", required_reviewer=reviewers
        )
    if body.decision == "selected" and body.selected_option not in (task["options"] or []):
        raise InvalidRequest(
            f"selected_option must be one of the task's options: {', '.join(task['options'] or []) or '(none)'}",
            field="selected_option",
            options=task["options"],
        )
    run_id = task["run_id"]
    state = await gw.kernel.store.get_run(run_id)
    if (
        state is None
        or state["status"] != "paused"
        or (state.get("awaiting_human") or {}).get("continuation_id") != continuation_id
    ):
        raise InvalidState(f"run {run_id} is not waiting for this decision", run_id=run_id)
    decided = HumanDecided(
        continuation_id=continuation_id,
        request_id=body.request_id,
        decision=body.decision,
        content=body.content,
        selected_option=body.selected_option,
        reviewer=principal.name,
    )
    meta = {"request_id": request.state.request_id, "correlation_id": run_id, "actor": principal.name}
    stream_id = run_stream(run_id)
    try:
        await gw.kernel.commit(
            stream_id,
            [new_event(decided, meta)],
            int(state["version"]),
            commands=[resume_human_command(run_id, stream_id, continuation_id, {"request_id": meta["request_id"]})],
        )
    except ConcurrencyConflict:
        raise ConcurrencyConflict(
            f"human task {continuation_id} is being resumed or closed by another request",
            continuation_id=continuation_id,
        ) from None
    fresh = await gw.kernel.store.get_run(run_id)
    assert fresh is not None
    return JSONBody(run_body(fresh))


async def resume_task(
    continuation_id: str,
    body: ResumeRequest,
    request: Request,
    principal: Annotated[Principal, Depends(require("human:write"))],
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONBody:
    """Record a reviewer's decision; answers once it is recorded (the run goes on in the background)."""
    return await _resume(continuation_id, body, request, principal, idempotency_key)


# one handler, two paths: /continuations/{id}/resume is the seed's alias
router.add_api_route("/human-tasks/{continuation_id}/resume", resume_task, methods=["POST"])
router.add_api_route(
    "/continuations/{continuation_id}/resume", resume_task, methods=["POST"], name="resume_continuation"
)
