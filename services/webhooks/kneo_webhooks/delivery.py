"""Sending deliveries: lease due rows, POST the signed body, record every attempt, schedule the retry.

* A sender leases a due delivery (``FOR UPDATE SKIP LOCKED``, then ``lease_until``) and records the attempt as started
  in the same transaction, before any byte goes out; copies of the service never send one delivery at the same time.
* A crash mid-attempt leaves the lease to expire (the attempt timeout plus a margin); the next claim marks that
  attempt ``interrupted`` and sends again with the same body and ``X-Knify-Delivery`` id (at-least-once: receivers
  de-duplicate by it). A clean stop records the interruption at once and frees the delivery.
* SSRF: unless ``KNEO_WEBHOOKS_ALLOW_PRIVATE``, the host is resolved on every attempt, every address it resolves to
  must be public, and the request is sent to the address that was checked (the ``Host`` header and TLS SNI /
  certificate check keep the original name), so a DNS answer that changes between check and connect cannot steer it.
  Redirects are not followed and proxies from the environment are not used.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any

import httpx

from kneo_events import __version__
from kneo_events.redaction import redact_text
from kneo_events.sealing import Keyring, SealError
from kneo_events.settings import Settings
from kneo_events.store import EventStore
from kneo_events.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    address_refusal,
    backoff_seconds,
    sign,
)

log = logging.getLogger("kneo.webhooks")
LEASE_MARGIN_SECONDS = 5.0
EXCERPT_BYTES = 512
INTERRUPTED_CRASH = "interrupted: the sender stopped before recording an outcome (lease expired); sent again"
INTERRUPTED_STOP = "interrupted: the webhooks service stopped mid-attempt; sent again on the next start"


class Refused(Exception):
    """The target may not be called (SSRF rule) or the secret cannot be opened: retrying would not help."""


@dataclass(frozen=True)
class Claimed:
    """A delivery leased for one attempt."""

    delivery_id: str
    webhook_id: str
    event_type: str
    attempt: int
    failures: int
    body: bytes
    url: str
    secret: dict[str, Any]


@dataclass(frozen=True)
class Target:
    """Where an attempt connects: the URL to request, and the headers/extensions that keep the original host."""

    url: str
    headers: dict[str, str]
    extensions: dict[str, Any]


async def resolve_target(url: str, allow_private: bool, resolver: Any = None) -> Target:
    """The URL to request for ``url``: pinned to a checked public address unless private targets are allowed."""
    parsed = httpx.URL(url)
    if allow_private:
        return Target(url, {}, {})
    host = parsed.host
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        getaddrinfo = resolver or asyncio.get_running_loop().getaddrinfo
        try:
            infos = await getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConnectionError(f"cannot resolve {host}: {exc}") from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise ConnectionError(f"{host} resolves to no address")
    for address in addresses:  # every answer must be public: a mixed answer could send the next connect inside
        reason = address_refusal(address)
        if reason:
            shown = host if address == host else f"{host} resolves to {address}:"
            raise Refused(
                f"refused: {shown} {reason}; deliveries go only to public addresses "
                "unless KNEO_WEBHOOKS_ALLOW_PRIVATE=true"
            )
    pinned = addresses[0].split("%", 1)[0]
    extensions: dict[str, Any] = {"sni_hostname": host} if parsed.scheme == "https" else {}
    return Target(str(parsed.copy_with(host=pinned)), {"Host": parsed.netloc.decode("ascii")}, extensions)


class Sender:
    """Claims due deliveries and attempts them (one per process; several processes share the table safely)."""

    def __init__(self, store: EventStore, settings: Settings, keyring: Keyring, client: httpx.AsyncClient) -> None:
        self.store = store
        self.settings = settings
        self.keyring = keyring
        self.client = client
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.timeout = settings.webhooks_timeout_seconds
        self.allow_private = bool(settings.webhooks_allow_private)
        self.resolver: Any = None  # tests may stand in for DNS

    # ------------------------------------------------------------------ the table

    async def sweep(self) -> int:
        """Cancel the pending deliveries of deleted webhooks. Returns how many."""
        result = await self.store.pool.execute(
            "UPDATE webhook_deliveries d SET status = 'cancelled', completed_at = clock_timestamp(), "
            "updated_at = clock_timestamp(), last_error = 'webhook deleted' FROM webhooks w "
            "WHERE w.webhook_id = d.webhook_id AND w.status = 'deleted' AND d.status = 'pending' "
            "AND (d.lease_until IS NULL OR d.lease_until < clock_timestamp())"
        )
        return int(result.split()[-1])

    async def claim(self, limit: int) -> list[Claimed]:
        """Lease up to ``limit`` due deliveries of active webhooks and record their attempts as started."""
        lease = self.timeout + LEASE_MARGIN_SECONDS
        async with self.store.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """
                WITH due AS (
                    SELECT d.delivery_id FROM webhook_deliveries d JOIN webhooks w USING (webhook_id)
                    WHERE d.status = 'pending' AND w.status = 'active' AND d.next_attempt_at <= clock_timestamp()
                      AND (d.lease_until IS NULL OR d.lease_until < clock_timestamp())
                    ORDER BY d.next_attempt_at LIMIT $1
                    FOR UPDATE OF d SKIP LOCKED
                )
                UPDATE webhook_deliveries d SET attempts = d.attempts + 1, lease_owner = $3,
                    lease_until = clock_timestamp() + make_interval(secs => $2), updated_at = clock_timestamp()
                FROM due, webhooks w
                WHERE d.delivery_id = due.delivery_id AND w.webhook_id = d.webhook_id
                RETURNING d.delivery_id, d.webhook_id, d.event_type, d.attempts, d.failures, d.body, w.url, w.secret
                """,
                limit,
                lease,
                self.owner,
            )
            if not rows:
                return []
            ids = [r["delivery_id"] for r in rows]
            # an attempt still open here was cut off by a crash (its lease ran out): say so in the log
            await conn.execute(
                "UPDATE webhook_delivery_attempts SET finished_at = clock_timestamp(), error = $2 "
                "WHERE delivery_id = ANY($1::text[]) AND finished_at IS NULL",
                ids,
                INTERRUPTED_CRASH,
            )
            await conn.executemany(
                "INSERT INTO webhook_delivery_attempts (delivery_id, attempt, started_at) "
                "VALUES ($1, $2, clock_timestamp())",
                [(r["delivery_id"], r["attempts"]) for r in rows],
            )
        return [
            Claimed(
                r["delivery_id"],
                r["webhook_id"],
                r["event_type"],
                int(r["attempts"]),
                int(r["failures"]),
                r["body"].encode(),
                r["url"],
                dict(r["secret"]),
            )
            for r in rows
        ]

    async def seconds_until_due(self) -> float | None:
        """Seconds until the next pending delivery is due (``None`` when none is pending)."""
        value = await self.store.pool.fetchval(
            "SELECT EXTRACT(EPOCH FROM (min(greatest(next_attempt_at, coalesce(lease_until, next_attempt_at))) "
            "- clock_timestamp())) FROM webhook_deliveries WHERE status = 'pending'"
        )
        return None if value is None else max(0.0, float(value))

    # ------------------------------------------------------------------ one attempt

    async def attempt(self, c: Claimed) -> None:
        """Send one attempt of a claimed delivery and record its outcome (never raises but on cancellation)."""
        started = time.monotonic()
        status: int | None = None
        excerpt: str | None = None
        error: str | None = None
        permanent = False
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    status, excerpt = await self._post(c)
            except TimeoutError:
                error = f"timed out after {self.timeout:g}s"
            except Refused as exc:
                error, permanent = str(exc), True
            except (httpx.HTTPError, ConnectionError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except asyncio.CancelledError:
            await asyncio.wait_for(self._interrupted(c), timeout=5)
            raise
        except Exception as exc:  # a bug must not strand the delivery: it is retried like a failed attempt
            log.exception("webhook attempt %s/%d failed unexpectedly", c.delivery_id, c.attempt)
            error = f"internal error: {type(exc).__name__}"
        if status is not None and not 200 <= status < 300:
            error = f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")
        await self._record(c, status, error, excerpt, (time.monotonic() - started) * 1000, permanent)

    async def _post(self, c: Claimed) -> tuple[int, str]:
        try:
            secret = self.keyring.open(c.secret, c.webhook_id)
        except SealError as exc:
            raise Refused(f"cannot open the webhook's secret: {exc}") from exc
        target = await resolve_target(c.url, self.allow_private, self.resolver)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"kneo-webhooks/{__version__}",
            SIGNATURE_HEADER: sign(c.body, secret),
            TIMESTAMP_HEADER: str(int(time.time())),
            DELIVERY_HEADER: c.delivery_id,
            EVENT_HEADER: c.event_type,
            **target.headers,
        }
        async with self.client.stream(
            "POST", target.url, content=c.body, headers=headers, extensions=target.extensions
        ) as resp:
            chunk = b""
            async for part in resp.aiter_bytes():
                chunk += part
                if len(chunk) >= EXCERPT_BYTES:
                    break
            return resp.status_code, redact_text(chunk[:EXCERPT_BYTES].decode("utf-8", "replace"))

    async def _record(
        self,
        c: Claimed,
        status: int | None,
        error: str | None,
        excerpt: str | None,
        duration_ms: float,
        permanent: bool,
    ) -> None:
        failures = c.failures + (0 if error is None else 1)
        next_retry: float | None = None
        if error is None:
            outcome = "succeeded"
        elif permanent or failures >= self.settings.webhooks_max_attempts:
            outcome = "failed"
        else:
            outcome = "pending"
            next_retry = backoff_seconds(
                failures,
                self.settings.webhooks_backoff_base_seconds,
                self.settings.webhooks_backoff_max_seconds,
                random.uniform(0.5, 1.0),
            )
        async with self.store.pool.acquire() as conn, conn.transaction():
            updated = await conn.fetchval(
                """
                UPDATE webhook_deliveries SET status = $3, failures = $4, last_status_code = $5, last_error = $6,
                    next_attempt_at = CASE WHEN $7::float8 IS NULL THEN next_attempt_at
                                           ELSE clock_timestamp() + make_interval(secs => $7::float8) END,
                    completed_at = CASE WHEN $3 = 'pending' THEN NULL ELSE clock_timestamp() END,
                    lease_until = NULL, lease_owner = NULL, updated_at = clock_timestamp()
                WHERE delivery_id = $1 AND attempts = $2 AND lease_owner = $8
                RETURNING next_attempt_at
                """,
                c.delivery_id,
                c.attempt,
                outcome,
                failures,
                status,
                error,
                next_retry,
                self.owner,
            )
            if updated is None:  # our lease ran out and another sender took the delivery over: it decides now
                log.warning("webhook delivery %s attempt %d finished after its lease", c.delivery_id, c.attempt)
            await conn.execute(
                "UPDATE webhook_delivery_attempts SET finished_at = clock_timestamp(), status_code = $3, error = $4, "
                "response_excerpt = $5, duration_ms = $6, next_retry_at = $7 "
                "WHERE delivery_id = $1 AND attempt = $2 AND finished_at IS NULL",
                c.delivery_id,
                c.attempt,
                status,
                error,
                excerpt,
                duration_ms,
                updated if (updated is not None and outcome == "pending") else None,
            )
        if error is None:
            log.info("webhook delivery %s delivered (attempt %d, HTTP %s)", c.delivery_id, c.attempt, status)
        else:
            log.info("webhook delivery %s attempt %d: %s -> %s", c.delivery_id, c.attempt, error, outcome)

    async def _interrupted(self, c: Claimed) -> None:
        async with self.store.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE webhook_delivery_attempts SET finished_at = clock_timestamp(), error = $3 "
                "WHERE delivery_id = $1 AND attempt = $2 AND finished_at IS NULL",
                c.delivery_id,
                c.attempt,
                INTERRUPTED_STOP,
            )
            await conn.execute(
                "UPDATE webhook_deliveries SET lease_until = NULL, lease_owner = NULL, "
                "next_attempt_at = clock_timestamp(), updated_at = clock_timestamp() "
                "WHERE delivery_id = $1 AND attempts = $2 AND lease_owner = $3",
                c.delivery_id,
                c.attempt,
                self.owner,
            )
