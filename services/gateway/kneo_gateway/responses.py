"""The JSON response class of every route (orjson), and the documented error envelope."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict
from starlette.responses import JSONResponse


class JSONBody(JSONResponse):
    """JSON rendered with orjson (non-str keys and datetimes allowed)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


class ErrorBody(BaseModel):
    """The Kneo-face error envelope: ``{"error": <code>, "message": <text>, ...context}``."""

    model_config = ConfigDict(extra="allow")
    error: str
    message: str


_ERROR = {"model": ErrorBody}
# Responses every route may give; routes add their own.
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {**_ERROR, "description": "invalid_request"},
    401: {**_ERROR, "description": "unauthorized"},
    403: {**_ERROR, "description": "forbidden (names required_scope)"},
    404: {**_ERROR, "description": "not_found"},
    409: {**_ERROR, "description": "conflict: idempotency_key_conflict, resource_locked or invalid_state"},
    413: {**_ERROR, "description": "payload_too_large"},
    422: {**_ERROR, "description": "invalid_request with details"},
    429: {**_ERROR, "description": "rate_limited"},
    500: {**_ERROR, "description": "internal_error (carries request_id)"},
    503: {**_ERROR, "description": "not_ready"},
}
