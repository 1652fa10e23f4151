"""Health and service info."""

from __future__ import annotations

import asyncio
import os

from fastapi import APIRouter, Request

from kneo_events import __version__
from kneo_gateway.responses import JSONBody
from kneo_gateway.routers.governance import PROVIDER_ENV, mcp_secret_env

router = APIRouter(tags=["health"])


@router.get("/livez")
async def livez() -> JSONBody:
    """The process answers."""
    return JSONBody({"ok": True, "metadata": {}})


async def _checks(request: Request) -> dict[str, dict[str, object]]:
    gw = request.app.state.gateway
    checks: dict[str, dict[str, object]] = {"api": {"ok": True, "routes": len(request.app.routes)}}
    try:
        await asyncio.wait_for(gw.kernel.store.pool.fetchval("SELECT 1"), timeout=2)
        checks["postgres"] = {"ok": True}
    except Exception as exc:
        checks["postgres"] = {"ok": False, "error": type(exc).__name__}
    bus = gw.kernel.bus
    try:
        for name in (bus.names.commands, bus.names.events, bus.names.output):
            await asyncio.wait_for(bus.js.stream_info(name), timeout=2)
        checks["jetstream"] = {"ok": True, "streams": [bus.names.commands, bus.names.events, bus.names.output]}
    except Exception as exc:
        checks["jetstream"] = {"ok": False, "error": type(exc).__name__}
    missing = []
    for service in ("compiler", "runner"):
        try:
            await asyncio.wait_for(bus.js.consumer_info(bus.names.commands, bus.consumer_name(service)), timeout=2)
        except Exception:
            missing.append(service)
    checks["consumers"] = (
        {"ok": True} if not missing else {"ok": False, "error": f"no durable consumer for: {', '.join(missing)}"}
    )
    for label, raw, env_of in (
        ("providers", gw.settings.health_providers, lambda n: PROVIDER_ENV.get(n, f"{n.upper()}_API_KEY")),
        ("mcp_secrets", gw.settings.health_mcp_secrets, mcp_secret_env),
    ):
        names = [n.strip() for n in raw.split(",") if n.strip()]
        if names:
            absent = [f"{n} ({env_of(n)})" for n in names if not os.environ.get(env_of(n))]
            checks[label] = {"ok": not absent, **({"error": f"missing secrets: {', '.join(absent)}"} if absent else {})}
    return checks


@router.get("/readyz")
async def readyz(request: Request) -> JSONBody:
    """Ready when Postgres and the JetStream streams answer; 503 ``not_ready`` naming each failing check."""
    checks = await _checks(request)
    failing = [k for k, v in checks.items() if not v["ok"]]
    if failing:
        return JSONBody(
            {"error": "not_ready", "message": f"not ready: {', '.join(failing)}", "checks": checks},
            status_code=503,
        )
    return JSONBody({"ok": True, "checks": checks})


@router.get("/healthz")
async def healthz(request: Request) -> JSONBody:
    """Liveness plus the readiness checks, always 200 with details."""
    checks = await _checks(request)
    return JSONBody({"ok": all(v["ok"] for v in checks.values()), "version": __version__, "checks": checks})


@router.get("/", include_in_schema=True)
async def root() -> JSONBody:
    """Service info (the Jobs face's ``GET /``)."""
    return JSONBody({"status": "ok", "version": __version__})
