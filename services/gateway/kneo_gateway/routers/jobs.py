"""The Jobs face (seeds/000-002, docs/jobs.md): jobs are runs of a built-in template per ``job_type``.

Paths have no ``/v1`` prefix (they are the seed's own). Errors are rendered ``{"error", "detail", "code"}`` by
kneo_gateway.errors. Scopes: ``jobs:read`` for the GET routes (the SSE stream also takes ``?access_token=``),
``jobs:write`` to create, continue and clean up.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from kneo_events import sandboxes
from kneo_events.errors import ConcurrencyConflict, InvalidRequest, InvalidState, NotFound
from kneo_events.ids import run_stream
from kneo_events.jobs import JOB_STATUSES, JOB_TYPES, is_job, job_status, job_summary, new_job_id
from kneo_events.projections import TERMINAL_STATUSES
from kneo_events.schemas import dumps
from kneo_gateway.auth import Principal, require
from kneo_gateway.jobs import specs, views
from kneo_gateway.responses import JSONBody
from kneo_gateway.routers.runs import RunStart, once
from kneo_gateway.runs_io import RunRequest
from kneo_gateway.state import Gateway


class CurlJsonRoute(APIRoute):
    """Reads a body sent as ``application/x-www-form-urlencoded`` as JSON.

    That is what ``curl -d '{...}'`` sends when no ``Content-Type`` is given, as the seed's own shorthand examples do
    (seeds/000 "Reuse Sandboxes": ``curl -X POST .../jobs -d '{"spec": {...}}'``). Without this FastAPI would not
    parse such a body at all and answer 400 for a well-formed spec. The Jobs routes take no form bodies, so nothing
    is lost; a body that is not JSON is still a 400.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if ctype == "application/x-www-form-urlencoded":
                headers = [(k, v) for k, v in request.scope["headers"] if k.lower() != b"content-type"]
                headers.append((b"content-type", b"application/json"))
                request = Request({**request.scope, "headers": headers}, request.receive)
            return await handler(request)

        return route


router = APIRouter(tags=["jobs"], route_class=CurlJsonRoute)

MAX_PAGE_SIZE = 100
# job status -> the SQL condition on the runs projection (``cleaned`` wins over the run's own status)
_CLEANED = "(state->'metadata'->>'cleaned_at') IS NOT NULL"
_STATUS_SQL = {
    "queued": "status = 'queued'",
    "running": "status IN ('running', 'paused')",
    "completed": "status = 'succeeded'",
    "failed": "status IN ('failed', 'expired', 'timed_out')",
    "cancelled": "status = 'cancelled'",
}


class JobError(BaseModel):
    """The Jobs face's error envelope."""

    error: str
    detail: Any = None
    code: str


JOB_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": JobError, "description": text}
    for code, text in (
        (400, "Invalid request (BAD_REQUEST)"),
        (401, "Missing or invalid API key (UNAUTHORIZED)"),
        (403, "The key lacks the route's scope (FORBIDDEN)"),
        (404, "No such job (NOT_FOUND)"),
        (409, "The job's state forbids it (CONFLICT)"),
    )
}


class JobRequest(BaseModel):
    """``POST /jobs`` and ``POST /jobs/{id}/continue``: ``{"spec": {...}}``.

    ``spec``: ``job_type`` (cursor_task, gemini_task, claude_task, fh_e2e_tools, user_exam), ``prompt`` (required
    except for user_exam), ``model`` (auto, sonnet-4.5, opus-4.1, composer-1, gpt-5 or a name of
    ``KNEO_JOBS_MODEL_MAP``), ``workspace_path``, ``session_id``, ``user_id`` and ``time_range`` ({from, to}; both
    required for user_exam), ``metadata``. On continue, ``job_type`` defaults to the parent's.
    """

    model_config = ConfigDict(extra="forbid")
    spec: dict[str, Any] = Field(
        description="The job spec.", examples=[{"job_type": "cursor_task", "prompt": "Write a fibonacci script"}]
    )


