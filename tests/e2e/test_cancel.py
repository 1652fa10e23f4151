"""Cancellation: cooperative mid-step, final (never overwritten by a late completion), refused once finished."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import httpx

from kneo_client.sdk import AsyncServiceClient

SLOW = """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 40, latency_ms: 25}}}
workflow: {name: w, kind: sequential, steps: [{id: one}, {id: two}, {id: three}]}
"""
QUICK = SLOW.replace("chunks: 40, latency_ms: 25", "chunks: 3, latency_ms: 2")


async def _idle_runner(platform: Any) -> None:
    """Wait until every step command was handled (acked): nothing can still append to the run."""
    bus = platform.kernel.bus
    for _ in range(600):
        info = await bus.js.consumer_info(bus.names.commands, bus.consumer_name("runner"))
        if not info.num_ack_pending and not info.num_pending:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("runner still busy")


async def test_cancel_mid_step_stops_the_step_and_is_final(platform: Any) -> None:
    async with AsyncServiceClient(platform.url) as client:
        run_id = (await client.create_run(input="x", spec=SLOW, async_mode=True))["run_id"]
        chunks = 0
        async for ev in client.stream_run(run_id):
            if ev.event == "output":
                chunks += 1
                if chunks == 3:
                    resp = await client.http.post(f"/v1/runs/{run_id}/cancel", json={"reason": "changed my mind"})
                    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
            last = ev
        assert last.event == "run.cancelled" and last.json()["data"]["reason"] == "changed my mind"
        await _idle_runner(platform)
        events = (await client.run_events(run_id))["events"]
    types = [e["type"] for e in events]
    assert types[-1] == "run.cancelled"
    assert "step.completed" not in types, "the step in flight stopped and recorded nothing"
    assert chunks < 40


async def test_cancel_of_a_finished_run_is_refused_and_changes_nothing(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        run = (await http.post("/v1/runs", json={"input": "x", "spec": QUICK})).json()
        before = (await http.get(f"/v1/runs/{run['run_id']}/events")).json()["count"]
        resp = await http.post(f"/v1/runs/{run['run_id']}/cancel")
        assert resp.status_code == 409
        assert resp.json()["error"] == "invalid_state" and resp.json()["status"] == "succeeded"
        assert (await http.get(f"/v1/runs/{run['run_id']}/events")).json()["count"] == before
        assert (await http.post("/v1/runs/run_nope/cancel")).status_code == 404
        assert (await http.post(f"/runs/{run['run_id']}/cancel", json={"surprise": 1})).status_code == 422


async def test_cancels_racing_completions_never_lose_to_them(platform: Any) -> None:
    rng = random.Random(7)
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        runs = [
            (await http.post("/v1/runs", json={"input": str(i), "spec": QUICK, "async_mode": True})).json()
            for i in range(12)
        ]

        async def cancel_later(run_id: str) -> int:
            await asyncio.sleep(rng.uniform(0, 0.08))
            return (await http.post(f"/v1/runs/{run_id}/cancel")).status_code

        codes = await asyncio.gather(*(cancel_later(r["run_id"]) for r in runs))
        await _idle_runner(platform)
        for run, code in zip(runs, codes, strict=True):
            events = (await http.get(f"/v1/runs/{run['run_id']}/events")).json()["events"]
            types = [e["type"] for e in events]
            state = (await http.get(f"/v1/runs/{run['run_id']}")).json()
            if code == 200:
                assert state["status"] == "cancelled" and types[-1] == "run.cancelled", types
                assert "run.succeeded" not in types
            else:
                assert code == 409 and state["status"] == "succeeded" and "run.cancelled" not in types
    assert 200 in codes
