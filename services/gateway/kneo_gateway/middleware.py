"""Pure-ASGI middleware shared by every route: request ids, body-size limit, request logs."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kneo_events.ids import new_request_id
from kneo_gateway.errors import render

log = logging.getLogger("kneo.service")


class RequestContext:
    """Accepts or generates ``X-Request-ID``, returns it, and logs one record per request."""

    def __init__(self, app: ASGIApp, request_logs: bool) -> None:
        self.app = app
        self.request_logs = request_logs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for k, v in scope.get("headers", []):
            if k == b"x-request-id":
                rid = v.decode("latin-1")[:128]
                break
        rid = rid or new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(b"x-request-id", rid.encode("latin-1"))]
                rate = scope["state"].get("rate_headers")
                if rate and status != 429:  # a 429 carries its own rate-limit headers
                    extra += [(k.lower().encode(), v.encode()) for k, v in rate.items()]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if self.request_logs and log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                record: dict[str, Any] = {
                    "event": "http_request",
                    "request_id": rid,
                    "method": scope.get("method"),
                    "path": scope.get("path"),
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                    "client": client[0] if client else None,
                }
                for key in ("run_id", "continuation_id", "trace_id", "actor"):
                    value = scope["state"].get(key)
                    if value:
                        record[key] = value
                log.info("http_request", extra={"fields": record})


class BodyLimit:
    """413 for bodies over the limit, counted while streaming (a lying or missing Content-Length can't pass).

    ``streamed`` maps path prefixes (e.g. ``/workspaces``, whose uploads are large) to their own limit; those bodies
    are passed through as they arrive, counted, instead of being read into memory first.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, streamed: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.streamed = streamed or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        limit = next(
            (n for p, n in self.streamed.items() if path == p or path.startswith(p + "/")),
            None,
        )
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    declared = 0
                if declared > (limit or self.max_bytes):
                    await self._reject(scope, send, limit)
                    return
        if limit is not None:
            await self._pass_counted(scope, receive, send, limit)
            return
        # Read the whole body up front (bounded), then replay it: the limit holds whatever the headers say.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._reject(scope, send)
                return
            chunks.append(body)
            more = message.get("more_body", False)
        payload = b"".join(chunks)
        problem = _json_text_problem(payload) if payload and _is_json(scope) else None
        if problem:
            body = render(scope["path"], 400, "invalid_request", problem, {"field": "body"})
            await _send_json(send, 400, body)
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": payload, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _pass_counted(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Stream the body to the app, counting; past ``limit`` the app's answer is replaced by a 413."""
        size = 0
        over = False
        started = False

        async def counted() -> Message:
            nonlocal size, over
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    over = True
                    raise _BodyTooLarge
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if over:
                return  # whatever the app makes of the cut-off body, the answer is our 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._reject(scope, send, limit)

    async def _reject(self, scope: Scope, send: Send, limit: int | None = None) -> None:
        limit = limit or self.max_bytes
        body = orjson.dumps(
            render(
                scope["path"],
                413,
                "payload_too_large",
                f"request body exceeds {limit} bytes",
                {"limit": limit, "field": "body"},
            )
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    """Raised into the app from ``receive`` when a streamed body passes its limit."""


def _is_json(scope: Scope) -> bool:
    for k, v in scope.get("headers", []):
        if k == b"content-type":
            return b"json" in v.lower()
    return False


def _json_text_problem(payload: bytes) -> str | None:
    """Why a JSON body's strings can't be stored (lone surrogates, NUL characters), or None.

    Malformed JSON is not our business here: the framework answers it with a 422 and details.
    """
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        import json

        try:
            json.loads(payload)
        except ValueError:
            return None
        return "the JSON body contains invalid Unicode (a lone surrogate)"
    if b"\\u0000" in payload and _has_nul(data):
        return "the JSON body contains a NUL character (\\u0000), which text fields cannot store"
    if _LONG_DIGITS.search(payload) and _has_huge_int(_stdlib_json(payload)):  # orjson reads them as floats
        return "the JSON body contains an integer that does not fit in 64 bits"
    return None


_LONG_DIGITS = re.compile(rb"\d{19,}")


def _stdlib_json(payload: bytes) -> Any:
    import json

    return json.loads(payload)


def _has_huge_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return not -(2**63) <= value < 2**64
    if isinstance(value, dict):
        return any(_has_huge_int(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_huge_int(v) for v in value)
    return False


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    raw = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": raw})