class JobCreated(BaseModel):
    """The answer of ``POST /jobs`` (continue adds ``parent_job_id``)."""

    job_id: str
    status: str
    sandbox_id: str | None = None
    cursor_session_id: str | None = None
    parent_job_id: str | None = None


def _gw(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


async def _job(gw: Gateway, job_id: str) -> dict[str, Any]:
    state = await gw.kernel.store.get_run(job_id)
    if not is_job(state):
        raise NotFound(f"job {job_id} not found", detail={"job_id": job_id})
    assert state is not None
    return state


def _created(state: dict[str, Any]) -> dict[str, Any]:
    job = (state.get("metadata") or {}).get("job") or {}
    out = {
        "job_id": state["run_id"],
        "status": job_status(state),
        "sandbox_id": job.get("sandbox_id"),
        "cursor_session_id": job.get("cursor_session_id"),
    }
    if job.get("parent_job_id"):
        out["parent_job_id"] = job["parent_job_id"]
    return out


async def _start(
    request: Request,
    principal: Principal,
    spec: specs.JobSpec,
    parent: dict[str, Any] | None,
    idempotency_key: str | None,
    route: str,
    fingerprint: Any,
) -> JSONBody:
    """Start a job (a run of its template) the way ``POST /v1/runs`` starts a run, once per Idempotency-Key."""
    gw = _gw(request)
    settings = gw.settings
    workspace = specs.workspace_source(settings, spec.workspace_path)  # a bad workspace is a 400 before anything
    started: list[str] = []

    async def start(job_id: str) -> tuple[int, dict[str, Any]]:
        started.append(job_id)
        held = False
        if parent is None:
            sandbox_id = sandboxes.new_sandbox_id()
            session_id = spec.session_id or specs.new_session_id()
            parent_id = None
        else:
            pjob = parent["metadata"]["job"]
            sandbox_id, session_id, parent_id = pjob["sandbox_id"], pjob["cursor_session_id"], parent["run_id"]
            # One job at a time per sandbox: queue behind the newest unfinished job using it (the parent, or an
            # earlier continuation: seeds/000 continues one $JOB_ID three times in a row).
            busy = [
                j["run_id"]
                for j in await sandboxes.jobs_of_sandbox(gw.kernel, sandbox_id)
                if j["status"] not in TERMINAL_STATUSES
            ]
            held = bool(busy)
        run_spec = specs.build_spec(
            spec,
            settings,
            job_id=job_id,
            sandbox=sandboxes.sandbox_path(settings, sandbox_id),
            session_id=session_id,
            parent_job_id=parent_id,
            workspace=workspace,
        )
        job_meta: dict[str, Any] = {
            "job_type": spec.job_type,
            "model": spec.model,
            "spec": spec.raw,
            "parent_job_id": parent_id,
            "sandbox_id": sandbox_id,
            "cursor_session_id": session_id,
        }
        if held:
            job_meta["queued_behind"] = busy[-1]
        body = RunRequest(input=spec.prompt, async_mode=True, metadata={"job": job_meta})
        run = RunStart(gw, request, body, run_spec, None, principal.name)
        run.route, run.face = route, "jobs"
        try:
            await run.append(job_id, compile_now=not held)
        except ConcurrencyConflict:  # a taken-over Idempotency-Key claim: this job exists already
            pass
        else:
            if held:
                await sandboxes.hold(gw.kernel, job_id)
        state = await gw.kernel.store.get_run(job_id)
        assert state is not None
        return 200, _created(state)

    async def settled() -> tuple[int, dict[str, Any]] | None:
        state = await gw.kernel.store.get_run(started[-1]) if started else None
        return None if state is None else (200, _created(state))

    return await once(request, principal, idempotency_key, route, fingerprint, new_job_id, start, settled)


@router.post("/jobs", response_model=JobCreated, responses=JOB_ERRORS)
async def create_job(
    body: JobRequest,
    request: Request,
    principal: Annotated[Principal, Depends(require("jobs:write"))],
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONBody:
    """Create and start a job: a run of the built-in template of its ``job_type`` in a new sandbox.

    200 ``{"job_id", "status", "sandbox_id", "cursor_session_id"}`` at once (follow it with the events, the cursor
    stream or a webhook). With an ``Idempotency-Key``, a repeat replays the first answer and starts nothing.
    """
    spec = specs.parse_spec(body.spec, _gw(request).settings)
    fingerprint = body.model_dump(mode="json")
    return await _start(request, principal, spec, None, idempotency_key, "POST /jobs", fingerprint)


@router.get("/jobs", dependencies=[Depends(require("jobs:read"))], responses=JOB_ERRORS)
async def list_jobs(
    request: Request,
    page: Annotated[int, Query(description="Page number, from 1")] = 1,
    limit: Annotated[int, Query(description="Jobs per page (max 100; larger is clamped)")] = 20,
    status: Annotated[str | None, Query(description=f"One of {', '.join(JOB_STATUSES)}")] = None,
    job_type: Annotated[str | None, Query(description=f"One of {', '.join(JOB_TYPES)}")] = None,
) -> JSONBody:
    """A page of jobs, newest first: ``{"data": [...], "pagination": {page, limit, total, pages}}``."""
    # (the refused values are echoed as text: an integer past 64 bits can't be rendered as JSON)
    if page < 1 or limit < 1:
        raise InvalidRequest("page and limit must be at least 1", detail={"page": str(page), "limit": str(limit)})
    if page > 1_000_000:
        raise InvalidRequest("page is out of range (at most 1000000)", detail={"page": str(page)})
    limit = min(limit, MAX_PAGE_SIZE)
    where = ["face = 'jobs'"]
    args: list[Any] = []
    if status is not None:
        if status not in JOB_STATUSES:
            raise InvalidRequest(
                f"unknown status {status[:50]!r}; known: {', '.join(JOB_STATUSES)}",
                detail={"known_statuses": list(JOB_STATUSES)},
            )
        where.append(_CLEANED if status == "cleaned" else f"{_STATUS_SQL[status]} AND NOT {_CLEANED}")
    if job_type is not None:
        if job_type not in JOB_TYPES:
            raise InvalidRequest(
                f"unknown job_type {job_type[:50]!r}; known job types: {', '.join(JOB_TYPES)}",
                detail={"known_job_types": list(JOB_TYPES)},
            )
        args.append(job_type)
        where.append(f"state->'metadata'->'job'->>'job_type' = ${len(args)}")
    clause = " AND ".join(where)
    pool = _gw(request).kernel.store.pool
    rows = await pool.fetch(
        f"SELECT state FROM runs WHERE {clause} ORDER BY created_at DESC, run_id DESC "
        f"LIMIT ${len(args) + 1} OFFSET ${len(args) + 2}",
        *args,
        limit,
        (page - 1) * limit,
    )
    total = int(await pool.fetchval(f"SELECT count(*) FROM runs WHERE {clause}", *args))
    return JSONBody(
        {
            "data": [job_summary(dict(r["state"])) for r in rows],
            "pagination": {"page": page, "limit": limit, "total": total, "pages": math.ceil(total / limit)},
        }
    )


async def _events(gw: Gateway, job_id: str) -> list[dict[str, Any]]:
    return [e.wire() for e in await gw.kernel.store.read_stream(run_stream(job_id))]


def _sandbox_root(gw: Gateway, state: dict[str, Any]) -> Any:
    job = state["metadata"]["job"]
    if (state.get("metadata") or {}).get("cleaned_at") or not job.get("sandbox_id"):
        return None
    return sandboxes.sandbox_path(gw.settings, job["sandbox_id"])


@router.get("/jobs/{job_id}", dependencies=[Depends(require("jobs:read"))], responses=JOB_ERRORS)
async def get_job(job_id: str, request: Request) -> JSONBody:
    """The job: spec, status, timestamps, sandbox, session, progress events, artifact names, error."""
    gw = _gw(request)
    request.state.run_id = job_id
    state = await _job(gw, job_id)
    root = _sandbox_root(gw, state)
    files = await anyio.to_thread.run_sync(views.list_files, root) if root is not None else []
    return JSONBody(views.job_detail(state, job_summary(state), await _events(gw, job_id), files))


@router.get("/jobs/{job_id}/events", dependencies=[Depends(require("jobs:read"))], responses=JOB_ERRORS)
async def get_job_events(job_id: str, request: Request) -> JSONBody:
    """The job's progress: ``{"events": [{ts, stage, level, detail}]}`` (derived from its run's events)."""
    gw = _gw(request)
    state = await _job(gw, job_id)
    job = state["metadata"]["job"]
    return JSONBody({"events": views.stages(await _events(gw, job_id), job)})


@router.get("/jobs/{job_id}/artifacts", dependencies=[Depends(require("jobs:read"))], responses=JOB_ERRORS)
async def get_job_artifacts(job_id: str, request: Request) -> JSONBody:
    """The files of the job's sandbox, name -> content (``.json`` parsed; bounded, see docs/jobs.md)."""
    gw = _gw(request)
    state = await _job(gw, job_id)
    root = _sandbox_root(gw, state)
    if root is None:
        return JSONBody({})
    s = gw.settings
    return JSONBody(
        await anyio.to_thread.run_sync(
            views.read_artifacts, root, s.jobs_artifact_max_bytes, s.jobs_artifacts_max_total_bytes
        )
    )


@router.get("/jobs/{job_id}/cursor", dependencies=[Depends(require("jobs:read"))], responses=JOB_ERRORS)
async def get_job_cursor(job_id: str, request: Request) -> JSONBody:
    """The agent's transcript: ``{"events": [{type: agent_message|tool_use|file_created|completed, …}]}``."""
    gw = _gw(request)
    state = await _job(gw, job_id)
    items = [item for ev in await _events(gw, job_id) for item in views.cursor_items(ev, state)]
    return JSONBody({"events": items})


def _resume_point(raw: str | None) -> tuple[int, int]:
    """``Last-Event-ID`` ``<version>.<n>`` -> the last item sent; none -> before everything."""
    if not raw:
        return 0, 1 << 30
    version, _, index = raw.partition(".")
    try:
        point = int(version), int(index) if index else 1 << 30
    except ValueError:
        raise InvalidRequest("Last-Event-ID must look like <version>.<n>") from None
    if not (0 <= point[0] < 2**31 and 0 <= point[1] <= 1 << 30):
        raise InvalidRequest("Last-Event-ID is out of range")
    return point


@router.get(
    "/jobs/{job_id}/cursor/stream",
    dependencies=[Depends(require("jobs:read", allow_query_token=True))],
    response_class=EventSourceResponse,
    responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}, "description": "SSE"},
        **JOB_ERRORS,
    },
)
async def stream_job_cursor(
    job_id: str,
    request: Request,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    deltas: Annotated[bool, Query(description="Also send the agent text as it streams (agent_message deltas)")] = False,
) -> EventSourceResponse:
    """SSE for ``EventSource.onmessage``: ``data:`` lines with the transcript items of ``/cursor``, history first, then
    live, ending with ``completed``. ``id:`` is ``<event version>.<n>``; reconnect with ``Last-Event-ID`` to resume
    with no duplicates. ``?access_token=`` is accepted (browsers cannot send headers on an EventSource)."""
    gw = _gw(request)
    await _job(gw, job_id)
    return EventSourceResponse(
        _cursor_stream(gw, job_id, _resume_point(last_event_id), deltas),
        ping=gw.settings.sse_heartbeat_seconds,
        send_timeout=30,
    )


