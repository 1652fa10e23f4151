"""Security and policies: the redacted credential inventory and service-managed environment policies."""

from __future__ import annotations

import os
import re
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request

from kneo_events.errors import ConcurrencyConflict, InvalidRequest
from kneo_events.redaction import REDACTED, redact
from kneo_events.schemas import (
    NO_POLICY,
    CredentialInventoryAccessed,
    EnvironmentPolicyEnforcement,
    PolicyChanged,
    new_event,
)
from kneo_gateway.auth import Principal, require
from kneo_gateway.responses import JSONBody
from kneo_gateway.state import Gateway

router = APIRouter(tags=["security and policies"])

# Provider name → the environment variable holding its key (seeds/004 "Secret management").
PROVIDER_ENV = {
    "openai": "OPENAI_API_KEY",
    "openai-agents": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "google": "GOOGLE_API_KEY",
    "google-adk": "GOOGLE_API_KEY",
}
SERVICE_TOKENS = {
    "api_key": "KNEO_SERV_API_KEY",
    "api_keys": "KNEO_SERV_API_KEYS",
    "admin_api_key": "KNEO_SERV_ADMIN_API_KEY",
}
_ENV_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def _gw(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


def _ref(kind: str, name: str, env_var: str) -> dict[str, Any]:
    present = bool(os.environ.get(env_var))
    return {"name": f"{kind}:{name}", "env_var": env_var, "present": present, "value": REDACTED if present else None}


def mcp_secret_env(name: str) -> str:
    """The environment variable behind an MCP secret name (``mcp_default`` → ``MCP_DEFAULT``)."""
    return name if name.isupper() else re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def _csv(raw: str) -> list[str]:
    return [x.strip() for x in raw.split(",") if x.strip()]


@router.get("/security/credentials")
async def credentials_inventory(
    request: Request,
    principal: Annotated[Principal, Depends(require("credentials:read"))],
    providers: Annotated[str | None, Query(description="Comma-separated provider names (default: all known).")] = None,
    include_service_tokens: bool = False,
    include_mcp: bool = False,
) -> JSONBody:
    """Which credential references are configured, with ``present`` flags; values are always ``[REDACTED]``."""
    gw = _gw(request)
    names = _csv(providers) if providers else list(PROVIDER_ENV)
    unknown = [n for n in names if n not in PROVIDER_ENV]
    if unknown:
        raise InvalidRequest(f"unknown providers: {', '.join(unknown)}", known=sorted(PROVIDER_ENV))
    inventory: dict[str, Any] = {
        "providers": {n: _ref("provider", n, PROVIDER_ENV[n]) for n in names},
        "extra": {},
    }
    if include_mcp:
        inventory["mcp"] = {n: _ref("mcp", n, mcp_secret_env(n)) for n in _csv(gw.settings.health_mcp_secrets)}
    if include_service_tokens:
        inventory["service_tokens"] = {n: _ref("service", n, v) for n, v in SERVICE_TOKENS.items()}
    counts = {
        f"{section}_{kind}": sum(1 for ref in refs.values() if (ref["present"] if kind == "present" else True))
        for section, refs in inventory.items()
        for kind in ("total", "present")
    }
    await gw.kernel.commit(
        "credentials-inventory",
        [new_event(CredentialInventoryAccessed(counts=counts), _meta(request, principal))],
        None,
    )
    return JSONBody({"inventory": inventory})


def _env(environment: str) -> str:
    if not _ENV_NAME.match(environment):
        raise InvalidRequest(
            "an environment name is 1-64 characters of a-z, 0-9, '-' and '_', starting with a letter or digit",
            field="environment",
        )
    return environment


def _meta(request: Request, principal: Principal) -> dict[str, Any]:
    return {"request_id": request.state.request_id, "actor": principal.name}


@router.get("/policies/environment", dependencies=[Depends(require("policies:read"))])
async def list_policies(request: Request) -> JSONBody:
    """Every environment with a service-managed policy."""
    rows = await _gw(request).kernel.store.pool.fetch(
        "SELECT environment, policy, version, updated_at, updated_by FROM environment_policies ORDER BY environment"
    )
    policies = {
        r["environment"]: {
            "policy": r["policy"],
            "source": "service",
            "version": r["version"],
            "updated_at": r["updated_at"].isoformat(),
            "updated_by": r["updated_by"],
        }
        for r in rows
    }
    return JSONBody({"policies": policies, "count": len(policies)})


async def _current(gw: Gateway, environment: str) -> tuple[dict[str, Any] | None, int]:
    row = await gw.kernel.store.pool.fetchrow(
        "SELECT policy, version FROM environment_policies WHERE environment = $1", environment
    )
    return (dict(row["policy"]), int(row["version"])) if row else (None, 0)


@router.get("/policies/environment/{environment}", dependencies=[Depends(require("policies:read"))])
async def get_policy(environment: str, request: Request) -> JSONBody:
    """The effective policy of one environment (``source: default`` when the service has none for it)."""
    policy, version = await _current(_gw(request), _env(environment))
    if policy is None:
        return JSONBody({"environment": environment, "policy": NO_POLICY.model_dump(), "source": "default"})
    return JSONBody({"environment": environment, "policy": policy, "source": "service", "version": version})


@router.put("/policies/environment/{environment}")
async def put_policy(
    environment: str,
    request: Request,
    principal: Annotated[Principal, Depends(require("policies:write"))],
    policy: Annotated[EnvironmentPolicyEnforcement, Body()],
) -> JSONBody:
    """Set an environment's policy; recorded as a ``policy.changed`` event naming the changed fields."""
    gw = _gw(request)
    _env(environment)
    current = policy.model_dump()
    previous, version = await _current(gw, environment)
    baseline = previous if previous is not None else NO_POLICY.model_dump()
    changed = sorted(k for k in current if baseline.get(k) != current.get(k))
    event = PolicyChanged(
        environment=environment,
        previous=redact(previous) if previous else None,
        current=current,
        changed_fields=changed,
    )
    try:
        await gw.kernel.commit(f"policy-{environment}", [new_event(event, _meta(request, principal))], version)
    except ConcurrencyConflict:
        raise ConcurrencyConflict(
            f"the policy of {environment} changed while this update was made; read it and retry"
        ) from None
    return JSONBody(
        {
            "environment": environment,
            "policy": current,
            "previous_policy": previous,
            "changed_fields": changed,
            "source": "service",
            "version": version + 1,
        }
    )
