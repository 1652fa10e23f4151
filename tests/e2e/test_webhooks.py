"""Signed webhooks end to end: registration, signed delivery of job endings, retries, give-up, delete, SSRF, crash.

A local receiver (a raw ASGI app under uvicorn on a free 127.0.0.1 port) records every request and answers what the
test scripts. Jobs are runs of face "jobs": until the /jobs routes exist the tests write a job's run events with the
store (``run.created`` with ``face: "jobs"`` and ``metadata.job``, then its terminal event), which is exactly what the
webhooks service follows.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from pydantic import SecretStr

from kneo_events.ids import new_run_id
from kneo_events.jobs import new_job_id
from kneo_events.schemas import RunCancelled, RunCreated, RunFailed, RunSucceeded, new_event

WEBHOOK_SECRET = "your_webhook_secret"
KEY = base64.b64encode(secrets.token_bytes(32)).decode()
KEYS = "alice:alice-token:admin;viewer:view-token:viewer;op:op-token:operator"


# --- the seed's receiver code (seeds/000 "Webhooks for Async Updates"), exactly as it is written there
# fmt: off
def verify_signature(payload, signature):  # type: ignore[no-untyped-def]
    computed = hmac.new(
        WEBHOOK_SECRET.encode(),
        payload,
        hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(f"sha256={computed}", signature)
# fmt: on
# ---


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """Records requests; answers the scripted statuses in order, then ``default``; ``"hang"`` never answers."""

    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    script: list[int | str] = field(default_factory=list)
    default: int | str = 200
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.seen.append(Seen(scope["path"], headers, body, time.monotonic()))
        answer = self.script.pop(0) if self.script else self.default
        if answer == "hang":
            await self.release.wait()
            answer = 200
        await send(
            {"type": "http.response.start", "status": int(answer), "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": f"status {answer}".encode()})


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def,override]
        yield


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    server = _Server(uvicorn.Config(rec, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and not task.done(), "receiver did not start"
        await asyncio.sleep(0.01)
    rec.url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    try:
        yield rec
    finally:
        rec.release.set()
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)


async def until(check: Callable[[], Awaitable[Any]], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def _fast(tmp_path: Path, **more: Any) -> dict[str, Any]:
    return {
        "webhooks_allow_private": True,
        "webhooks_secret_key": SecretStr(KEY),
        "webhooks_backoff_base_seconds": 0.3,
        "webhooks_backoff_max_seconds": 2.0,
        "webhooks_max_attempts": 3,
        "webhooks_timeout_seconds": 3.0,
        "webhooks_poll_interval_seconds": 0.2,
        "data_dir": tmp_path,
        **more,
    }


def _h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def end_run(kernel: Any, outcome: str = "succeeded", *, job: bool = True) -> str:
    """Append a run's creation and its terminal event in one commit (a job when ``job``)."""
    run_id = new_job_id() if job else new_run_id()
    meta = {"job": {"job_type": "cursor_task", "spec": {"prompt": "Run all tests"}, "sandbox_id": "sbx_1"}}
    created = RunCreated(
        run_id=run_id, spec={"version": "v1"}, face="jobs" if job else "kneo", metadata=meta if job else {}
    )
    end = {
        "succeeded": RunSucceeded(output_text="done"),
        "failed": RunFailed(error="boom"),
        "cancelled": RunCancelled(),
    }
    await kernel.commit(f"run-{run_id}", [new_event(created), new_event(end[outcome])], 0)
    return run_id


async def register(http: httpx.AsyncClient, url: str, events: list[str], **headers: str) -> dict[str, Any]:
    r = await http.post("/webhooks", json={"url": url, "events": events, "secret": WEBHOOK_SECRET}, headers=headers)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def deliveries(http: httpx.AsyncClient, webhook_id: str) -> list[dict[str, Any]]:
    r = await http.get(f"/webhooks/{webhook_id}/deliveries")
    assert r.status_code == 200, r.text
    return list(r.json()["data"])


