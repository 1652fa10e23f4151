"""Exception handlers: the one hierarchy rendered in each face's envelope (DECISIONS "Errors").

* Kneo face (``/v1/...`` and the legacy aliases): ``{"error": <code>, "message", ...context}``.
* Jobs face (``/jobs``, ``/webhooks``, ``/workspaces``, ``/console``): ``{"error": <message>, "detail": <context>,
  "code": <UPPER_CODE>}`` with the seed's codes (BAD_REQUEST, UNAUTHORIZED, FORBIDDEN, NOT_FOUND, CONFLICT, …).
* Knap face (``/api/...``): ``{"detail": <message>}``; validation errors are 400 there.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kneo_events.errors import KneoError
from kneo_gateway.responses import JSONBody

log = logging.getLogger("kneo.service")

_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    429: "rate_limited",
}
_JOBS_PREFIXES = ("/jobs", "/webhooks", "/workspaces", "/console")
_JOBS_CODES = {400: "BAD_REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND", 409: "CONFLICT"}


def face_of(path: str) -> str:
    """Which face a request path belongs to: ``knap``, ``jobs`` or ``kneo``."""
    if path.startswith("/api/"):
        return "knap"
    if any(path == p or path.startswith(p + "/") for p in _JOBS_PREFIXES):
        return "jobs"
    return "kneo"


def render(path: str, status: int, code: str, message: str, context: dict[str, Any] | None = None) -> dict[str, Any]:
    """The error body for a request to ``path``, in its face's envelope."""
    context = context or {}
    face = face_of(path)
    if face == "knap":  # the seed's clients know exactly this for a missing or bad token
        return {"detail": "Not authenticated" if status == 401 else message}
    if face == "jobs":
        detail = context.get("detail")
        if detail is None and context:
            detail = context
        upper = _JOBS_CODES.get(status) or code.upper()
        return {"error": message, "detail": detail, "code": upper}
    return {"error": code, "message": message, **context}


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""

    @app.exception_handler(KneoError)
    async def kneo_error(request: Request, exc: KneoError) -> JSONBody:
        body = render(request.url.path, exc.status_code, exc.code, exc.message, exc.context)
        return JSONBody(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONBody:
        details: list[dict[str, Any]] = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()
        ]
        face = face_of(request.url.path)
        if face == "knap":  # the Knap face answers 400 {"detail": ...} with what was wrong
            text = "; ".join(f"{'.'.join(str(p) for p in d['loc'][1:]) or 'body'}: {d['msg']}" for d in details)
            return JSONBody({"detail": f"Invalid request parameters: {text}"}, status_code=400)
        if face == "jobs":
            return JSONBody({"error": "Invalid request", "detail": details, "code": "BAD_REQUEST"}, status_code=400)
        return JSONBody(
            {"error": "invalid_request", "message": "request validation failed", "details": details},
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONBody:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code
        return JSONBody(
            render(request.url.path, exc.status_code, code, message),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONBody:
        rid = _request_id(request)
        log.exception("unhandled error", extra={"request_id": rid})
        body = render(request.url.path, 500, "internal_error", "internal server error", {"request_id": rid})
        if face_of(request.url.path) == "jobs":
            body["code"] = "INTERNAL_ERROR"
        return JSONBody(body, status_code=500)
