"""Jobs-face benchmark: job → signed webhook, and many cursor-stream clients on one job (docs/benchmarks.md).

Run it with ``python -m tests.bench.bench_jobs`` (``make bench``). It starts ``kneo service serve`` on fresh embedded
NATS + PostgreSQL in a temporary directory on free ports (the same ``Platform`` as ``bench_runs``), registers a
webhook for ``job.completed`` pointing at a receiver inside this process (uvicorn on 127.0.0.1), and measures:

* webhook latency: N jobs at concurrency C; for each, ``POST /jobs`` sent → its ``job.completed`` delivery received
  (p50/p95/p99);
* webhook throughput: M jobs created as fast as C clients can; deliveries counted per second at the receiver
  (sustained = deliveries / (last − first arrival), and the per-second buckets); every signature verified with the
  seed's ``verify_signature``, every job delivered;
* cursor stream fan-out: one job (a slower dummy model, so it is still working when the clients connect) and S
  clients on ``GET /jobs/{id}/cursor/stream`` at once: request sent → first event and → ``completed`` (p50/p99),
  and every client received exactly the job's whole transcript (``GET /jobs/{id}/cursor``).

Results go to ``bench/results/jobs-<UTC timestamp>.json`` and ``bench/results/latest-jobs.json``; a short table is
printed. Exit status 1 when anything was lost, unsigned or wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from tests.bench.bench_runs import (
    RESULTS_DIR,
    ROOT,
    BenchError,
    Platform,
    _describe,
    env_overrides,
    git_state,
    machine,
    summary,
)

WEBHOOK_SECRET = "bench_webhook_secret_0123456789"
WARMUP_JOBS = 10
DELIVERY_TIMEOUT_S = 120.0  # after the last POST: how long the remaining deliveries may take
STREAM_TIMEOUT_S = 120.0
# the fan-out job's model: slow enough that all clients connect while it works (≈ 4 LLM turns × 20 × 40 ms)
SLOW_MODEL = {"bench-slow": {"provider": "dummy", "name": "slow", "params": {"latency_ms": 40, "chunks": 20}}}


# the seed's receiver check (seeds/000 "Webhooks for Async Updates"), with this benchmark's secret
def verify_signature(payload: bytes, signature: str) -> bool:
    computed = hmac.new(WEBHOOK_SECRET.encode(), payload, hashlib.sha256).hexdigest()
    return hmac.compare_digest(f"sha256={computed}", signature)


@dataclass
class Receiver:
    """An ASGI app that records when each job's ``job.completed`` arrived and whether its signature verified."""

    url: str = ""
    arrived: dict[str, float] = field(default_factory=dict)
    waiters: dict[str, asyncio.Future[float]] = field(default_factory=dict)
    duplicates: int = 0
    bad_signatures: int = 0
    other: int = 0

    def wait_for(self, job_id: str) -> asyncio.Future[float]:
        fut = self.waiters.get(job_id)
        if fut is None:
            fut = self.waiters[job_id] = asyncio.get_running_loop().create_future()
            if job_id in self.arrived:
                fut.set_result(self.arrived[job_id])
        return fut

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        at = time.perf_counter()
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if not verify_signature(body, headers.get("x-knify-signature", "")):
            self.bad_signatures += 1
        event = json.loads(body)
        if event.get("type") != "job.completed":
            self.other += 1
        elif event["job_id"] in self.arrived:
            self.duplicates += 1
        else:
            self.arrived[event["job_id"]] = at
            fut = self.waiters.get(event["job_id"])
            if fut is not None and not fut.done():
                fut.set_result(at)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield  # Ctrl-C reaches the benchmark, which stops everything in order


@contextlib.asynccontextmanager
async def receiving() -> Any:
    rec = Receiver()
    server = _Server(
        uvicorn.Config(rec, host="127.0.0.1", port=0, log_level="warning", lifespan="off", access_log=False)
    )
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or task.done():
            raise BenchError("the webhook receiver did not start")
        await asyncio.sleep(0.01)
    rec.url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/webhooks/knify"
    try:
        yield rec
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)