def _settled(status: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda ds: bool(ds) and all(d["status"] == status for d in ds)


async def settled(http: httpx.AsyncClient, webhook_id: str, status: str, n: int = 1) -> list[dict[str, Any]]:
    async def check() -> list[dict[str, Any]] | None:
        ds = await deliveries(http, webhook_id)
        return ds if len(ds) == n and all(d["status"] == status for d in ds) else None

    result: list[dict[str, Any]] = await until(check, what=f"{n} deliveries {status}")
    return result


# ----------------------------------------------------------------------------- registration


async def test_register_list_delete_in_the_jobs_envelope_and_the_secret_never_comes_back(
    platform_factory: Any, tmp_path: Path
) -> None:
    p = await platform_factory(("gateway",), api_keys=SecretStr(KEYS), **_fast(tmp_path))
    async with httpx.AsyncClient(base_url=p.url, timeout=30, headers=_h("alice-token")) as http:
        created = await http.post(
            "/webhooks",
            json={
                "url": "https://hooks.example.com/knify",
                "events": ["job.completed", "job.failed"],
                "secret": WEBHOOK_SECRET,
            },
        )
        assert created.status_code == 201, created.text
        body = created.json()
        assert set(body) == {"id", "url", "events", "created_at"}
        assert body["url"] == "https://hooks.example.com/knify" and body["events"] == ["job.completed", "job.failed"]
        assert WEBHOOK_SECRET not in created.text
        wid = body["id"]

        listed = await http.get("/webhooks")
        assert listed.status_code == 200
        assert [w["id"] for w in listed.json()["data"]] == [wid] and WEBHOOK_SECRET not in listed.text
        assert listed.json()["pagination"] == {"page": 1, "limit": 100, "total": 1, "pages": 1}
        one = await http.get(f"/webhooks/{wid}")
        assert one.json() == body
        assert (await http.get("/v1/webhooks")).json()["data"][0]["id"] == wid  # the /v1 alias

        # the log holds the secret sealed, never in plain text (events are read by audit, APIs and the bus)
        pool = p.kernel.store.pool
        logged = await pool.fetch("SELECT type, data::text AS data FROM events WHERE stream_id = $1", f"webhook-{wid}")
        assert [r["type"] for r in logged] == ["webhook.registered"]
        assert WEBHOOK_SECRET not in logged[0]["data"] and '"alg": "A256GCM"' in logged[0]["data"]
        assert WEBHOOK_SECRET not in str(await pool.fetchval("SELECT secret::text FROM webhooks"))

        bad = [
            (
                {"url": "ftp://x.example.com/", "events": ["job.completed"], "secret": WEBHOOK_SECRET},
                "http:// or https://",
            ),
            (
                {"url": "https://u:p@x.example.com/", "events": ["job.completed"], "secret": WEBHOOK_SECRET},
                "credentials",
            ),
            (
                {"url": "https://x.example.com/", "events": ["job.exploded"], "secret": WEBHOOK_SECRET},
                "unknown event types",
            ),
            ({"url": "https://x.example.com/", "events": [], "secret": WEBHOOK_SECRET}, "Invalid request"),
            ({"url": "https://x.example.com/", "events": ["job.completed"], "secret": "short"}, "Invalid request"),
            ({"url": "https://x.example.com/", "events": ["job.completed"], "secret": "s" * 257}, "Invalid request"),
            ({"url": "https://x.example.com/", "events": ["job.completed"]}, "Invalid request"),
        ]
        for payload, needle in bad:
            r = await http.post("/webhooks", json=payload)
            assert r.status_code == 400, (payload, r.text)
            err = r.json()
            assert set(err) == {"error", "detail", "code"} and err["code"] == "BAD_REQUEST", err
            assert needle in err["error"], err
            assert WEBHOOK_SECRET not in r.text and "s" * 257 not in r.text
        unknown = (await http.post("/webhooks", json=bad[2][0])).json()
        assert unknown["detail"]["known"][:3] == ["job.completed", "job.failed", "job.cancelled"]

        anon = await http.post("/webhooks", json=bad[0][0], headers={"Authorization": ""})
        assert (
            anon.status_code == 401
            and anon.json()["code"] == "UNAUTHORIZED"
            and set(anon.json()) == {"error", "detail", "code"}
        )
        viewer = await http.get("/webhooks", headers=_h("view-token"))
        assert viewer.status_code == 403 and viewer.json()["code"] == "FORBIDDEN"
        assert (await http.get("/webhooks", headers=_h("op-token"))).status_code == 200

        gone = await http.delete(f"/webhooks/{wid}")
        assert gone.status_code == 200 and gone.json()["deleted"] is True
        assert (await http.get("/webhooks")).json()["data"] == []
        again = await http.delete(f"/webhooks/{wid}")
        assert again.status_code == 404 and again.json()["code"] == "NOT_FOUND"
        assert (await http.get("/webhooks/wh_nope/deliveries")).status_code == 404
        types = await pool.fetch("SELECT type FROM events WHERE stream_id = $1 ORDER BY version", f"webhook-{wid}")
        assert [r["type"] for r in types] == ["webhook.registered", "webhook.deleted"]
    # the projection rebuilds from the log identically
    from kneo_events.projections import rebuild_webhooks

    before = [dict(r) for r in await pool.fetch("SELECT * FROM webhooks ORDER BY webhook_id")]
    async with pool.acquire() as conn:
        assert await rebuild_webhooks(conn) == 1
    assert [dict(r) for r in await pool.fetch("SELECT * FROM webhooks ORDER BY webhook_id")] == before


# ----------------------------------------------------------------------------- delivery


async def test_a_finished_job_is_delivered_signed_as_the_seeds_verify_signature_expects(
    platform_factory: Any, receiver: Receiver, tmp_path: Path
) -> None:
    p = await platform_factory(("gateway", "webhooks"), **_fast(tmp_path))
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        hook = await register(http, f"{receiver.url}/webhooks/knify", ["job.completed", "job.failed"])
        runs = await register(http, f"{receiver.url}/runs", ["run.succeeded"])
        job_id = await end_run(p.kernel, "succeeded")
        failed_id = await end_run(p.kernel, "failed")
        await end_run(p.kernel, "cancelled")  # job.cancelled: not subscribed
        plain = await end_run(p.kernel, "succeeded", job=False)  # a Kneo-face run: run.* only

        ds = await settled(http, hook["id"], "succeeded", n=2)
        run_ds = await settled(http, runs["id"], "succeeded", n=2)  # the job's run.succeeded and the plain run's
        to_hook = [s for s in receiver.seen if s.path == "/webhooks/knify"]
        assert len(to_hook) == 2
        for seen in to_hook:
            assert verify_signature(seen.body, seen.headers["x-knify-signature"])
            assert not verify_signature(seen.body + b" ", seen.headers["x-knify-signature"])
            assert abs(int(seen.headers["x-knify-timestamp"]) - time.time()) < 60
            assert seen.headers["content-type"] == "application/json"
        events = {json.loads(s.body)["type"]: (json.loads(s.body), s.headers) for s in to_hook}
        done, headers = events["job.completed"]
        assert done["job_id"] == job_id and done["status"] == "completed"
        assert done["job"]["id"] == job_id and done["job"]["job_type"] == "cursor_task"
        assert done["job"]["spec"] == {"prompt": "Run all tests"} and done["job"]["sandbox_id"] == "sbx_1"
        assert done["job"]["completed_at"] and done["job"]["status"] == "completed"
        by_id = {d["id"]: d for d in ds}
        assert headers["x-knify-delivery"] == done["delivery_id"] and done["delivery_id"] in by_id
        assert by_id[done["delivery_id"]]["job_id"] == job_id
        assert headers["x-knify-event"] == "job.completed"
        assert events["job.failed"][0]["job_id"] == failed_id and events["job.failed"][0]["status"] == "failed"
        assert events["job.failed"][0]["job"]["error"] == "boom"
        for d in ds:
            assert d["attempt_count"] == 1 and [a["status_code"] for a in d["attempts"]] == [200]
            assert d["attempts"][0]["error"] is None and d["completed_at"]
        run_bodies = [json.loads(s.body) for s in receiver.seen if s.path == "/runs"]
        assert sorted(b["run_id"] for b in run_bodies) == sorted([job_id, plain])
        assert {b["status"] for b in run_bodies} == {"succeeded"} and {d["event_type"] for d in run_ds} == {
            "run.succeeded"
        }
        assert len(receiver.seen) == 4  # nothing for job.cancelled, no job.* for the plain run


async def test_a_failing_receiver_is_retried_with_backoff_until_it_answers(
    platform_factory: Any, receiver: Receiver, tmp_path: Path
) -> None:
    p = await platform_factory(("gateway", "webhooks"), **_fast(tmp_path))
    receiver.script = [500, 502]
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        hook = await register(http, f"{receiver.url}/in", ["job.completed"])
        await end_run(p.kernel)
        (d,) = await settled(http, hook["id"], "succeeded")
    assert [a["status_code"] for a in d["attempts"]] == [500, 502, 200]
    assert [a["error"] for a in d["attempts"]] == ["HTTP 500", "HTTP 502", None]
    assert d["attempt_count"] == 3 and d["failures"] == 2 and d["next_retry_at"] is None
    assert [a["response_excerpt"] for a in d["attempts"]] == ["status 500", "status 502", "status 200"]
    # every attempt sent the same body under the same delivery id, signed
    assert len({s.body for s in receiver.seen}) == 1 and {s.headers["x-knify-delivery"] for s in receiver.seen} == {
        d["id"]
    }
    assert all(verify_signature(s.body, s.headers["x-knify-signature"]) for s in receiver.seen)
    # backoff: each retry waited for its scheduled time; the waits grow (base 0.3 s, x2, jitter in [0.5, 1])
    a1, a2, a3 = d["attempts"]
    from datetime import datetime

    t = datetime.fromisoformat
    assert a1["next_retry_at"] and a2["next_retry_at"] and a3["next_retry_at"] is None
    assert t(a2["started_at"]) >= t(a1["next_retry_at"]) and t(a3["started_at"]) >= t(a2["next_retry_at"])
    wait1 = (t(a1["next_retry_at"]) - t(a1["finished_at"])).total_seconds()
    wait2 = (t(a2["next_retry_at"]) - t(a2["finished_at"])).total_seconds()
    assert 0.15 <= wait1 <= 0.31 and 0.3 <= wait2 <= 0.61, (wait1, wait2)
    gaps = [b.at - a.at for a, b in zip(receiver.seen, receiver.seen[1:], strict=False)]
    assert gaps[0] >= 0.15 and gaps[1] >= 0.3, gaps


async def test_a_receiver_that_always_fails_is_given_up_at_the_max_attempts(
    platform_factory: Any, receiver: Receiver, tmp_path: Path
) -> None:
    p = await platform_factory(("gateway", "webhooks"), **_fast(tmp_path, webhooks_max_attempts=3))
    receiver.default = 503
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        hook = await register(http, f"{receiver.url}/in", ["job.failed"])
        await end_run(p.kernel, "failed")
        (d,) = await settled(http, hook["id"], "failed")
    assert [a["status_code"] for a in d["attempts"]] == [503, 503, 503]
    assert d["failures"] == 3 and d["next_retry_at"] is None and d["attempts"][-1]["next_retry_at"] is None
    assert d["last_error"] == "HTTP 503" and len(receiver.seen) == 3
    pending = await p.kernel.store.pool.fetchval("SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'")
    assert pending == 0  # nothing is left to send


async def test_delete_stops_deliveries(platform_factory: Any, receiver: Receiver, tmp_path: Path) -> None:
    p = await platform_factory(("gateway", "webhooks"), **_fast(tmp_path, webhooks_backoff_base_seconds=1.5))
    receiver.default = 500
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        hook = await register(http, f"{receiver.url}/doomed", ["job.completed"])
        await end_run(p.kernel)

        async def failed_once() -> Any:
            ds = await deliveries(http, hook["id"])
            return ds and ds[0]["failures"] == 1 and ds[0]["status"] == "pending"

        await until(failed_once, what="a first failed attempt")
        assert (await http.delete(f"/webhooks/{hook['id']}")).status_code == 200
        (d,) = await settled(http, hook["id"], "cancelled")
        assert d["last_error"] == "webhook deleted" and d["attempt_count"] == 1
        # a later job: the deleted webhook gets no delivery, a live one does (so the service did look at it)
        receiver.default = 200
        other = await register(http, f"{receiver.url}/alive", ["job.completed"])
        await end_run(p.kernel)
        await settled(http, other["id"], "succeeded")
        assert len(await deliveries(http, hook["id"])) == 1
    assert [s.path for s in receiver.seen] == ["/doomed", "/alive"]


async def test_private_targets_are_refused_after_dns_resolution(
    platform_factory: Any, receiver: Receiver, tmp_path: Path
) -> None:
    p = await platform_factory(("gateway", "webhooks"), **_fast(tmp_path, webhooks_allow_private=False))
    port = receiver.url.rsplit(":", 1)[1]
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        for literal in (f"http://127.0.0.1:{port}/in", f"http://[::1]:{port}/in", "http://169.254.169.254/latest"):
            r = await http.post(
                "/webhooks", json={"url": literal, "events": ["job.completed"], "secret": WEBHOOK_SECRET}
            )
            assert r.status_code == 400 and "KNEO_WEBHOOKS_ALLOW_PRIVATE" in r.json()["error"], r.text
        # a name is judged after resolution, on every attempt: localhost resolves to loopback
        hook = await register(http, f"http://localhost:{port}/in", ["job.completed"])
        await end_run(p.kernel)
        (d,) = await settled(http, hook["id"], "failed")
    (attempt,) = d["attempts"]
    assert attempt["status_code"] is None
    assert "refused: localhost resolves to" in attempt["error"] and "loopback" in attempt["error"], attempt
    assert "KNEO_WEBHOOKS_ALLOW_PRIVATE=true" in attempt["error"]
    assert receiver.seen == []


# ----------------------------------------------------------------------------- crash safety


async def test_a_crash_mid_delivery_loses_nothing_and_resends_the_same_delivery(
    platform_factory: Any, receiver: Receiver, spawn_service: Any, tmp_path: Path
) -> None:
    fast = _fast(tmp_path, webhooks_timeout_seconds=2.0)
    gateway = await platform_factory(("gateway",), **fast)
    receiver.script = ["hang"]  # the first attempt reaches the receiver and never gets an answer
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        hook = await register(http, f"{receiver.url}/in", ["job.completed"])
        job_id = await end_run(gateway.kernel)
        proc = spawn_service(
            "webhooks",
            KNEO_WEBHOOKS_ALLOW_PRIVATE="true",
            KNEO_WEBHOOKS_SECRET_KEY=KEY,
            KNEO_WEBHOOKS_TIMEOUT_SECONDS="2",
            KNEO_WEBHOOKS_POLL_INTERVAL_SECONDS="0.2",
            KNEO_DATA_DIR=str(tmp_path),
        )

        async def arrived() -> bool:
            assert proc.poll() is None, "the webhooks service exited"
            return bool(receiver.seen)

        await until(arrived, timeout=60, what="the first attempt at the receiver")
        os.kill(proc.pid, signal.SIGKILL)  # mid-attempt: the intent and the started attempt are recorded
        proc.wait(timeout=10)
        (d,) = await deliveries(http, hook["id"])
        assert d["status"] == "pending" and d["attempt_count"] == 1
        assert d["attempts"][0]["finished_at"] is None  # in flight when the process died

        await platform_factory(("webhooks",), **fast)  # a new copy picks it up once the lease has run out
        (d,) = await settled(http, hook["id"], "succeeded")
    first, second = d["attempts"]
    assert first["error"].startswith("interrupted") and second["status_code"] == 200
    assert len(receiver.seen) == 2
    assert receiver.seen[0].headers["x-knify-delivery"] == receiver.seen[1].headers["x-knify-delivery"] == d["id"]
    assert receiver.seen[0].body == receiver.seen[1].body and json.loads(receiver.seen[1].body)["job_id"] == job_id
    assert verify_signature(receiver.seen[1].body, receiver.seen[1].headers["x-knify-signature"])


async def test_a_clean_stop_mid_attempt_records_the_interruption_and_frees_the_delivery_at_once(
    platform_factory: Any, receiver: Receiver, tmp_path: Path
) -> None:
    fast = _fast(tmp_path, webhooks_timeout_seconds=30.0)  # a lease far longer than the test: only the release helps
    gateway = await platform_factory(("gateway",), **fast)
    receiver.script = ["hang"]
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        hook = await register(http, f"{receiver.url}/in", ["job.completed"])
        await end_run(gateway.kernel)
        first = await platform_factory(("webhooks",), **fast)

        async def arrived() -> bool:
            return bool(receiver.seen)

        await until(arrived, what="the first attempt at the receiver")
        first.stop.set()

        async def released() -> Any:
            (d,) = await deliveries(http, hook["id"])
            return d if d["attempts"][0]["finished_at"] else None

        d = await until(released, what="the interrupted attempt recorded")
        assert d["status"] == "pending" and d["attempts"][0]["error"].startswith("interrupted: the webhooks service")
        await platform_factory(("webhooks",), **fast)
        (d,) = await settled(http, hook["id"], "succeeded", n=1)
    assert [a["status_code"] for a in d["attempts"]] == [None, 200]
    assert len({s.headers["x-knify-delivery"] for s in receiver.seen}) == 1 and len(receiver.seen) == 2
