"""SSE details: heartbeats while idle, and a slow client that overflows its buffer catches up from the log."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import httpx

from kneo_client.sdk import AsyncServiceClient

SLOW = """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 2, latency_ms: 400}}}
workflow: {name: w, kind: sequential, steps: [{id: one}]}
"""
CHATTY = """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 60, latency_ms: 1}}}
workflow: {name: w, kind: sequential, steps: [{id: one}, {id: two}, {id: three}]}
"""


async def test_heartbeats_while_idle(platform_factory: Any) -> None:
    p = await platform_factory(sse_heartbeat_seconds=0.1)
    async with AsyncServiceClient(p.url) as client:
        run_id = (await client.create_run(input="x", spec=SLOW, async_mode=True))["run_id"]
        pings = 0
        async with client.http.stream("GET", f"/v1/runs/{run_id}/stream") as resp:
            async for line in resp.aiter_lines():
                if line.startswith(": ping"):
                    pings += 1
    assert pings >= 3


async def test_a_slow_client_does_not_block_and_catches_up_from_the_log(platform: Any) -> None:
    """Drive the server-side stream generator slowly (no socket buffer in between) with a 4-item buffer."""
    from kneo_gateway.live import LiveHub
    from kneo_gateway.routers.runs import _run_stream
    from kneo_gateway.state import Gateway

    hub = LiveHub(platform.kernel.bus, buffer=4)
    await hub.start()
    served: Gateway = platform.app_gateway
    gw = dataclasses.replace(served, hub=hub)
    try:
        async with AsyncServiceClient(platform.url) as client:
            run_id = (await client.create_run(input="x", spec=CHATTY, async_mode=True))["run_id"]
            events = []
            async for ev in _run_stream(gw, run_id, 0, -1):
                events.append(ev)
                await asyncio.sleep(0.01)  # a slow reader
            state = await client.get_run(run_id)
    finally:
        await hub.stop()
    assert state["status"] == "succeeded"
    ids = [int(e.id) for e in events if e.id and "." not in e.id]
    assert ids == list(range(1, 13)), "every event once, in order, despite the overflow"
    assert any(e.event == "lagged" for e in events)
    assert sum(1 for e in events if e.event == "output") < 3 * 61, "chunks were skipped, not queued without bound"


async def test_stream_of_finished_run_replays_history_and_closes(platform: Any) -> None:
    async with AsyncServiceClient(platform.url) as client:
        run_id = (await client.create_run(input="x", spec=SLOW.replace("400", "0")))["run_id"]
    async with httpx.AsyncClient(base_url=platform.url, timeout=10) as http:
        resp = await http.get(f"/v1/runs/{run_id}/stream")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    lines = resp.text.splitlines()
    assert lines[0] == "id: 1" or "event: run.created" in lines[:3]
    assert "event: run.succeeded" in lines


async def test_resuming_after_the_end_closes_at_once(platform: Any) -> None:
    async with AsyncServiceClient(platform.url) as client:
        run_id = (await client.create_run(input="x", spec=SLOW.replace("400", "0")))["run_id"]
        events = [e async for e in client.stream_run(run_id, last_event_id="12")]
        beyond = [e async for e in client.stream_run(run_id, last_event_id="40")]
    assert events == [] and beyond == []