async def create_job(client: httpx.AsyncClient, prompt: str, model: str = "auto") -> str:
    resp = await client.post("/jobs", json={"spec": {"job_type": "cursor_task", "prompt": prompt, "model": model}})
    if resp.status_code != 200:
        raise BenchError(f"POST /jobs answered {resp.status_code}: {resp.text[:300]}")
    job_id: str = resp.json()["job_id"]
    return job_id


async def phase_latency(client: httpx.AsyncClient, rec: Receiver, n: int, concurrency: int) -> dict[str, Any]:
    """POST /jobs sent → its job.completed received, for n jobs with ``concurrency`` in flight."""
    samples: list[float] = []
    lost: list[str] = []
    queue = iter(range(n))

    async def worker() -> None:
        for i in queue:
            t0 = time.perf_counter()
            job_id = await create_job(client, f"latency job {i}")
            try:
                at = await asyncio.wait_for(asyncio.shield(rec.wait_for(job_id)), DELIVERY_TIMEOUT_S)
            except TimeoutError:
                lost.append(job_id)
                continue
            samples.append(at - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {
        "jobs": n,
        "concurrency": concurrency,
        "create_to_webhook": summary(samples),
        "jobs_per_s": round(n / wall, 1),
        "lost": len(lost),
    }


async def phase_throughput(client: httpx.AsyncClient, rec: Receiver, m: int, concurrency: int) -> dict[str, Any]:
    """m jobs created as fast as ``concurrency`` clients can; deliveries per second at the receiver."""
    ids: list[str] = []
    queue = iter(range(m))
    before = set(rec.arrived)

    async def worker() -> None:
        for i in queue:
            ids.append(await create_job(client, f"throughput job {i}"))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    created_s = time.perf_counter() - t0
    with contextlib.suppress(TimeoutError):  # what has not arrived by then counts as lost
        await asyncio.wait_for(asyncio.gather(*(asyncio.shield(rec.wait_for(i)) for i in ids)), DELIVERY_TIMEOUT_S)
    times = sorted(rec.arrived[i] for i in ids if i in rec.arrived and i not in before)
    span = times[-1] - times[0] if len(times) > 1 else float("nan")
    buckets = Counter(int(t - t0) for t in times)
    per_second = [buckets.get(s, 0) for s in range(int(times[-1] - t0) + 1)] if times else []
    full = per_second[1:-1] or per_second  # whole seconds only (the first and last are partial)
    return {
        "jobs": m,
        "concurrency": concurrency,
        "jobs_created_per_s": round(m / created_s, 1),
        "delivered": len(times),
        "lost": m - len(times),
        "deliveries_per_s": round((len(times) - 1) / span, 1) if len(times) > 1 else 0.0,
        "per_second": per_second,
        "best_second": max(full) if full else 0,
        "median_second": sorted(full)[len(full) // 2] if full else 0,
        "first_to_last_delivery_s": round(span, 2),
        "post_start_to_last_delivery_s": round(times[-1] - t0, 2) if times else None,
    }


async def sse_client(url: str, headers: dict[str, str], client: httpx.AsyncClient) -> dict[str, Any]:
    t0 = time.perf_counter()
    first = done = None
    items: list[Any] = []
    async with client.stream("GET", url, headers=headers) as resp:
        if resp.status_code != 200:
            return {"error": f"HTTP {resp.status_code}"}
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            now = time.perf_counter()
            first = first if first is not None else now - t0
            item = json.loads(line[5:].strip())
            items.append(item)
            if item.get("type") == "completed":
                done = now - t0
                break
    return {"first": first, "completed": done, "items": items, "completed_at": t0 + done if done else None}


async def phase_fanout(base_url: str, clients: int) -> dict[str, Any]:
    """One working job, ``clients`` concurrent /cursor/stream readers."""
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=STREAM_TIMEOUT_S) as client:
        job_id = await create_job(client, "fan-out job", model="bench-slow")
        url = f"/jobs/{job_id}/cursor/stream"
        t0 = time.perf_counter()
        results = await asyncio.gather(*(sse_client(url, {}, client) for _ in range(clients)), return_exceptions=True)
        wall = time.perf_counter() - t0
        status = (await client.get(f"/jobs/{job_id}")).json()["status"]
        transcript = (await client.get(f"/jobs/{job_id}/cursor")).json()["events"]
    ok = [r for r in results if isinstance(r, dict) and r.get("completed") is not None]
    errors = [_describe(r) if isinstance(r, BaseException) else r.get("error", "no completed") for r in results]
    errors = [e for e, r in zip(errors, results, strict=True) if not (isinstance(r, dict) and r in ok)]
    complete = sum(1 for r in ok if r["items"] == transcript)
    return {
        "clients": clients,
        "job_status": status,
        "transcript_items": len(transcript),
        "first_event": summary([r["first"] for r in ok]),
        "completed_event": summary([r["completed"] for r in ok]),
        # the fan-out cost: each client's `completed` after the first client's (the same item, sent to all)
        "completed_spread": summary([r["completed_at"] - min(o["completed_at"] for o in ok) for r in ok]),
        "clients_with_full_stream": complete,
        "errors": Counter(str(e) for e in errors),
        "wall_s": round(wall, 2),
    }


async def measure(plat: Platform, args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.concurrency + 20, max_keepalive_connections=args.concurrency + 20)
    out: dict[str, Any] = {"startup_s": round(plat.startup_s, 2)}
    async with receiving() as rec, httpx.AsyncClient(base_url=plat.url, limits=limits, timeout=90) as client:
        resp = await client.post(
            "/webhooks", json={"url": rec.url, "events": ["job.completed"], "secret": WEBHOOK_SECRET}
        )
        if resp.status_code != 201:
            raise BenchError(f"POST /webhooks answered {resp.status_code}: {resp.text[:300]}")
        warm = await phase_latency(client, rec, WARMUP_JOBS, 5)
        if warm["lost"]:
            raise BenchError(f"warm-up: {warm['lost']} job.completed deliveries never arrived")
        print(f"[jobs] webhook latency: {args.jobs} jobs at C={args.latency_concurrency} …", file=sys.stderr)
        out["webhook_latency"] = await phase_latency(client, rec, args.jobs, args.latency_concurrency)
        print(f"[jobs] webhook throughput: {args.burst} jobs at C={args.concurrency} …", file=sys.stderr)
        out["webhook_throughput"] = await phase_throughput(client, rec, args.burst, args.concurrency)
        out["receiver"] = {
            "deliveries": len(rec.arrived),
            "bad_signatures": rec.bad_signatures,
            "duplicates": rec.duplicates,
            "other_events": rec.other,
        }
    print(f"[jobs] cursor stream fan-out: {args.sse_clients} clients …", file=sys.stderr)
    out["cursor_stream_fanout"] = await phase_fanout(plat.url, args.sse_clients)
    return out


def failed(res: dict[str, Any]) -> bool:
    if "error" in res:
        return True
    fan = res["cursor_stream_fanout"]
    return bool(
        res["webhook_latency"]["lost"]
        or res["webhook_throughput"]["lost"]
        or res["receiver"]["bad_signatures"]
        or fan["clients_with_full_stream"] != fan["clients"]
        or fan["job_status"] != "completed"
    )


def table(res: dict[str, Any]) -> str:
    if "error" in res:
        return f"error: {res['error']}"
    lat, thr, fan = res["webhook_latency"], res["webhook_throughput"], res["cursor_stream_fanout"]

    def p(d: dict[str, Any]) -> str:
        return "/".join(f"{d.get(k, float('nan')):.1f}" for k in ("p50_ms", "p95_ms", "p99_ms"))

    rows = [
        (
            f"job create → job.completed webhook p50/p95/p99 ms (N={lat['jobs']}, C={lat['concurrency']})",
            p(lat["create_to_webhook"]),
        ),
        ("  lost", str(lat["lost"])),
        (f"webhook deliveries/s sustained (M={thr['jobs']}, C={thr['concurrency']})", f"{thr['deliveries_per_s']}"),
        ("  best / median whole second", f"{thr['best_second']} / {thr['median_second']}"),
        ("  jobs created/s", f"{thr['jobs_created_per_s']}"),
        (
            "  delivered / lost / bad signatures / duplicates",
            f"{thr['delivered']} / {thr['lost']} / {res['receiver']['bad_signatures']} / {res['receiver']['duplicates']}",
        ),
        (f"cursor stream, {fan['clients']} clients: first event p50/p95/p99 ms", p(fan["first_event"])),
        ("  → completed p50/p95/p99 ms", p(fan["completed_event"])),
        ("  completed spread over clients p50/p95/p99 ms", p(fan["completed_spread"])),
        ("  clients with the full stream", f"{fan['clients_with_full_stream']} / {fan['clients']}"),
        ("startup s", f"{res['startup_s']}"),
    ]
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a.ljust(width)}  {b}" for a, b in rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_jobs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300, help="jobs of the webhook-latency phase (default 300)")
    parser.add_argument("--latency-concurrency", type=int, default=10, help="their concurrency (default 10)")
    parser.add_argument("--burst", type=int, default=1000, help="jobs of the deliveries/s phase (default 1000)")
    parser.add_argument("--concurrency", type=int, default=50, help="its concurrency (default 50)")
    parser.add_argument("--sse-clients", type=int, default=200, help="cursor-stream clients on one job (default 200)")
    parser.add_argument("--keep-data", action="store_true", help="keep the temp dir (logs, data)")
    args = parser.parse_args(argv)
    if min(args.jobs, args.latency_concurrency, args.burst, args.concurrency, args.sse_clients) < 1:
        parser.error("every count must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(UTC)
    code = git_state()
    os.environ["KNEO_JOBS_MODEL_MAP"] = json.dumps(SLOW_MODEL)  # passed on to serve (only adds a model name)
    workdir = Path(tempfile.mkdtemp(prefix="kneo-bench-jobs-"))
    plat = Platform("one_process", workdir)
    res: dict[str, Any]
    try:
        print("[jobs] starting the platform …", file=sys.stderr, flush=True)
        plat.start()
        res = asyncio.run(measure(plat, args))
    except Exception as exc:
        res = {"error": _describe(exc)}
    finally:
        plat.stop()
    res["processes_stopped"] = {
        "exit_codes": {n: c.exit_code for n, c in plat.children.items()},
        "notes": plat.stop_notes,
    }
    bad = failed(res)
    if bad:
        res["logs_tail"] = plat.tails()
        print(f"[jobs] FAILED; logs:\n{res['logs_tail']}", file=sys.stderr)
    if bad or args.keep_data or plat.stop_notes:
        print(f"[jobs] logs and data kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    record: dict[str, Any] = {
        "ts": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "git": code,
        "params": {**vars(args), "warmup": WARMUP_JOBS, "env": env_overrides(), "slow_model": SLOW_MODEL},
        "results": {"one_process": res},
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, default=str) + "\n"
    path = RESULTS_DIR / f"jobs-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(text)
    (RESULTS_DIR / "latest-jobs.json").write_text(text)
    m = record["machine"]
    print(f"\nKneo jobs benchmark, {record['ts']}, {m['cpus']} CPUs, Python {m['python']}\n")
    print(table(res))
    print(f"\nwritten: {path.relative_to(ROOT)} and {(RESULTS_DIR / 'latest-jobs.json').relative_to(ROOT)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
