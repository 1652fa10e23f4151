"""Run benchmark: the whole platform as a user starts it, driven over HTTP on 127.0.0.1.

Run it with ``python -m tests.bench.bench_runs`` (``make bench``); ``--quick`` is a smoke run. For each variant it
starts ``kneo service serve`` as a subprocess on fresh embedded NATS + PostgreSQL in a temporary directory
(``two_runners`` also starts ``kneo service run runner`` against the same servers, so two processes pull from the
runner queue), waits for ``/readyz``, warms up, then measures with ``tests/bench/three_step.yaml`` inlined in
every request:

* throughput: N sync runs (``async_mode: false``) at concurrency C: runs/s, POST→terminal percentiles, every run
  checked to have succeeded (response bodies and ``GET /v1/runs?status=succeeded``), events appended per second
  (``count(*)`` of the ``events`` table before/after), CPU% and RSS of every process of the platform, and where
  a run's time went (POST → ``run.created`` → steps → ``run.succeeded`` → on the bus → answered, from the log);
* sequential latency: runs one at a time, POST→terminal percentiles;
* SSE: async POST, then ``GET /v1/runs/{id}/stream``: POST-sent → first SSE event and → first ``output`` chunk.

Results go to ``bench/results/runs-<UTC timestamp>.json`` and ``bench/results/latest-runs.json``; a short table is
printed. Every process it starts is stopped at the end (SIGTERM, SIGKILL after 20 s), also on error. Exit status 1
when a variant failed or any run did not succeed. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats
import psutil
from nats.aio.msg import Msg

from kneo_events.ids import run_stream

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = {
    "three_step": Path(__file__).with_name("three_step.yaml"),
    "fanout8": Path(__file__).with_name("fanout8.yaml"),
}
RESULTS_DIR = ROOT / "bench" / "results"
VARIANTS = ("one_process", "two_runners")

WARMUP_RUNS = 20
SEQUENTIAL_RUNS = 200
SSE_RUNS = 200
QUICK_RUNS = 200
QUICK_SEQUENTIAL = 50

READY_TIMEOUT_S = 60.0  # spawn → /readyz 200 (includes initdb of a fresh cluster)
STOP_TIMEOUT_S = 20.0  # SIGTERM → SIGKILL
SERVER_GONE_TIMEOUT_S = 15.0  # serve exited → its embedded servers gone
REQUEST_TIMEOUT_S = 90.0  # above the gateway's 30 s sync wait (KNEO_SERV_SYNC_WAIT_SECONDS)
SETTLE_TIMEOUT_S = 60.0  # after a phase: how long a non-terminal run may take to finish before it counts as lost
SSE_TIMEOUT_S = 30.0  # one SSE run: POST → terminal event
TAIL_LINES = 40  # of each subprocess's output, on failure
SERVER_TAIL_LINES = 12  # of nats.log / postgres.log
MIB = 1024 * 1024

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "expired", "timed_out"})
STOP_EVENTS = frozenset({"run.succeeded", "run.failed", "run.cancelled", "run.expired", "run.timed_out"})


class BenchError(Exception):
    """The platform did not start, answer, or stop as expected; the message says what was seen."""


# ------------------------------------------------------------------------------------------------ statistics


def pct(sorted_vals: list[float], p: float) -> float:
    """Nearest-rank percentile of a sorted list (the same definition as ../shared/peers/common.py)."""
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, round(p / 100.0 * len(sorted_vals) + 0.5) - 1))
    return sorted_vals[k]


def summary(samples_s: list[float]) -> dict[str, float | int]:
    """p50/p95/p99/mean/max in milliseconds of samples in seconds."""
    ms = sorted(x * 1000.0 for x in samples_s)
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), 2),
        "p95_ms": round(pct(ms, 95), 2),
        "p99_ms": round(pct(ms, 99), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
        "max_ms": round(ms[-1], 2),
    }


# ------------------------------------------------------------------------------------------------ processes


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _kneo_executable() -> str:
    exe = shutil.which("kneo", path=str(Path(sys.executable).parent)) or shutil.which("kneo")
    if exe is None:
        raise BenchError("the `kneo` command is not installed; run `make install` and use .venv/bin/python")
    return exe


# never inherited: the platform under test always gets its own fresh servers and data
_DROPPED_ENV = (
    "KNEO_NATS_URL",
    "KNEO_DATABASE_URL",
    "KNEO_SERV_DATABASE_URL",
    "KNEO_DATABASE_SCHEMA",
    "KNEO_BUS_PREFIX",
    "KNEO_DATA_DIR",
    "KNEO_EMBEDDED_NATS_PORT",
    "KNEO_EMBEDDED_PG_PORT",
    "KNEO_HOST",
    "KNEO_PORT",
)


# always set: quiet servers, so logging costs no CPU the figures would include
_FORCED_ENV = {"KNEO_SERV_REQUEST_LOGS": "false", "KNEO_SERV_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}


def env_overrides() -> dict[str, str]:
    """The ``KNEO_*`` settings this process passes on to the platform (an experiment's knobs; no secrets)."""
    return {
        k: v
        for k, v in sorted(os.environ.items())
        if k.startswith("KNEO_")
        and k not in _DROPPED_ENV
        and k not in _FORCED_ENV
        and k != "KNEO_RUNNER_NAME"
        and "KEY" not in k
        and "SECRET" not in k
    }


def _base_env() -> dict[str, str]:
    """This process's environment without anything that would point kneo at other servers or data."""
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
    env.update(_FORCED_ENV)
    return env


@dataclass
class Child:
    """A subprocess this benchmark started, with its output files."""

    name: str
    args: list[str]
    popen: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    proc: psutil.Process
    exit_code: int | None = None


@dataclass
class Platform:
    """``kneo service serve`` (plus an extra runner process for ``two_runners``) on fresh embedded servers."""

    variant: str
    workdir: Path
    children: dict[str, Child] = field(default_factory=dict)
    servers: dict[str, psutil.Process] = field(default_factory=dict)
    url: str = ""
    nats_url: str = ""
    database_url: str = ""
    startup_s: float = 0.0
    stop_notes: list[str] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> Child:
        out, err = self.workdir / f"{name}.stdout.log", self.workdir / f"{name}.stderr.log"
        with out.open("wb") as fo, err.open("wb") as fe:
            # own session: a Ctrl-C in the terminal reaches the benchmark only, which then stops everything in order
            popen = subprocess.Popen(
                [_kneo_executable(), *args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=fo,
                stderr=fe,
                cwd=self.workdir,
                start_new_session=True,
            )
        child = Child(name, args, popen, out, err, psutil.Process(popen.pid))
        self.children[name] = child
        return child

    def start(self) -> None:
        """Start serve, wait for /readyz, find the embedded servers, start the extra runner if the variant has one."""
        port = free_port()
        env = {
            **_base_env(),
            "KNEO_DATA_DIR": str(self.data_dir),
            "KNEO_EMBEDDED_NATS_PORT": str(free_port()),
            "KNEO_EMBEDDED_PG_PORT": str(free_port()),
            "KNEO_RUNNER_NAME": "serve",
        }
        t0 = time.perf_counter()
        serve = self._spawn("serve", ["service", "serve", "--host", "127.0.0.1", "--port", str(port)], env)
        self.url = f"http://127.0.0.1:{port}"
        self._wait_ready(serve)
        self.startup_s = time.perf_counter() - t0
        problems = self._discover_servers()
        if problems:
            raise BenchError("; ".join(problems))
        if self.variant == "two_runners":
            renv = {
                **_base_env(),
                "KNEO_NATS_URL": self.nats_url,
                "KNEO_DATABASE_URL": self.database_url,
                "KNEO_RUNNER_NAME": "runner-2",
            }
            runner = self._spawn("runner", ["service", "run", "runner"], renv)
            self._wait_line(runner, "runner running")

    def _discover_servers(self) -> list[str]:
        """Find the embedded servers serve started from their ``kneo-server.json``; returns what went wrong."""
        problems = []
        for name, sub, binary in (("nats", "nats", "nats-server"), ("postgres", "pg", "postgres")):
            if name in self.servers:
                continue
            state_file = self.data_dir / sub / "kneo-server.json"
            try:
                state = json.loads(state_file.read_text())
                proc = psutil.Process(int(state["pid"]))
                if binary not in proc.name():
                    raise ValueError(f"pid {proc.pid} is {proc.name()!r}, not {binary}")
            except (OSError, ValueError, KeyError, TypeError, psutil.Error) as exc:
                problems.append(f"cannot find the embedded {name} server from {state_file}: {exc}")
                continue
            self.servers[name] = proc
            if name == "nats":
                self.nats_url = str(state["url"])
            else:
                self.database_url = str(state["url"])
        return problems

    def _check_alive(self, child: Child) -> None:
        code = child.popen.poll()
        if code is not None:
            raise BenchError(f"`kneo {' '.join(child.args)}` exited with {code} before it was ready")

    def _wait_ready(self, child: Child) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = "no answer"
        while time.monotonic() < deadline:
            self._check_alive(child)
            try:
                resp = httpx.get(f"{self.url}/readyz", timeout=2)
                if resp.status_code == 200:
                    return
                last = f"{resp.status_code} {resp.text[:300]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}"
            time.sleep(0.2)
        raise BenchError(f"GET /readyz was not 200 within {READY_TIMEOUT_S:.0f} s (last: {last})")

    def _wait_line(self, child: Child, needle: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_alive(child)
            if needle in child.stderr.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise BenchError(f"{child.name} did not print {needle!r} within {READY_TIMEOUT_S:.0f} s")

    def process_groups(self) -> dict[str, list[psutil.Process]]:
        """The live processes of the platform, grouped: serve, runner, nats-server, postgres (postmaster + children)."""
        groups: dict[str, list[psutil.Process]] = {}
        for name, child in self.children.items():
            if _alive(child.proc):
                groups[name] = [child.proc]
        if (nats := self.servers.get("nats")) is not None and _alive(nats):
            groups["nats-server"] = [nats]
        if (pg := self.servers.get("postgres")) is not None and _alive(pg):
            with contextlib.suppress(psutil.Error):
                groups["postgres"] = [pg, *pg.children(recursive=True)]
        return groups

    def tails(self) -> str:
        """The last lines of every log this platform wrote (the subprocesses' output and the servers' logs)."""
        parts = []
        paths = [(p, TAIL_LINES) for c in self.children.values() for p in (c.stderr, c.stdout)]
        paths += [(self.data_dir / "nats" / "nats.log", SERVER_TAIL_LINES)]
        paths += [(self.data_dir / "pg" / "postgres.log", SERVER_TAIL_LINES)]
        for path, lines in paths:
            text = _tail(path, lines)
            if text.strip():
                parts.append(f"--- {path} (last {lines} lines)\n{text}")
        return "\n".join(parts)

    def stop(self) -> None:
        """SIGTERM the extra runner, then serve (it stops its embedded servers); SIGKILL after 20 s; verify all gone."""
        self._discover_servers()  # also when start() failed half-way: what serve started must go too
        for name in ("runner", "serve"):
            child = self.children.get(name)
            if child is None:
                continue
            if child.popen.poll() is None:
                child.popen.send_signal(signal.SIGTERM)
                try:
                    child.popen.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.stop_notes.append(f"{name} still running {STOP_TIMEOUT_S:.0f} s after SIGTERM: SIGKILL")
                    child.popen.kill()
                    child.popen.wait(5)
            child.exit_code = child.popen.returncode
            if child.exit_code not in (0, -signal.SIGTERM):
                self.stop_notes.append(f"{name} exited with {child.exit_code}")
        pg = self.servers.get("postgres")
        watched = list(self.servers.items())
        if pg is not None and _alive(pg):
            with contextlib.suppress(psutil.Error):
                watched += [("postgres child", p) for p in pg.children(recursive=True)]
        deadline = time.monotonic() + SERVER_GONE_TIMEOUT_S
        while time.monotonic() < deadline and any(_alive(p) for _, p in watched):
            time.sleep(0.2)
        for name, proc in self.servers.items():  # the children of the postmaster follow it
            if not _alive(proc):
                continue
            self.stop_notes.append(f"{name} (pid {proc.pid}) still running after serve stopped: stopped by the bench")
            with contextlib.suppress(psutil.Error):
                # postgres: SIGINT = fast shutdown; nats-server: SIGTERM = graceful
                proc.send_signal(signal.SIGINT if name == "postgres" else signal.SIGTERM)
        for name, proc in watched:
            with contextlib.suppress(psutil.Error):
                if _alive(proc):
                    try:
                        proc.wait(STOP_TIMEOUT_S)
                    except psutil.TimeoutExpired:
                        self.stop_notes.append(f"{name} (pid {proc.pid}) ignored its stop signal: SIGKILL")
                        proc.kill()


# ------------------------------------------------------------------------------------------------ CPU / RSS


def cpu_snapshot(groups: dict[str, list[psutil.Process]]) -> dict[str, dict[int, float]]:
    """CPU seconds (user + system) per pid, per group."""
    snap: dict[str, dict[int, float]] = {}
    for name, procs in groups.items():
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                snap.setdefault(name, {})[proc.pid] = t.user + t.system
    return snap


def cpu_percent(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]], wall_s: float
) -> dict[str, float]:
    """Average CPU% of each group over ``wall_s`` (100 = one core busy); pids new in ``after`` count in full."""
    out: dict[str, float] = {}
    for name, pids in after.items():
        used = sum(t - before.get(name, {}).get(pid, 0.0) for pid, t in pids.items())
        out[name] = round(100.0 * used / wall_s, 1) if wall_s > 0 else 0.0
    return out


def rss_mib(groups: dict[str, list[psutil.Process]]) -> dict[str, Any]:
    """Resident memory per group in MiB (postgres: the sum over its processes, which counts shared memory again)."""
    out: dict[str, Any] = {}
    for name, procs in groups.items():
        total = 0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        out[name] = round(total / MIB, 1)
    if "postgres" in groups:
        out["postgres_processes"] = len(groups["postgres"])
        pss = 0
        for proc in groups["postgres"]:
            with contextlib.suppress(psutil.Error, AttributeError):
                pss += proc.memory_full_info().pss  # shared pages divided among the processes: sums correctly
        out["postgres_pss"] = round(pss / MIB, 1)
    return out


# ------------------------------------------------------------------------------------------------ HTTP phases


@dataclass
class Outcome:
    """One sync run as the client saw it."""

    latency_s: float
    http_status: int | None
    run_id: str | None
    status: str | None
    error: str | None = None
    sent_at: float = 0.0  # wall clock (time.time()), comparable with the log's recorded_at on this machine


def _headers() -> dict[str, str]:
    key = os.environ.get("KNEO_API_KEY") or os.environ.get("KNEO_SERV_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _body(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return resp.text


async def sync_run(client: httpx.AsyncClient, spec: str, i: int) -> Outcome:
    """POST one sync run; the answer comes when the run is terminal (or after the gateway's sync wait: 202)."""
    sent_at, t0 = time.time(), time.perf_counter()
    try:
        resp = await client.post("/v1/runs", json={"spec": spec, "input": f"bench {i}", "async_mode": False})
    except httpx.HTTPError as exc:
        return Outcome(time.perf_counter() - t0, None, None, None, f"{type(exc).__name__}: {exc}", sent_at)
    dt = time.perf_counter() - t0
    body = _body(resp)
    if not isinstance(body, dict) or resp.status_code not in (200, 202):
        return Outcome(dt, resp.status_code, None, None, f"HTTP {resp.status_code}: {str(body)[:500]}", sent_at)
    status = body.get("status")
    err = None if status == "succeeded" else f"HTTP {resp.status_code}: {json.dumps(body)[:500]}"
    return Outcome(dt, resp.status_code, body.get("run_id"), status, err, sent_at)


class RawHttp:
    """A minimal keep-alive HTTP/1.1 client (one connection) for the throughput phase.

    httpx costs about as much CPU per request as the server does; on a 2-core machine the load generator would
    then take a core from the platform it measures. This client spends little, so the figure is the platform's.
    """

    def __init__(self, base_url: str) -> None:
        host, _, port = base_url.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_json(self, path: str, payload: dict[str, Any]) -> tuple[int, Any]:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        body = json.dumps(payload).encode()
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        data = await self.reader.readexactly(length)
        return status, json.loads(data) if data else None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()


async def raw_sync_run(client: RawHttp, spec: str, i: int) -> Outcome:
    """:func:`sync_run` over :class:`RawHttp`."""
    sent_at, t0 = time.time(), time.perf_counter()
    try:
        code, body = await client.post_json("/v1/runs", {"spec": spec, "input": f"bench {i}", "async_mode": False})
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        return Outcome(time.perf_counter() - t0, None, None, None, f"{type(exc).__name__}: {exc}", sent_at)
    dt = time.perf_counter() - t0
    if not isinstance(body, dict) or code not in (200, 202):
        return Outcome(dt, code, None, None, f"HTTP {code}: {str(body)[:500]}", sent_at)
    status = body.get("status")
    err = None if status == "succeeded" else f"HTTP {code}: {json.dumps(body)[:500]}"
    return Outcome(dt, code, body.get("run_id"), status, err, sent_at)


async def run_pool(
    client: httpx.AsyncClient, spec: str, n: int, concurrency: int, raw: bool = False
) -> tuple[list[Outcome], float]:
    """``n`` sync runs with at most ``concurrency`` in flight; returns the outcomes and the wall time."""
    outcomes: list[Outcome] = []
    counter = iter(range(n))

    async def worker() -> None:
        if raw:
            conn = RawHttp(str(client.base_url).rstrip("/"))
            try:
                for i in counter:
                    outcomes.append(await raw_sync_run(conn, spec, i))
            finally:
                await conn.close()
            return
        for i in counter:
            outcomes.append(await sync_run(client, spec, i))

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(min(concurrency, n)):
            tg.create_task(worker())
    return outcomes, time.perf_counter() - t0


async def succeeded_total(client: httpx.AsyncClient) -> int:
    """``total`` of ``GET /v1/runs?status=succeeded``."""
    resp = await client.get("/v1/runs", params={"status": "succeeded", "limit": 1})
    if resp.status_code != 200:
        raise BenchError(f"GET /v1/runs?status=succeeded answered {resp.status_code}: {resp.text[:500]}")
    return int(resp.json()["total"])


async def settle(client: httpx.AsyncClient, outcomes: list[Outcome]) -> dict[str, int]:
    """Follow runs that were not terminal when their POST answered, up to SETTLE_TIMEOUT_S; final status counts."""
    pending = {o.run_id for o in outcomes if o.run_id and o.status not in TERMINAL}
    final: dict[str, int] = {}
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while pending and time.monotonic() < deadline:
        for run_id in sorted(pending):
            resp = await client.get(f"/v1/runs/{run_id}")
            status = resp.json().get("status") if resp.status_code == 200 else f"http_{resp.status_code}"
            if status in TERMINAL or resp.status_code != 200:
                final[str(status)] = final.get(str(status), 0) + 1
                pending.discard(run_id)
        if pending:
            await asyncio.sleep(0.5)
    if pending:
        final["still_not_terminal"] = len(pending)
    return final


def failure_report(outcomes: list[Outcome]) -> dict[str, Any]:
    """Counts of what the non-succeeded runs answered, and the first few answers verbatim."""
    bad = [o for o in outcomes if o.status != "succeeded"]
    kinds: dict[str, int] = {}
    for o in bad:
        key = f"http_{o.http_status}:{o.status}" if o.http_status else (o.error or "error").split(":")[0]
        kinds[key] = kinds.get(key, 0) + 1
    return {"non_succeeded": len(bad), "kinds": kinds, "samples": [o.error for o in bad[:5]]}


async def events_count(conn: asyncpg.Connection) -> int:
    """Rows in the event log."""
    return int(await conn.fetchval("SELECT count(*) FROM events"))


async def steps_by_runner(conn: asyncpg.Connection, after_position: int) -> dict[str, int]:
    """Step commands handled per runner process since ``after_position`` (the runner's name is in each event)."""
    rows = await conn.fetch(
        "SELECT metadata->>'runner' AS runner, count(DISTINCT metadata->>'causation_id') AS steps FROM events "
        "WHERE position > $1 AND metadata ? 'runner' GROUP BY 1 ORDER BY 1",
        after_position,
    )
    return {str(r["runner"]): int(r["steps"]) for r in rows}


_BREAKDOWN_SQL = """
WITH e AS (
    SELECT stream_id, type, recorded_at,
           lag(recorded_at) OVER (PARTITION BY stream_id ORDER BY version) AS prev_at,
           lag(type) OVER (PARTITION BY stream_id ORDER BY version) AS prev_type
    FROM events WHERE position > $1 AND stream_id LIKE 'run-%'
)
SELECT stream_id, prev_type, type, extract(epoch FROM recorded_at - prev_at)::float8 AS gap_s,
       extract(epoch FROM recorded_at)::float8 AS at_s
FROM e WHERE type IN ('run.created', 'run.compiled', 'step.completed', 'run.succeeded')
"""


async def breakdown(conn: asyncpg.Connection, after_position: int, outcomes: list[Outcome]) -> dict[str, Any]:
    """Where the time of a sync run went, from the log's ``recorded_at`` (same machine, same clock as the client):
    POST sent → ``run.created`` committed (HTTP, validation, the append), created → compiled, each step, created →
    ``run.succeeded`` (the run in the platform), and succeeded → the client has the answer (the gateway noticing).
    The caller adds ``succeeded_committed_to_bus``: ``run.succeeded`` committed → delivered by NATS to the bench."""
    compile_s: list[float] = []
    step_s: list[float] = []
    created: dict[str, float] = {}
    finished: dict[str, float] = {}
    for r in await conn.fetch(_BREAKDOWN_SQL, after_position):
        if r["type"] == "run.created":
            created[r["stream_id"]] = r["at_s"]
        elif r["type"] == "run.succeeded":
            finished[r["stream_id"]] = r["at_s"]
        elif r["type"] == "run.compiled":
            compile_s.append(r["gap_s"])
        elif r["prev_type"] == "step.scheduled":
            step_s.append(r["gap_s"])
    to_created: list[float] = []
    to_answer: list[float] = []
    for o in outcomes:
        sid = run_stream(o.run_id) if o.run_id else ""
        if sid in created and sid in finished:
            to_created.append(created[sid] - o.sent_at)
            to_answer.append(o.sent_at + o.latency_s - finished[sid])
    return {
        "post_to_created": summary(to_created),
        "created_to_compiled": summary(compile_s),
        "step_scheduled_to_completed": summary(step_s),
        "run_in_platform": summary([finished[k] - v for k, v in created.items() if k in finished]),
        "succeeded_to_answer": summary(to_answer),
    }


async def audit_lag(conn: asyncpg.Connection, after_position: int, n: int) -> dict[str, Any]:
    """How long after its event each audit record of this phase was written (the audit projection's lag)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the projection is asynchronous: let it catch up with the phase
        got = await conn.fetchval(
            "SELECT count(*) FROM audit_events WHERE position > $1 AND event_type = 'run.created'", after_position
        )
        if got >= n:
            break
        await asyncio.sleep(0.1)
    rows = await conn.fetch(
        "SELECT EXTRACT(EPOCH FROM (projected_at - occurred_at)) AS lag FROM audit_events WHERE position > $1",
        after_position,
    )
    return {"records": len(rows), "lag": summary([float(r["lag"]) for r in rows])}


async def phase_throughput(
    client: httpx.AsyncClient, plat: Platform, spec: str, n: int, concurrency: int, raw: bool = True
) -> dict[str, Any]:
    """N sync runs at concurrency C, with events/s, CPU% and RSS of every process of the platform."""
    conn = await asyncpg.connect(plat.database_url, timeout=10)
    nc = await nats.connect(plat.nats_url, connect_timeout=5, allow_reconnect=False, name="kneo-bench")
    bus_lag: list[float] = []

    async def on_succeeded(msg: Msg) -> None:
        received = time.time()
        with contextlib.suppress(ValueError, KeyError, TypeError):
            bus_lag.append(received - datetime.fromisoformat(json.loads(msg.data)["recorded_at"]).timestamp())

    try:
        # run ids have no dots: one token; the gateway waits for exactly these messages to answer a sync POST
        await nc.subscribe("kneo.evt.run.*.run.succeeded", cb=on_succeeded)
        ok_before = await succeeded_total(client)
        ev_before = await events_count(conn)
        pos_before = int(await conn.fetchval("SELECT coalesce(max(position), 0) FROM events"))
        groups = {**plat.process_groups(), "bench_client": [psutil.Process()]}
        psutil.cpu_percent(None)
        cpu_before = cpu_snapshot(groups)
        outcomes, wall = await run_pool(client, spec, n, concurrency, raw=raw)
        groups = {**plat.process_groups(), "bench_client": [psutil.Process()]}
        cpu_after = cpu_snapshot(groups)
        machine_busy = psutil.cpu_percent(None)
        rss = rss_mib({k: v for k, v in groups.items() if k != "bench_client"})
        ev_after = await events_count(conn)
        late = await settle(client, outcomes)
        ok_after = await succeeded_total(client)
        split = await steps_by_runner(conn, pos_before)
        where = await breakdown(conn, pos_before, outcomes)
        where["succeeded_committed_to_bus"] = summary(bus_lag)
        audit = await audit_lag(conn, pos_before, n)
    finally:
        await conn.close()
        with contextlib.suppress(Exception):
            await nc.close()
    appended = ev_after - ev_before
    cpu = cpu_percent(cpu_before, cpu_after, wall)
    # what the rest of the machine used meanwhile (other users' tests, …), in the same unit: 100 = one core
    other = max(0.0, machine_busy * machine()["cpus"] - sum(cpu.values()))
    verified = ok_after - ok_before
    report = failure_report(outcomes)
    return {
        "n": n,
        "concurrency": concurrency,
        "wall_s": round(wall, 3),
        "runs_per_s": round(n / wall, 1),
        "latency": summary([o.latency_s for o in outcomes]),
        **report,
        "settled_later": late,
        "verified_succeeded": verified,
        "nothing_lost": report["non_succeeded"] == 0 and verified == n,
        "events_appended": appended,
        "events_per_s": round(appended / wall, 1),
        "events_per_run": round(appended / n, 2),
        "steps_by_runner": split,
        "breakdown": where,
        "audit_lag": audit,
        "cpu_percent": {**cpu, "other_processes": round(other, 1), "machine_busy_pct_of_all_cpus": machine_busy},
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
        "rss_mib": rss,
    }


async def phase_sequential(client: httpx.AsyncClient, spec: str, n: int) -> dict[str, Any]:
    """N sync runs one at a time."""
    outcomes, wall = await run_pool(client, spec, n, 1)
    return {
        "n": n,
        "wall_s": round(wall, 3),
        "latency": summary([o.latency_s for o in outcomes]),
        **failure_report(outcomes),
    }


@dataclass
class SseSample:
    """Timings of one async run followed over SSE, from the moment the POST was sent."""

    post_s: float | None = None
    first_event_s: float | None = None
    first_event_type: str | None = None
    first_output_s: float | None = None
    terminal_s: float | None = None
    terminal_type: str | None = None
    error: str | None = None


async def sse_run(client: httpx.AsyncClient, spec: str, i: int) -> SseSample:
    """POST an async run, open its stream as soon as the POST answers, time the first event and first output."""
    sample = SseSample()
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(SSE_TIMEOUT_S):
            resp = await client.post("/v1/runs", json={"spec": spec, "input": f"sse {i}", "async_mode": True})
            sample.post_s = time.perf_counter() - t0
            body = _body(resp)
            if resp.status_code != 202 or not isinstance(body, dict):
                sample.error = f"POST HTTP {resp.status_code}: {str(body)[:500]}"
                return sample
            url = f"/v1/runs/{body['run_id']}/stream"
            async with client.stream("GET", url, headers={"Accept": "text/event-stream"}) as stream:
                if stream.status_code != 200:
                    await stream.aread()
                    sample.error = f"stream HTTP {stream.status_code}: {stream.text[:500]}"
                    return sample
                event, has_data = "message", False
                async for line in stream.aiter_lines():
                    if line == "":
                        if has_data:
                            now = time.perf_counter() - t0
                            if sample.first_event_s is None:
                                sample.first_event_s, sample.first_event_type = now, event
                            if event == "output" and sample.first_output_s is None:
                                sample.first_output_s = now
                            if event in STOP_EVENTS:
                                sample.terminal_s, sample.terminal_type = now, event
                                break
                        event, has_data = "message", False
                    elif line.startswith(":"):
                        continue
                    else:
                        name, _, value = line.partition(":")
                        if name == "event":
                            event = value.strip()
                        elif name == "data":
                            has_data = True
    except TimeoutError:
        sample.error = f"no terminal event within {SSE_TIMEOUT_S:.0f} s"
    except httpx.HTTPError as exc:
        sample.error = f"{type(exc).__name__}: {exc}"
    if sample.error is None and sample.terminal_s is None:
        sample.error = "the stream ended without a terminal event"
    return sample


async def phase_sse(client: httpx.AsyncClient, spec: str, n: int) -> dict[str, Any]:
    """N async runs one at a time, each followed over SSE."""
    samples = [await sse_run(client, spec, i) for i in range(n)]

    def pick(attr: str) -> list[float]:
        return [v for s in samples if (v := getattr(s, attr)) is not None]

    first_types: dict[str, int] = {}
    for s in samples:
        if s.first_event_type:
            first_types[s.first_event_type] = first_types.get(s.first_event_type, 0) + 1
    bad = [s for s in samples if s.error or s.terminal_type != "run.succeeded"]
    return {
        "n": n,
        "post_answered": summary(pick("post_s")),
        "first_event": summary(pick("first_event_s")),
        "first_event_types": first_types,
        "first_output": summary(pick("first_output_s")),
        "no_output_seen": sum(1 for s in samples if s.first_output_s is None),
        "terminal_event": summary(pick("terminal_s")),
        "non_succeeded": len(bad),
        "samples": [s.error or f"terminal {s.terminal_type}" for s in bad[:5]],
    }


async def measure(
    plat: Platform, spec: str, runs: int, concurrency: int, sequential: int, sse: int, raw: bool = True
) -> dict[str, Any]:
    """Warm up, then the three phases, in order, against one running platform."""
    limits = httpx.Limits(max_connections=concurrency + 20, max_keepalive_connections=concurrency + 20)
    async with httpx.AsyncClient(
        base_url=plat.url, http2=False, limits=limits, timeout=REQUEST_TIMEOUT_S, headers=_headers()
    ) as client:
        warm, _ = await run_pool(client, spec, WARMUP_RUNS, min(concurrency, WARMUP_RUNS))
        if any(o.status != "succeeded" for o in warm):
            raise BenchError(f"warm-up runs did not succeed: {json.dumps(failure_report(warm))}")
        phases: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = [
            ("throughput", lambda: phase_throughput(client, plat, spec, runs, concurrency, raw)),
            ("sequential", lambda: phase_sequential(client, spec, sequential)),
            ("sse", lambda: phase_sse(client, spec, sse)),
        ]
        out: dict[str, Any] = {"startup_s": round(plat.startup_s, 2)}
        for name, phase in phases:
            print(f"[{plat.variant}] {name} …", file=sys.stderr, flush=True)
            out[name] = await phase()
        return out


# ------------------------------------------------------------------------------------------------ reporting


def machine() -> dict[str, Any]:
    """The facts a figure needs beside it."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 0
    return {
        "cpus": cpus,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
    }


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def git_state() -> dict[str, Any]:
    """The checked-out commit and the files that differ from it: the code a figure was measured on."""
    status = _git("status", "--porcelain", "--untracked-files=no") or ""
    return {
        "describe": (_git("describe", "--always", "--dirty") or "").strip() or None,
        "modified": [line[3:] for line in status.splitlines() if len(line) > 3],
    }


def _ms(d: dict[str, Any], key: str = "p50_ms") -> str:
    v = d.get(key)
    return f"{v:.1f}" if isinstance(v, int | float) else "-"


def table(results: dict[str, Any]) -> str:
    """A short human-readable table of the headline figures."""
    rows = [("", *results.keys())]

    def row(label: str, get: Callable[[dict[str, Any]], str]) -> None:
        cells = []
        for res in results.values():
            try:
                cells.append(get(res) if "error" not in res else "error")
            except (KeyError, TypeError):
                cells.append("-")
        rows.append((label, *cells))

    row("throughput runs/s", lambda r: f"{r['throughput']['runs_per_s']:.1f}")
    row(
        "  latency p50/p95/p99 ms",
        lambda r: "/".join(_ms(r["throughput"]["latency"], k) for k in ("p50_ms", "p95_ms", "p99_ms")),
    )
    row(
        "  non-succeeded / verified",
        lambda r: f"{r['throughput']['non_succeeded']} / {r['throughput']['verified_succeeded']}",
    )
    row(
        "  of which run in platform",
        lambda r: "/".join(
            _ms(r["throughput"]["breakdown"]["run_in_platform"], k) for k in ("p50_ms", "p95_ms", "p99_ms")
        ),
    )
    row(
        "  step scheduled→completed",
        lambda r: "/".join(
            _ms(r["throughput"]["breakdown"]["step_scheduled_to_completed"], k) for k in ("p50_ms", "p95_ms", "p99_ms")
        ),
    )
    row(
        "  events/s (per run)", lambda r: f"{r['throughput']['events_per_s']:.0f} ({r['throughput']['events_per_run']})"
    )
    row(
        "  CPU% serve/runner/nats/pg/client/other",
        lambda r: "/".join(
            f"{r['throughput']['cpu_percent'].get(k, 0):.0f}"
            for k in ("serve", "runner", "nats-server", "postgres", "bench_client", "other_processes")
        ),
    )
    row(
        "  RSS MiB serve/runner/nats/pg",
        lambda r: "/".join(
            f"{r['throughput']['rss_mib'].get(k, 0):.0f}" for k in ("serve", "runner", "nats-server", "postgres")
        ),
    )
    row(
        "sequential p50/p95/p99 ms",
        lambda r: "/".join(_ms(r["sequential"]["latency"], k) for k in ("p50_ms", "p95_ms", "p99_ms")),
    )
    row(
        "POST→first SSE event p50/p95/p99 ms",
        lambda r: "/".join(_ms(r["sse"]["first_event"], k) for k in ("p50_ms", "p95_ms", "p99_ms")),
    )
    row(
        "POST→first output p50/p95/p99 ms",
        lambda r: "/".join(_ms(r["sse"]["first_output"], k) for k in ("p50_ms", "p95_ms", "p99_ms")),
    )
    row("startup s", lambda r: f"{r['startup_s']:.1f}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def failed(res: dict[str, Any]) -> bool:
    """A variant failed when it errored or any run of any phase did not succeed."""
    if "error" in res:
        return True
    return (
        not res["throughput"]["nothing_lost"]
        or res["sequential"]["non_succeeded"] > 0
        or res["sse"]["non_succeeded"] > 0
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def run_variant(variant: str, spec: str, args: argparse.Namespace) -> dict[str, Any]:
    """Start the platform for ``variant``, measure, stop; on failure the error and the logs' tails are the result.

    The platform is stopped in ``finally``, so nothing is left running on an error or a Ctrl-C either.
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"kneo-bench-{variant}-"))
    plat = Platform(variant, workdir)
    res: dict[str, Any]
    try:
        plat.start()
        res = asyncio.run(
            measure(plat, spec, args.runs, args.concurrency, args.sequential, args.sse, args.client == "raw")
        )
    except Exception as exc:
        res = {"error": _describe(exc)}
        died = [
            f"{c.name} exited with {c.popen.returncode}" for c in plat.children.values() if c.popen.poll() is not None
        ]
        if died:  # the likely cause of a connection error: say so first
            res["error"] += f" ({', '.join(died)} during the benchmark)"
    finally:
        plat.stop()
    res["processes_stopped"] = {
        "exit_codes": {n: c.exit_code for n, c in plat.children.items()},
        "notes": plat.stop_notes,
    }
    bad = failed(res)
    if bad:
        res["logs_tail"] = plat.tails()
        what = f"FAILED: {res['error']}" if "error" in res else "some runs did not succeed"
        print(f"[{variant}] {what}; logs:\n{res['logs_tail']}", file=sys.stderr)
    if bad or args.keep_data or plat.stop_notes:
        print(f"[{variant}] logs and data kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return res


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_runs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None, help="throughput runs N (default 1000; --quick: 200)")
    parser.add_argument("--concurrency", type=int, default=50, help="runs in flight in the throughput phase")
    parser.add_argument(
        "--sequential",
        type=int,
        default=None,
        help=f"runs of the sequential-latency phase (default {SEQUENTIAL_RUNS}; --quick: {QUICK_SEQUENTIAL})",
    )
    parser.add_argument(
        "--sse", type=int, default=None, help=f"runs of the SSE phase (default {SSE_RUNS}; --quick: {QUICK_SEQUENTIAL})"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--quick", action="store_true", help="smoke run: N=200, 50 sequential, 50 SSE")
    parser.add_argument("--keep-data", action="store_true", help="keep each variant's temp dir (logs, data)")
    parser.add_argument(
        "--workflow",
        choices=sorted(WORKFLOWS),
        default="three_step",
        help="three_step (the peers' workflow) or fanout8 (a concurrent fan-out of 8 branches)",
    )
    parser.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="throughput-phase HTTP client: raw (a minimal keep-alive client, default) or httpx",
    )
    args = parser.parse_args(argv)
    args.runs = args.runs or (QUICK_RUNS if args.quick else 1000)
    args.sequential = args.sequential or (QUICK_SEQUENTIAL if args.quick else SEQUENTIAL_RUNS)
    args.sse = args.sse or (QUICK_SEQUENTIAL if args.quick else SSE_RUNS)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"unknown variant(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(VARIANTS)}")
    if min(args.runs, args.concurrency, args.sequential, args.sse) < 1:
        parser.error("--runs, --concurrency, --sequential and --sse must be positive")
    args.variants = variants
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec_file = WORKFLOWS[args.workflow]
    spec = spec_file.read_text()
    started = datetime.now(UTC)
    code = git_state()  # before the runs: the code the platform processes import when they start
    results: dict[str, Any] = {}
    for variant in args.variants:
        print(f"[{variant}] starting the platform …", file=sys.stderr, flush=True)
        results[variant] = run_variant(variant, spec, args)
    record = {
        "ts": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "git": code,
        "params": {
            "runs": args.runs,
            "concurrency": args.concurrency,
            "client": args.client,
            "sequential": args.sequential,
            "sse": args.sse,
            "warmup": WARMUP_RUNS,
            "quick": args.quick,
            "env": env_overrides(),
            "spec": str(spec_file.relative_to(ROOT)),
            "workflow": args.workflow,
            "variants": args.variants,
        },
        "results": results,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2) + "\n"
    tag = "" if args.workflow == "three_step" else f"{args.workflow}-"
    path = RESULTS_DIR / f"runs-{tag}{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(text)
    latest = RESULTS_DIR / f"latest-{tag}runs.json"
    latest.write_text(text)
    m = record["machine"]
    print(
        f"\nKneo run benchmark, {record['ts']}, {m['cpus']} CPUs, Python {m['python']}; N={args.runs} "
        f"C={args.concurrency}, {args.sequential} sequential, {args.sse} SSE\n"
    )
    print(table(results))
    print(f"\nwritten: {path.relative_to(ROOT)} and {latest.relative_to(ROOT)}")
    return 1 if any(failed(r) for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
