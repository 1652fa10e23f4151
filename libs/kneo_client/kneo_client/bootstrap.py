"""The composition root: resolve infrastructure (embedded or external), build the kernel, run services.

``kneo service serve`` runs every service plus the HTTP gateway in one process; ``kneo service run NAME`` runs one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import uvicorn

from kneo_events.bus import Bus
from kneo_events.kernel import Kernel
from kneo_events.redaction import redact_text
from kneo_events.service import WorkerService
from kneo_events.settings import Settings
from kneo_events.store import EventStore

log = logging.getLogger("kneo.platform")
ALL_SERVICES = ("gateway", "compiler", "runner", "human", "audit", "webhooks")
WORKER_SERVICES = ("compiler", "runner", "human", "audit", "webhooks")


def build_service(name: str, kernel: Kernel) -> WorkerService:
    """Instantiate a worker service by name (imports stay local: services never import each other)."""
    if name == "compiler":
        from kneo_compiler.app import CompilerService

        return CompilerService(kernel)
    if name == "runner":
        from kneo_runner.app import RunnerService

        return RunnerService(kernel)
    if name == "human":
        from kneo_human.app import HumanService

        return HumanService(kernel)
    if name == "audit":
        from kneo_audit.app import AuditService

        return AuditService(kernel)
    if name == "webhooks":
        from kneo_webhooks.app import WebhooksService

        return WebhooksService(kernel)
    raise ValueError(f"unknown service {name!r}; choose one of {', '.join(ALL_SERVICES)}")


@dataclass
class Infra:
    """Resolved server URLs and the embedded servers this process owns."""

    settings: Settings
    owned: list[Any] = field(default_factory=list)

    def stop(self) -> None:
        """Stop the embedded servers this process started (never ones it merely reused)."""
        for server in reversed(self.owned):
            with contextlib.suppress(Exception):
                server.stop()
        self.owned.clear()


def resolve_infra(settings: Settings, *, allow_embedded: bool = True) -> Infra:
    """Start (or reuse) embedded NATS / Postgres for whichever URL is unset."""
    if settings.nats_url and settings.database_url:
        return Infra(settings)
    if not allow_embedded:
        missing = [
            n for n, v in (("KNEO_NATS_URL", settings.nats_url), ("KNEO_DATABASE_URL", settings.database_url)) if not v
        ]
        raise SystemExit(
            f"kneo: {' and '.join(missing)} must be set to run one service alone "
            "(or use `kneo service serve` for the embedded platform)"
        )
    from kneo_events import embedded

    data = settings.data_dir.resolve()
    data.mkdir(parents=True, exist_ok=True)
    infra = Infra(settings)
    try:
        if not settings.nats_url:
            nats_srv = embedded.ensure_nats(data / "nats", settings.embedded_nats_port)
            if nats_srv.owned:
                infra.owned.append(nats_srv)
            settings = settings.model_copy(update={"nats_url": nats_srv.url})
        if not settings.database_url:
            pg_srv = embedded.ensure_postgres(data / "pg", settings.embedded_pg_port)
            if pg_srv.owned:
                infra.owned.append(pg_srv)
            settings = settings.model_copy(update={"database_url": pg_srv.url})
    except embedded.EmbeddedServerError as exc:
        infra.stop()
        raise SystemExit(f"kneo: {exc}") from None
    except BaseException:
        infra.stop()
        raise
    infra.settings = settings
    return infra


async def open_kernel(settings: Settings, name: str, *, relay: bool, reconciler: bool) -> Kernel:
    """Connect the store and the bus, start the kernel's background tasks."""
    assert settings.database_url
    try:
        store = await EventStore.connect(
            settings.database_url, schema=settings.database_schema, max_size=settings.db_pool_size
        )
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise ConnectionError(
            f"cannot reach PostgreSQL at {redact_dsn(settings.database_url)} ({type(exc).__name__}); "
            "check KNEO_DATABASE_URL"
        ) from None
    try:
        bus = await Bus.connect(settings, name=name)
    except BaseException:
        await store.close()
        raise
    kernel = Kernel(settings=settings, store=store, bus=bus)
    kernel.start(relay=relay, reconciler=reconciler)
    return kernel


async def close_kernel(kernel: Kernel) -> None:
    """Stop background work, then close the bus and the pool."""
    await kernel.stop()
    await kernel.bus.close()
    await kernel.store.close()


@dataclass(frozen=True)
class Running:
    """What ``on_ready`` gets: the gateway's URL (when it runs one) and the process's kernel."""

    url: str | None
    kernel: Kernel
    app: Any = None  # the gateway's FastAPI app, when this process serves HTTP


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the platform owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def,override]
        yield


async def run_platform(
    settings: Settings,
    services: tuple[str, ...],
    *,
    host: str | None = None,
    port: int | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[Running], Awaitable[None] | None] | None = None,
) -> None:
    """Run ``services`` (``gateway`` adds the HTTP server) in this process until ``stop`` is set or a signal."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    workers = [s for s in services if s != "gateway"]
    kernel = await open_kernel(settings, name=f"kneo-{'+'.join(services)}", relay=True, reconciler="runner" in services)
    server: _Server | None = None
    started: list[WorkerService] = []
    try:
        app = None
        if "gateway" in services:
            from kneo_gateway.app import create_app

            app = create_app(kernel)  # configuration errors (e.g. malformed API keys) surface here, plainly
        async with asyncio.TaskGroup() as tg:
            for name in workers:
                svc = build_service(name, kernel)
                await svc.start()
                started.append(svc)
                tg.create_task(kernel.bus.consume(name, svc.handle, svc.dead_letter, stop), name=f"consume-{name}")
            url = None
            if app is not None:
                config = uvicorn.Config(
                    app,
                    host=host if host is not None else settings.host,
                    port=port if port is not None else settings.port,
                    log_level="warning",
                    access_log=False,
                    lifespan="on",
                    timeout_graceful_shutdown=5,
                )
                server = _Server(config)
                serve_task = tg.create_task(server.serve(), name="http")
                while not server.started:
                    if serve_task.done():
                        break
                    await asyncio.sleep(0.02)
                if server.started:
                    sock = server.servers[0].sockets[0].getsockname()
                    url = f"http://{sock[0]}:{sock[1]}"
                else:
                    stop.set()
            if on_ready is not None and not stop.is_set():
                maybe = on_ready(Running(url, kernel, app))
                if maybe is not None:
                    await maybe
            await stop.wait()
            if server is not None:
                server.should_exit = True
    finally:
        for svc in started:
            with contextlib.suppress(Exception):
                await svc.stop()
        await close_kernel(kernel)
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


def run_sync(coro: Awaitable[Any]) -> Any:
    """Run a coroutine on uvloop when available (one event loop per process)."""
    try:
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]


def configure_logging(level: str) -> None:
    """Readable logs on a terminal, JSON lines otherwise."""
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(_ReadableFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    else:
        handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("kneo.service").setLevel(level.upper())


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import orjson

        out = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):  # structured records (e.g. http_request) keep their fields at the top level
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact_text(orjson.dumps(out).decode())


class _ReadableFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items() if k != "event")
        return redact_text(text)


def redact_dsn(dsn: str | None) -> str:
    """A DSN with its password replaced by ``***`` (safe to print)."""
    if not dsn or "@" not in dsn:
        return dsn or ""
    scheme, _, rest = dsn.partition("://")
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}{':***' if ':' in creds else ''}@{host}"
