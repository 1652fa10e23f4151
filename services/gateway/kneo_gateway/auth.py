"""API-key authentication and scopes (seeds/004 "Authentication").

Off by default for local use; on when ``KNEO_SERV_AUTH_ENABLED=true`` or whenever keys are configured. Keys come from
``KNEO_SERV_API_KEYS`` (``name:key:role_or_scope[,role_or_scope]`` entries separated by ``;``) and
``KNEO_SERV_ADMIN_API_KEY``; clients send ``Authorization: Bearer <key>`` or ``X-Kneo-Api-Key: <key>`` (SSE routes
also accept ``?access_token=`` because browsers' EventSource cannot send headers). Every route declares its scope
with ``Depends(require(scope))``. Keys are compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request

from kneo_events.errors import KneoError

SCOPES = (
    "runs:read",
    "runs:write",
    "specs:read",
    "human:read",
    "human:write",
    "audit:read",
    "audit:write",
    "credentials:read",
    "policies:read",
    "policies:write",
    "workspaces:read",
    "workspaces:write",
    "jobs:read",
    "jobs:write",
    "webhooks:read",
    "webhooks:write",
)
ROLES: dict[str, frozenset[str]] = {
    "admin": frozenset(SCOPES),
    "operator": frozenset(
        {
            "runs:read",
            "runs:write",
            "specs:read",
            "human:read",
            "audit:read",
            "credentials:read",
            "policies:read",
            "policies:write",
            "workspaces:read",
            "workspaces:write",
            "jobs:read",
            "jobs:write",
            "webhooks:read",
            "webhooks:write",
        }
    ),
    "reviewer": frozenset({"runs:read", "human:read", "human:write", "audit:read"}),
    "service": frozenset(
        {
            "runs:read",
            "runs:write",
            "specs:read",
            "human:read",
            "human:write",
            "audit:read",
            "audit:write",
            "credentials:read",
            "policies:read",
            "workspaces:read",
            "workspaces:write",
            "jobs:read",
            "jobs:write",
            "webhooks:read",
            "webhooks:write",
        }
    ),
    "viewer": frozenset({"runs:read", "specs:read", "human:read", "audit:read", "workspaces:read", "jobs:read"}),
}
ANONYMOUS = "anonymous"


class Unauthorized(KneoError):
    """No key, or a key that is not configured."""

    status_code = 401
    code = "unauthorized"


class Forbidden(KneoError):
    """A valid key without the route's scope."""

    status_code = 403
    code = "forbidden"


@dataclass(frozen=True)
class ApiKey:
    """One configured key: its name (the actor in logs and audit), the secret, and its scopes."""

    name: str
    secret: bytes
    scopes: frozenset[str]
    role: str | None = None


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's name and scopes (``anonymous`` with every scope when auth is off)."""

    name: str
    scopes: frozenset[str]
    role: str | None = None


class KeyConfigError(ValueError):
    """``KNEO_SERV_API_KEYS`` is malformed (a start-up error)."""


def parse_keys(raw: str, admin_key: str | None) -> list[ApiKey]:
    """Parse ``name:key:role_or_scope[,role_or_scope];...`` plus the admin key."""
    keys: list[ApiKey] = []
    for entry in filter(None, (e.strip() for e in raw.split(";"))):
        parts = entry.split(":", 2)
        if len(parts) != 3 or not all(parts):
            raise KeyConfigError(f"KNEO_SERV_API_KEYS entry {parts[0]!r} must look like name:key:role_or_scope")
        name, secret, grants = parts
        scopes: set[str] = set()
        role = None
        for grant in filter(None, (g.strip() for g in grants.split(","))):
            if grant in ROLES:
                scopes |= ROLES[grant]
                role = role or grant
            elif grant in SCOPES:
                scopes.add(grant)
            else:
                raise KeyConfigError(
                    f"KNEO_SERV_API_KEYS entry {name!r}: unknown role or scope {grant!r} "
                    f"(roles: {', '.join(ROLES)}; scopes: {', '.join(SCOPES)})"
                )
        keys.append(ApiKey(name, secret.encode(), frozenset(scopes), role))
    if admin_key:
        keys.append(ApiKey("admin", admin_key.encode(), ROLES["admin"], "admin"))
    return keys


class Authenticator:
    """Resolves the caller of a request from its key."""

    def __init__(self, keys: list[ApiKey], enabled: bool) -> None:
        self.keys = keys
        self.enabled = enabled or bool(keys)

    def identify(self, request: Request, allow_query_token: bool) -> Principal:
        """The principal of a request, or :class:`Unauthorized`."""
        if not self.enabled:
            return Principal(ANONYMOUS, ROLES["admin"])
        presented = _presented_key(request, allow_query_token)
        if presented is None:
            raise Unauthorized("missing API key: send Authorization: Bearer <key> or X-Kneo-Api-Key")
        candidate = presented.encode()
        match: ApiKey | None = None
        for key in self.keys:  # compare against every key: the time taken does not depend on which one matched
            if hmac.compare_digest(candidate, key.secret):
                match = key
        if match is None:
            raise Unauthorized("invalid API key")
        return Principal(match.name, match.scopes, match.role)


def _presented_key(request: Request, allow_query_token: bool) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    direct = request.headers.get("x-kneo-api-key")
    if direct:
        return direct.strip()
    if allow_query_token:
        token = request.query_params.get("access_token")
        if token:
            return token
    return None


def require(scope: str, *, allow_query_token: bool = False) -> Callable[[Request], Awaitable[Principal]]:
    """A FastAPI dependency: the caller must hold ``scope``. Sets ``request.state.actor``."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope}")

    async def dependency(request: Request) -> Principal:
        auth: Authenticator = request.app.state.gateway.auth
        principal = auth.identify(request, allow_query_token)
        request.state.actor = principal.name
        request.state.principal = principal
        gw = request.app.state.gateway
        if auth.enabled and gw.limiter.active:
            decision = await gw.limiter.hit(principal.name, principal.role)
            if decision is not None:
                request.state.rate_headers = decision.headers()
        if scope not in principal.scopes:
            raise Forbidden(f"the API key {principal.name!r} lacks the scope {scope}", required_scope=scope)
        return principal

    dependency.__name__ = f"require_{scope.replace(':', '_')}"
    return dependency
