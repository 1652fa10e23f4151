"""Per-key rate limits with counters in Postgres, so every gateway process shares one budget (seeds/002).

``KNEO_SERV_RATE_LIMIT`` is the default budget of every key (``<requests>/<seconds>``, e.g. ``1000/60``; unset: no
limits). ``KNEO_SERV_RATE_LIMITS`` overrides it per role or key name (``viewer=100/60;ci=5000/60``; a key name wins
over its role; ``0`` or ``off`` lifts the limit). Windows are fixed and aligned to the epoch. Limited keys get
``X-RateLimit-Limit`` / ``-Remaining`` / ``-Reset`` on every response, and 429 ``rate_limited`` with
``Retry-After`` once the budget is spent.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

from kneo_events.errors import KneoError
from kneo_events.store import EventStore


class RateLimited(KneoError):
    """The key spent its budget for this window."""

    status_code = 429
    code = "rate_limited"


class RateLimitConfigError(ValueError):
    """A rate-limit setting is malformed (a start-up error)."""


@dataclass(frozen=True)
class Budget:
    """``requests`` per ``seconds``."""

    requests: int
    seconds: int


def parse_budget(raw: str) -> Budget | None:
    """``"1000/60"`` → Budget(1000, 60); ``"0"`` / ``"off"`` → None (no limit)."""
    text = raw.strip().lower()
    if text in ("", "0", "off", "none"):
        return None
    count, _, window = text.partition("/")
    units = {"s": 1, "second": 1, "sec": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}
    try:
        seconds = units[window] if window in units else int(window or 60)
        budget = Budget(int(count), seconds)
    except ValueError:
        raise RateLimitConfigError(f"bad rate limit {raw!r}: use <requests>/<seconds>, e.g. 1000/60") from None
    if budget.requests < 1 or budget.seconds < 1:
        raise RateLimitConfigError(f"bad rate limit {raw!r}: both numbers must be positive")
    return budget


@dataclass(frozen=True)
class Decision:
    """The state of a key's window after counting one request."""

    limit: int
    remaining: int
    reset_epoch: int
    retry_after: int

    def headers(self) -> dict[str, str]:
        """The rate-limit response headers."""
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset_epoch),
        }


class RateLimiter:
    """Counts requests per key in Postgres (one upsert per request of a limited key)."""

    def __init__(self, store: EventStore, default: Budget | None, overrides: dict[str, Budget | None]) -> None:
        self.store = store
        self.default = default
        self.overrides = overrides

    @classmethod
    def from_settings(cls, store: EventStore, default: str | None, overrides: str) -> RateLimiter:
        """Build from ``KNEO_SERV_RATE_LIMIT`` and ``KNEO_SERV_RATE_LIMITS``."""
        table: dict[str, Budget | None] = {}
        for entry in filter(None, (e.strip() for e in overrides.split(";"))):
            name, sep, value = entry.partition("=")
            if not sep or not name.strip():
                raise RateLimitConfigError(f"bad KNEO_SERV_RATE_LIMITS entry {entry!r}: use name=<requests>/<seconds>")
            table[name.strip()] = parse_budget(value)
        return cls(store, parse_budget(default) if default else None, table)

    @property
    def active(self) -> bool:
        """False when no budget is configured at all."""
        return self.default is not None or any(b is not None for b in self.overrides.values())

    def budget_for(self, key_name: str, role: str | None) -> Budget | None:
        """The budget of a key: its own override, else its role's, else the default."""
        if key_name in self.overrides:
            return self.overrides[key_name]
        if role is not None and role in self.overrides:
            return self.overrides[role]
        return self.default

    async def hit(self, key_name: str, role: str | None) -> Decision | None:
        """Count one request; raise :class:`RateLimited` past the budget. ``None`` for an unlimited key."""
        budget = self.budget_for(key_name, role)
        if budget is None:
            return None
        now = time.time()
        window = int(now // budget.seconds) * budget.seconds
        count = await self.store.pool.fetchval(
            "INSERT INTO rate_limit_counters AS c (bucket, window_start, count) VALUES ($1, $2, 1) "
            "ON CONFLICT (bucket, window_start) DO UPDATE SET count = c.count + 1 RETURNING count",
            key_name,
            window,
        )
        if random.random() < 0.01:  # forget old windows now and then
            await self.store.pool.execute(
                "DELETE FROM rate_limit_counters WHERE window_start < $1", int(now) - 2 * 86_400
            )
        reset = window + budget.seconds
        decision = Decision(
            budget.requests, max(0, budget.requests - int(count)), reset, max(1, math.ceil(reset - now))
        )
        if int(count) > budget.requests:
            exc = RateLimited(
                f"rate limit of {budget.requests} requests per {budget.seconds}s exceeded for {key_name!r}",
                limit=budget.requests,
                retry_after=decision.retry_after,
            )
            exc.headers = {**decision.headers(), "Retry-After": str(decision.retry_after)}
            raise exc
        return decision
