"""One exception hierarchy for every service and face.

Each class carries its HTTP status, a stable error ``code`` and whether a retry may succeed. Routers never
build error bodies: each face has one exception handler that renders these in its own envelope.
"""

from __future__ import annotations

from typing import Any


class KneoError(Exception):
    """Base of every error Kneo raises on purpose."""

    status_code: int = 500
    code: str = "internal_error"
    retryable: bool = False

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = context
        self.headers: dict[str, str] | None = None  # extra response headers (e.g. Retry-After)

    def to_body(self) -> dict[str, Any]:
        """The Kneo-face envelope ``{"error", "message", ...context}``."""
        return {"error": self.code, "message": self.message, **self.context}


class InvalidRequest(KneoError):
    """The request is malformed or names something that cannot be used."""

    status_code = 400
    code = "invalid_request"


class NotFound(KneoError):
    """The addressed resource does not exist."""

    status_code = 404
    code = "not_found"


class InvalidState(KneoError):
    """The resource exists but its state forbids the operation."""

    status_code = 409
    code = "invalid_state"


class PayloadTooLarge(KneoError):
    """A body or a field exceeds its configured limit."""

    status_code = 413
    code = "payload_too_large"


class NotReady(KneoError):
    """A dependency is not available yet."""

    status_code = 503
    code = "not_ready"
    retryable = True


class ConcurrencyConflict(KneoError):
    """An append named an expected version that is no longer current. Reload and retry."""

    status_code = 409
    code = "resource_locked"
    retryable = True


class SpecError(KneoError):
    """A spec could not be loaded or validated; ``diagnostics`` says why."""

    status_code = 400
    code = "invalid_spec"


class IdempotencyConflict(KneoError):
    """An Idempotency-Key was reused with a different request."""

    status_code = 409
    code = "idempotency_key_conflict"


class ResourceLocked(KneoError):
    """Another request holds the resource right now; retry later."""

    status_code = 409
    code = "resource_locked"
    retryable = True
