"""The gateway's FastAPI application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from kneo_events import __version__
from kneo_events.kernel import Kernel
from kneo_gateway import errors
from kneo_gateway.auth import Authenticator, parse_keys
from kneo_gateway.idempotency import Idempotency
from kneo_gateway.live import LiveHub
from kneo_gateway.middleware import BodyLimit, RequestContext
from kneo_gateway.ratelimit import RateLimiter
from kneo_gateway.responses import COMMON_ERRORS, JSONBody
from kneo_gateway.routers import audit, governance, health, human, lineage, runs, specs
from kneo_gateway.routers import console as console_page
from kneo_gateway.routers import inspect as run_inspection
from kneo_gateway.routers import jobs as job_routes
from kneo_gateway.routers import knap as knap_routes
from kneo_gateway.routers import webhooks as webhook_routes
from kneo_gateway.routers import workspaces as workspace_routes
from kneo_gateway.state import Gateway

VERSIONED = (
    runs.router,
    lineage.router,
    specs.router,
    governance.router,
    run_inspection.router,
    human.router,
    audit.router,
)


def create_app(kernel: Kernel) -> FastAPI:
    """Build the app on a started kernel (the caller owns the kernel's lifecycle)."""
    settings = kernel.settings
    hub = LiveHub(kernel.bus, settings.sse_client_buffer)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await hub.start()
        kernel.local_listeners.append(hub.on_local_commit)
        try:
            yield
        finally:
            kernel.local_listeners.remove(hub.on_local_commit)
            await hub.stop()

    app = FastAPI(title="Kneo", version=__version__, lifespan=lifespan, default_response_class=JSONBody)
    app.state.gateway = Gateway(
        settings=settings,
        kernel=kernel,
        hub=hub,
        auth=Authenticator(
            parse_keys(
                settings.api_keys.get_secret_value(),
                settings.admin_api_key.get_secret_value() if settings.admin_api_key else None,
            ),
            settings.auth_enabled,
        ),
        limiter=RateLimiter.from_settings(kernel.store, settings.rate_limit, settings.rate_limits),
        idempotency=Idempotency(
            kernel.store, settings.idempotency_window_seconds, stale_after=settings.sync_wait_seconds + 60
        ),
    )
    errors.install(app)
    app.include_router(health.router)
    app.include_router(health.router, prefix="/v1", include_in_schema=False)
    for router in VERSIONED:  # one definition, two mounts: /v1/... and the legacy unversioned alias
        app.include_router(router, prefix="/v1", responses=COMMON_ERRORS)
        app.include_router(router, responses=COMMON_ERRORS, deprecated=True)
    app.include_router(job_routes.router)  # the Jobs face's paths: no /v1 prefix
    app.include_router(workspace_routes.router)  # the Jobs face's paths: no /v1 prefix
    app.include_router(console_page.router)
    app.include_router(knap_routes.router)  # the Knap face's paths: /api/...
    # Workspace uploads have their own (larger) cap, streamed rather than buffered; 1 MiB of slack for the form.
    streamed = {"/workspaces": settings.workspace_max_upload_bytes + 1_048_576}
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, streamed=streamed)
    # Webhooks: the Jobs face's paths (Jobs error envelope); /v1/webhooks is an alias outside the schema whose
    # errors come in the Kneo envelope like every /v1 path.
    app.include_router(webhook_routes.router)
    app.include_router(webhook_routes.router, prefix="/v1", include_in_schema=False)
    app.add_middleware(RequestContext, request_logs=settings.request_logs)
    return app
