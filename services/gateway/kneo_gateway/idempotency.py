"""Idempotency-Key handling (seeds/004 "Idempotency"; DECISIONS: scoped per API key and route, 24 h window).

The first request with a key claims a record (``INSERT … ON CONFLICT DO NOTHING``: exactly one claimant, however many
duplicates race) that names the resource it will create; when it has answered, its response is stored. A repeat
with the same payload gets that response back (waiting, bounded, while the first is still in flight); a different
payload gets 409 ``idempotency_key_conflict``. Records older than ``KNEO_SERV_IDEMPOTENCY_WINDOW_SECONDS`` no longer
count. A claim left behind by a crashed request is taken over after ``stale_after`` seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from kneo_events.errors import IdempotencyConflict, InvalidRequest, ResourceLocked
from kneo_events.store import EventStore

MAX_KEY_CHARS = 255


@dataclass(frozen=True)
class Claim:
    """Either ours to fulfil (``replay is None``), or the stored first response to send back."""

    resource_id: str | None
    replay: tuple[int, Any] | None = None


def request_hash(payload: Any) -> str:
    """A stable hash of a request payload (canonical JSON)."""
    return hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()


def validate_key(key: str) -> str:
    """Reject empty or oversize keys."""
    key = key.strip()
    if not key or len(key) > MAX_KEY_CHARS:
        raise InvalidRequest(f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} characters", field="Idempotency-Key")
    return key


class Idempotency:
    """Claims, replays and completes idempotency records in Postgres (shared by every gateway process)."""

    def __init__(self, store: EventStore, window_seconds: float, stale_after: float) -> None:
        self.store = store
        self.window = window_seconds
        self.stale_after = stale_after

    async def claim(
        self, actor: str, route: str, key: str, req_hash: str, resource_id: str | None, wait_seconds: float
    ) -> Claim:
        """Claim ``key`` for this request, or return the first request's response (waiting for it, bounded)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        pool = self.store.pool
        while True:
            mine = await pool.fetchval(
                "INSERT INTO idempotency_records (actor, route, key, request_hash, resource_id) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING true",
                actor,
                route,
                key,
                req_hash,
                resource_id,
            )
            if mine:
                return Claim(resource_id)
            row = await pool.fetchrow(
                "SELECT request_hash, resource_id, status_code, body, "
                "extract(epoch FROM clock_timestamp() - created_at) AS age FROM idempotency_records "
                "WHERE actor = $1 AND route = $2 AND key = $3",
                actor,
                route,
                key,
            )
            if row is None:
                continue  # expired and deleted meanwhile: claim again
            if float(row["age"]) > self.window:
                await pool.execute(
                    "DELETE FROM idempotency_records WHERE actor = $1 AND route = $2 AND key = $3 "
                    "AND extract(epoch FROM clock_timestamp() - created_at) > $4",
                    actor,
                    route,
                    key,
                    self.window,
                )
                continue
            if row["request_hash"] != req_hash:
                raise IdempotencyConflict(
                    "this Idempotency-Key was already used with a different request", idempotency_key=key
                )
            if row["status_code"] is not None:
                return Claim(row["resource_id"], (int(row["status_code"]), row["body"]))
            if float(row["age"]) > self.stale_after:
                taken = await pool.fetchval(
                    "UPDATE idempotency_records SET created_at = clock_timestamp() "
                    "WHERE actor = $1 AND route = $2 AND key = $3 AND status_code IS NULL "
                    "AND extract(epoch FROM clock_timestamp() - created_at) > $4 RETURNING true",
                    actor,
                    route,
                    key,
                    self.stale_after,
                )
                if taken:
                    return Claim(row["resource_id"])  # the first request died: finish its work
            if loop.time() >= deadline:
                raise ResourceLocked(
                    "a request with this Idempotency-Key is still in progress; retry shortly", idempotency_key=key
                )
            await asyncio.sleep(0.05)

    async def complete(self, actor: str, route: str, key: str, status_code: int, body: Any) -> None:
        """Store the response a repeat will get."""
        await self.store.pool.execute(
            "UPDATE idempotency_records SET status_code = $4, body = $5 WHERE actor = $1 AND route = $2 AND key = $3",
            actor,
            route,
            key,
            status_code,
            body,
        )

    async def release(self, actor: str, route: str, key: str) -> None:
        """Drop an unfinished claim (the request failed before it changed anything): a retry may proceed."""
        await self.store.pool.execute(
            "DELETE FROM idempotency_records WHERE actor = $1 AND route = $2 AND key = $3 AND status_code IS NULL",
            actor,
            route,
            key,
        )
