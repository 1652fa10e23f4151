"""The kneo CLI and the Python client SDK.

``ServiceClient`` (blocking) and ``AsyncServiceClient`` talk to the Kneo platform API; failures raise the typed
errors below (each with ``status``, ``code`` and ``body``). See docs/sdk.md.
"""

from kneo_client.client import ServiceClient
from kneo_client.errors import (
    AuthError,
    ConflictError,
    NotFoundError,
    RateLimitedError,
    ServiceError,
    ServiceUnavailable,
    ValidationError,
)
from kneo_client.sdk import AsyncServiceClient, SseEvent

__all__ = [
    "AsyncServiceClient",
    "AuthError",
    "ConflictError",
    "NotFoundError",
    "RateLimitedError",
    "ServiceClient",
    "ServiceError",
    "ServiceUnavailable",
    "SseEvent",
    "ValidationError",
]
