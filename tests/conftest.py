"""Shared fixtures: real NATS and PostgreSQL for every integration and e2e test.

By default the session starts its own nats-server and PostgreSQL (from the wheels) on free ports in a temporary
folder. ``KNEO_TEST_NATS_URL`` / ``KNEO_TEST_DATABASE_URL`` switch to external servers; ``KNEO_TEST_CONTAINERS=1``
starts them as containers through testcontainers (needs a Docker engine). Each test gets its own database schema
and its own JetStream stream names, so tests never see each other's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from kneo_events.bus import Bus, delete_streams
from kneo_events.settings import Settings
from kneo_events.store import EventStore

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Servers:
    nats_url: str
    database_url: str


def _containers() -> Iterator[Servers]:
    try:
        import docker  # type: ignore[import-not-found]

        docker.from_env().ping()
    except Exception as exc:
        pytest.exit(
            f"KNEO_TEST_CONTAINERS=1 needs a running Docker engine and `pip install kneo[containers]` "
            f"({type(exc).__name__}); unset it to use the embedded servers",
            returncode=3,
        )
    from testcontainers.core.container import DockerContainer  # type: ignore[import-not-found]
    from testcontainers.postgres import PostgresContainer  # type: ignore[import-not-found]

    with (
        PostgresContainer("postgres:16", driver=None) as pg,
        DockerContainer("nats:2.10").with_command("-js").with_exposed_ports(4222) as nats_c,
    ):
        host = nats_c.get_container_host_ip()
        yield Servers(f"nats://{host}:{nats_c.get_exposed_port(4222)}", pg.get_connection_url())


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    nats_url = os.environ.get("KNEO_TEST_NATS_URL")
    db_url = os.environ.get("KNEO_TEST_DATABASE_URL")
    if os.environ.get("KNEO_TEST_CONTAINERS") == "1" and not (nats_url and db_url):
        yield from _containers()
        return
    from kneo_events import embedded

    owned: list[embedded.EmbeddedServer] = []
    base = tmp_path_factory.mktemp("servers")
    try:
        if not nats_url:
            srv = embedded.start_nats(base / "nats", 0)
            owned.append(srv)
            nats_url = srv.url
        if not db_url:
            srv = embedded.start_postgres(base / "pg", 0)
            owned.append(srv)
            db_url = srv.url
        yield Servers(nats_url, db_url)
    finally:
        for srv in reversed(owned):
            srv.stop()


@pytest.fixture
def isolation() -> tuple[str, str]:
    """A fresh database schema and bus prefix for one test."""
    tag = secrets.token_hex(4)
    return f"t_{tag}", f"T{tag}"


@pytest.fixture
def settings(servers: Servers, isolation: tuple[str, str]) -> Settings:
    schema, prefix = isolation
    return Settings(
        KNEO_NATS_URL=servers.nats_url,
        KNEO_DATABASE_URL=servers.database_url,
        KNEO_DATABASE_SCHEMA=schema,
        KNEO_BUS_PREFIX=prefix,
        KNEO_SERV_REQUEST_LOGS=False,
        KNEO_RELAY_GRACE_SECONDS=2.0,
        KNEO_SERV_SPEC_ROOT=str(ROOT),
        KNEO_COMMAND_RETRY_BACKOFF_SECONDS=0.05,
    )


async def _drop_schema(database_url: str, schema: str) -> None:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[EventStore]:
    assert settings.database_url
    st = await EventStore.connect(settings.database_url, schema=settings.database_schema, max_size=20)
    try:
        yield st
    finally:
        await st.close()
        await _drop_schema(settings.database_url, settings.database_schema)


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    b = await Bus.connect(settings, name="kneo-test")
    try:
        yield b
    finally:
        await delete_streams(b)
        await b.close()


@dataclass
class Platform:
    url: str
    settings: Settings
    kernel: Any
    stop: asyncio.Event
    app_gateway: Any = None


@pytest.fixture
async def platform_factory(settings: Settings) -> AsyncIterator[Any]:
    """Start in-process platforms (services + gateway on a free port); all are stopped at the end."""
    from kneo_client.bootstrap import ALL_SERVICES, run_platform

    started: list[tuple[asyncio.Task[None], asyncio.Event]] = []

    async def start(services: tuple[str, ...] = ALL_SERVICES, **overrides: Any) -> Platform:
        s = settings.model_copy(update=overrides)
        stop = asyncio.Event()
        ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def on_ready(running: Any) -> None:
            if not ready.done():
                ready.set_result(running)

        task = asyncio.create_task(run_platform(s, services, host="127.0.0.1", port=0, stop=stop, on_ready=on_ready))
        started.append((task, stop))
        done, _ = await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            stop.set()
            raise RuntimeError(f"platform did not start: {task.exception() if task.done() else 'timeout'}")
        running = ready.result()
        gateway = running.app.state.gateway if running.app is not None else None
        return Platform(running.url or "", s, running.kernel, stop, gateway)

    try:
        yield start
    finally:
        for _task, stop in started:
            stop.set()
        for task, _ in started:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, timeout=15)
        cleanup = await Bus.connect(settings, name="kneo-test-cleanup")
        await delete_streams(cleanup)
        await cleanup.close()
        assert settings.database_url
        await _drop_schema(settings.database_url, settings.database_schema)


@pytest.fixture
async def platform(platform_factory: Any) -> Platform:
    """The whole platform in this process."""
    p: Platform = await platform_factory()
    return p


def wait_ready(url: str, proc: subprocess.Popen[Any], log: Path, timeout: float = 90) -> None:
    """Wait until ``GET /readyz`` answers 200; fail with the process's log if it exits or the time runs out."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise AssertionError(log.read_text())
        time.sleep(0.2)
    raise AssertionError(f"{url} was not ready within {timeout:g}s:\n{log.read_text()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def spawn_service(settings: Settings, tmp_path: Path) -> Iterator[Any]:
    """Start ``kneo service run NAME`` as a separate process against the test's servers."""
    procs: list[subprocess.Popen[bytes]] = []
    kneo = shutil.which("kneo", path=str(Path(sys.executable).parent)) or "kneo"

    def spawn(name: str, *args: str, **env_overrides: str) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "KNEO_NATS_URL": settings.nats_url or "",
            "KNEO_DATABASE_URL": settings.database_url or "",
            "KNEO_DATABASE_SCHEMA": settings.database_schema,
            "KNEO_BUS_PREFIX": settings.bus_prefix,
            "KNEO_SERV_LOG_LEVEL": "INFO",
            **env_overrides,
        }
        log = open(tmp_path / f"{name}-{len(procs)}.log", "wb")
        proc = subprocess.Popen([kneo, "service", "run", name, *args], env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        procs.append(proc)
        return proc

    yield spawn
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)