async def _cursor_stream(
    gw: Gateway, job_id: str, point: tuple[int, int], deltas: bool
) -> AsyncIterator[ServerSentEvent]:
    store = gw.kernel.store
    stream_id = run_stream(job_id)
    idle_check = max(1.0, min(5.0, gw.settings.sse_heartbeat_seconds))
    seen = point[0] - 1 if point[1] < (1 << 30) else point[0]  # the last stored version fully handled
    done = False

    def handle(wire: dict[str, Any], state: dict[str, Any]) -> list[ServerSentEvent]:
        nonlocal seen, done
        version = int(wire["version"])
        out = []
        for i, item in enumerate(views.cursor_items(wire, state)):
            if (version, i) > point:
                out.append(ServerSentEvent(data=dumps(item).decode(), id=f"{version}.{i}"))
        seen = version
        done = done or wire["type"] in views.TERMINAL_EVENTS
        return out

    async def from_log(state: dict[str, Any]) -> list[ServerSentEvent]:
        out: list[ServerSentEvent] = []
        for ev in await store.read_stream(stream_id, seen + 1):
            if done:
                break
            out.extend(handle(ev.wire(), state))
        return out

    async with gw.hub.listen(job_id) as listener:  # listen first, then read history: nothing falls in between
        state = await store.get_run(job_id) or {}
        for sse in await from_log(state):
            yield sse
        while not done:
            if listener.lagged:
                listener.lagged = False
                while not listener.queue.empty():
                    listener.queue.get_nowait()
                for sse in await from_log(state):
                    yield sse
                continue
            try:
                async with asyncio.timeout(idle_check):
                    kind, item = await listener.queue.get()
            except TimeoutError:  # quiet: make sure nothing was missed live
                for sse in await from_log(state):
                    yield sse
                continue
            if kind == "event":
                version = int(item["version"])
                if version <= seen:
                    continue
                if version > seen + 1:  # a gap (a late publish): fill it from the log
                    for sse in await from_log(state):
                        yield sse
                    continue
                for sse in handle(item, state):
                    yield sse
            elif deltas and "text" in item and item.get("step_id") == "work" and int(item["after_version"]) >= seen:
                # ephemeral: no id (a resumed client gets the step's whole message from the log instead)
                delta = {"type": "agent_message", "delta": True, "message": item["text"], "timestamp": None}
                yield ServerSentEvent(data=dumps(delta).decode())


