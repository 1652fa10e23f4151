"""Typed errors of the Python SDK: one class per kind of answer, each carrying the service's error envelope.

``ServiceError`` is the base (``status``, ``code``, ``body``, ``retryable``); :func:`error_for` picks the subclass
from the HTTP status. Network failures stay ``httpx.TransportError`` (raised after the retries are spent).
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """The service answered with an error envelope: the Kneo face's ``{"error": code, "message": …}``, the Jobs
    face's ``{"error": message, "detail", "code"}`` or the Knap face's ``{"detail": message}``."""

    retryable = False

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers or {}
        code, message = _envelope(body)
        super().__init__(f"{status} {code}: {message}" if code else f"{status}: {message}")
        self.code: str | None = code
        self.message: str = str(message)


def _envelope(body: Any) -> tuple[str | None, Any]:
    """(code, message) of any face's error body."""
    if not isinstance(body, dict):
        return None, str(body)
    if "code" in body and "detail" in body:  # the Jobs face
        detail = body.get("detail")
        extra = f" ({detail})" if isinstance(detail, str) and detail else ""
        return str(body.get("code")), f"{body.get('error')}{extra}"
    if "detail" in body and "error" not in body:  # the Knap face
        return None, body["detail"]
    return body.get("error"), body.get("message")


class AuthError(ServiceError):
    """401 (no or unknown API key) or 403 (the key lacks a scope)."""


class NotFoundError(ServiceError):
    """404: the run, task or route does not exist."""


class ConflictError(ServiceError):
    """409: ``invalid_state``, ``resource_locked`` or ``idempotency_key_conflict``."""


class ValidationError(ServiceError):
    """400 or 422: the request (or the spec in it) is not acceptable; ``body`` says why."""


class RateLimitedError(ServiceError):
    """429: the rate limit is spent; ``retry_after`` is the server's ``Retry-After`` in seconds (or None)."""

    retryable = True

    @property
    def retry_after(self) -> float | None:
        """Seconds the server asked us to wait."""
        return parse_retry_after(self.headers.get("retry-after"))


class ServiceUnavailable(ServiceError):
    """502, 503 or 504: the service (or a dependency behind it) is not ready; retrying later may succeed."""

    retryable = True


_BY_STATUS: dict[int, type[ServiceError]] = {
    400: ValidationError,
    401: AuthError,
    403: AuthError,
    404: NotFoundError,
    409: ConflictError,
    422: ValidationError,
    429: RateLimitedError,
    502: ServiceUnavailable,
    503: ServiceUnavailable,
    504: ServiceUnavailable,
}


def error_for(status: int, body: Any, headers: dict[str, str] | None = None) -> ServiceError:
    """The typed error for an HTTP error answer (``ServiceError`` itself for statuses without a subclass)."""
    lowered = {k.lower(): v for k, v in (headers or {}).items()}
    return _BY_STATUS.get(status, ServiceError)(status, body, lowered)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds (the delta-seconds form; an HTTP date is ignored)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return max(0.0, seconds)
