"""Embedded servers: real nats-server and PostgreSQL from the wheels, reused by a second caller, restarted
after a crash, and a clear one-line error when the port belongs to someone else."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import nats
import pytest

from kneo_events.embedded import (
    STATE_FILE,
    EmbeddedServer,
    EmbeddedServerError,
    ensure_nats,
    ensure_postgres,
    free_port,
    start_embedded,
    start_nats,
    start_postgres,
)

Ensure = Callable[[Path, int], EmbeddedServer]


@pytest.fixture
def started() -> Iterator[list[EmbeddedServer]]:
    """Every server a test starts goes in here and is stopped afterwards, whatever happened."""
    servers: list[EmbeddedServer] = []
    yield servers
    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.callback(server.stop)


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    out = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for init to reap it has exited
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while _running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _answers(url: str) -> bool:
    hostport = url.split("@")[-1].split("//")[-1].split("/")[0]
    host, port = hostport.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.timeout(120)
async def test_nats_jetstream_round_trip(tmp_path: Path, started: list[EmbeddedServer]) -> None:
    server = start_nats(tmp_path / "nats", 0)
    started.append(server)
    assert server.owned and server.url.startswith("nats://127.0.0.1:")
    assert "sync_interval: always" in (tmp_path / "nats" / "nats.conf").read_text()

    nc = await nats.connect(server.url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        await js.add_stream(name="EMBEDDED_T", subjects=["embedded.t.>"])
        ack = await js.publish("embedded.t.one", b"hello")
        assert ack.stream == "EMBEDDED_T" and ack.seq == 1
        msg = await js.get_msg("EMBEDDED_T", 1)
        assert msg.data == b"hello"
    finally:
        await nc.close()
    assert (tmp_path / "nats" / "js").is_dir()


@pytest.mark.timeout(120)
async def test_postgres_select_and_settings(tmp_path: Path, started: list[EmbeddedServer]) -> None:
    server = start_postgres(tmp_path / "pg", 0)
    started.append(server)
    assert server.url.startswith("postgresql://postgres@127.0.0.1:") and server.url.endswith("/kneo")

    conn = await asyncpg.connect(server.url, timeout=10)
    try:
        assert await conn.fetchval("select 1") == 1
        assert int(await conn.fetchval("show server_version_num")) >= 150000
        assert await conn.fetchval("select current_database()") == "kneo"
        assert await conn.fetchval("show fsync") == "on"
        assert await conn.fetchval("show synchronous_commit") == "on"
        assert await conn.fetchval("show max_connections") == "200"
    finally:
        await conn.close()
    assert (tmp_path / "pg" / "postgres.log").exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ensure", [ensure_nats, ensure_postgres], ids=["nats", "postgres"])
def test_second_ensure_reuses_and_only_owner_stops(
    tmp_path: Path, started: list[EmbeddedServer], ensure: Ensure
) -> None:
    first = ensure(tmp_path / "srv", 0)
    started.append(first)
    second = ensure(tmp_path / "srv", free_port())  # the live server wins over the requested port
    started.append(second)
    assert first.owned and not second.owned
    assert (second.url, second.pid) == (first.url, first.pid)
    state = json.loads((tmp_path / "srv" / STATE_FILE).read_text())
    assert state["pid"] == first.pid and state["url"] == first.url

    second.stop()  # not the owner: a no-op
    assert _running(first.pid) and _answers(first.url)

    first.stop()
    assert _gone(first.pid)
    assert not (tmp_path / "srv" / STATE_FILE).exists()
    first.stop()  # idempotent


@pytest.mark.timeout(120)
async def test_stale_nats_state_starts_fresh(
    tmp_path: Path, started: list[EmbeddedServer], caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "nats"
    data_dir.mkdir()
    dead = _dead_pid()
    stale = {"pid": dead, "port": 1, "host": "127.0.0.1", "url": "nats://127.0.0.1:1"}
    (data_dir / STATE_FILE).write_text(json.dumps(stale))
    caplog.set_level(logging.INFO, logger="kneo_events.embedded")

    server = ensure_nats(data_dir, 0)
    started.append(server)
    assert server.owned and server.pid != dead
    assert f"pid {dead}" in caplog.text
    assert json.loads((data_dir / STATE_FILE).read_text())["pid"] == server.pid
    nc = await nats.connect(server.url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        ack = await nc.jetstream().add_stream(name="FRESH", subjects=["fresh.>"])
        assert ack.config.name == "FRESH"
    finally:
        await nc.close()


@pytest.mark.timeout(120)
async def test_stale_postgres_state_and_lock_file_restart_with_data(
    tmp_path: Path, started: list[EmbeddedServer]
) -> None:
    data_dir = tmp_path / "pg"
    first = ensure_postgres(data_dir, 0)
    started.append(first)
    conn = await asyncpg.connect(first.url, timeout=10)
    try:
        await conn.execute("create table survives (x int); insert into survives values (42)")
    finally:
        await conn.close()
    first.stop()
    assert _gone(first.pid)

    # What a crash leaves behind: our state file and postgres's own lock file, both naming a dead pid.
    dead = _dead_pid()
    pgdata = data_dir / "data"
    port = int(first.url.rsplit(":", 1)[1].split("/")[0])
    (pgdata / "postmaster.pid").write_text(
        f"{dead}\n{pgdata}\n{int(time.time())}\n{port}\n{data_dir / 'run'}\n127.0.0.1\n  0 0\nready   \n"
    )
    stale = {"pid": dead, "port": port, "host": "127.0.0.1", "url": first.url}
    (data_dir / STATE_FILE).write_text(json.dumps(stale))

    second = ensure_postgres(data_dir, 0)
    started.append(second)
    assert second.owned and second.pid != dead
    conn = await asyncpg.connect(second.url, timeout=10)
    try:
        assert await conn.fetchval("select x from survives") == 42
    finally:
        await conn.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("ensure", "env_var"),
    [(ensure_nats, "KNEO_EMBEDDED_NATS_PORT"), (ensure_postgres, "KNEO_EMBEDDED_PG_PORT")],
    ids=["nats", "postgres"],
)
def test_port_taken_by_another_program(tmp_path: Path, ensure: Ensure, env_var: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(EmbeddedServerError) as caught:
            ensure(tmp_path / "srv", port)
    message = str(caught.value)
    assert message == (
        f"port {port} on 127.0.0.1 is in use by another program; set {env_var} to a free port or stop that program"
    )
    assert not (tmp_path / "srv" / STATE_FILE).exists()


@pytest.mark.timeout(120)
def test_start_embedded_both(tmp_path: Path, started: list[EmbeddedServer]) -> None:
    nats_server, pg_server = start_embedded(tmp_path / ".kneo", 0, 0)
    started.extend([nats_server, pg_server])
    assert (nats_server.name, pg_server.name) == ("nats", "postgres")
    assert nats_server.data_dir == (tmp_path / ".kneo" / "nats").absolute()
    assert pg_server.data_dir == (tmp_path / ".kneo" / "pg").absolute()
    assert _answers(nats_server.url) and _answers(pg_server.url)
    for server in (pg_server, nats_server):
        server.stop()
        assert _gone(server.pid)


@pytest.mark.timeout(120)
def test_postgres_long_data_dir_puts_socket_under_tmp(tmp_path: Path, started: list[EmbeddedServer]) -> None:
    data_dir = tmp_path.joinpath(*(["a-rather-long-directory-name"] * 4), "pg")
    assert len(str(data_dir)) > 100
    server = start_postgres(data_dir, 0)
    started.append(server)
    port = int(server.url.rsplit(":", 1)[1].split("/")[0])
    conf = (data_dir / "data" / "kneo.conf").read_text()
    socket_dir = Path(conf.split("unix_socket_directories = '")[1].split("'")[0])
    try:
        assert str(socket_dir).startswith("/tmp/kneo-pg-")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
            unix.connect(str(socket_dir / f".s.PGSQL.{port}"))
        assert _answers(server.url)
    finally:
        server.stop()
        with contextlib.suppress(OSError):
            socket_dir.rmdir()