@router.post("/jobs/{job_id}/continue", response_model=JobCreated, responses=JOB_ERRORS)
async def continue_job(
    job_id: str,
    body: JobRequest,
    request: Request,
    principal: Annotated[Principal, Depends(require("jobs:write"))],
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONBody:
    """A new job linked to this one (``parent_job_id``), in the same sandbox and Cursor session.

    Allowed on a finished job (completed, failed, cancelled); a continuation of a queued or running job is queued
    behind it (it starts when that one ends); a cleaned job answers 409.
    """
    gw = _gw(request)
    parent = await _job(gw, job_id)
    if job_status(parent) == "cleaned":
        raise InvalidState(
            f"job {job_id} was cleaned up: its sandbox is deleted, so it cannot be continued; start a new job instead",
            detail={"job_id": job_id, "status": "cleaned"},
        )
    raw = dict(body.spec)
    raw.setdefault("job_type", parent["metadata"]["job"].get("job_type"))
    spec = specs.parse_spec(raw, gw.settings)
    fingerprint = {"parent": job_id, **body.model_dump(mode="json")}
    return await _start(request, principal, spec, parent, idempotency_key, "POST /jobs/{id}/continue", fingerprint)


@router.post("/jobs/{job_id}/cleanup", responses=JOB_ERRORS)
async def cleanup_job(
    job_id: str, request: Request, principal: Annotated[Principal, Depends(require("jobs:write"))]
) -> JSONBody:
    """Delete the job's sandbox for good (every job sharing it, i.e. its continuations, becomes ``cleaned``).

    409 while a job using the sandbox is queued or running; a repeat answers 200 again.
    """
    gw = _gw(request)
    state = await _job(gw, job_id)
    sandbox_id = state["metadata"]["job"]["sandbox_id"]
    if job_status(state) == "cleaned":
        return JSONBody(
            {"success": True, "message": "Sandbox already cleaned up", "job_id": job_id, "sandbox_id": sandbox_id}
        )
    meta = {"request_id": request.state.request_id, "actor": principal.name}
    cleaned = await sandboxes.clean_sandbox(gw.kernel, sandbox_id, reason="cleanup", metadata=meta)
    return JSONBody(
        {
            "success": True,
            "message": "Sandbox cleaned up successfully",
            "job_id": job_id,
            "sandbox_id": sandbox_id,
            "cleaned_jobs": cleaned,
        }
    )
