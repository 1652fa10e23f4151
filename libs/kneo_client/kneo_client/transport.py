"""The SDK's HTTP transport: retries with backoff for calls that are safe to repeat, and an ``Idempotency-Key`` on
every POST, so that a repeated POST is answered from the service's idempotency record instead of acting twice.

It wraps httpx's own transport, so every method of the clients gets the same policy without repeating it:

- safe to repeat: GET, HEAD, OPTIONS, PUT, DELETE, and a POST that carries an ``Idempotency-Key`` (the SDK adds a
  fresh one to every POST that has none; ``KNEO_SERV_IDEMPOTENCY_KEY`` sets a stable one instead);
- retried: network errors and timeouts, and the answers 408, 429, 500, 502, 503, 504 (seeds/004 "Retry, timeout,
  and idempotency"), at most ``KNEO_SERV_CLIENT_RETRIES`` times (default 2), waiting
  ``KNEO_SERV_CLIENT_RETRY_BACKOFF_SECONDS × 2^attempt`` (default 0.25 s), or the server's ``Retry-After`` when it
  says longer (capped at :data:`MAX_RETRY_WAIT_SECONDS`);
- everything else (401, 403, 404, 409, 400, 422 …) fails at once.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from kneo_client.errors import parse_retry_after

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
MAX_RETRY_WAIT_SECONDS = 30.0
IDEMPOTENCY_HEADER = "Idempotency-Key"
_RETRY_ERRORS = (
    httpx.NetworkError,
    httpx.ConnectTimeout,
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.RemoteProtocolError,
)


class ClientSettings(BaseSettings):
    """``KNEO_SERV_CLIENT_*`` and ``KNEO_SERV_IDEMPOTENCY_KEY`` (seed defaults), read when a client is built."""

    model_config = SettingsConfigDict(env_prefix="KNEO_SERV_CLIENT_", extra="ignore", populate_by_name=True)

    timeout: float = Field(default=120.0, gt=0, description="HTTP timeout in seconds.")
    retries: int = Field(default=2, ge=0, le=20, description="Retries of a transient failure.")
    retry_backoff_seconds: float = Field(default=0.25, ge=0, le=60, description="Base of the exponential backoff.")
    idempotency_key: str | None = Field(
        default=None,
        validation_alias="KNEO_SERV_IDEMPOTENCY_KEY",
        description="A stable Idempotency-Key for every POST (default: a fresh one per call).",
    )


def is_repeatable(request: httpx.Request) -> bool:
    """Whether sending ``request`` twice has the effect of sending it once."""
    return request.method in SAFE_METHODS or (request.method == "POST" and IDEMPOTENCY_HEADER in request.headers)


class RetryTransport(httpx.AsyncBaseTransport):
    """Adds the Idempotency-Key and retries transient failures of repeatable requests (see the module docstring)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, settings: ClientSettings) -> None:
        self.inner = inner
        self.settings = settings

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and IDEMPOTENCY_HEADER not in request.headers:
            request.headers[IDEMPOTENCY_HEADER] = self.settings.idempotency_key or str(uuid.uuid4())
        attempt = 0
        while True:
            try:
                response = await self.inner.handle_async_request(request)
            except _RETRY_ERRORS as exc:
                # A refused connection never reached the server, so even a non-repeatable request may go again.
                if attempt >= self.settings.retries or not (is_repeatable(request) or _not_sent(exc)):
                    raise
                await asyncio.sleep(self._backoff(attempt, None))
                attempt += 1
                continue
            if response.status_code not in RETRY_STATUSES or attempt >= self.settings.retries:
                return response
            if not is_repeatable(request):
                return response
            wait = self._backoff(attempt, parse_retry_after(response.headers.get("retry-after")))
            await response.aclose()
            await asyncio.sleep(wait)
            attempt += 1

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        wait = float(self.settings.retry_backoff_seconds * 2**attempt)
        if retry_after is not None:
            wait = max(wait, retry_after)
        return min(wait, MAX_RETRY_WAIT_SECONDS)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _not_sent(exc: Any) -> bool:
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
