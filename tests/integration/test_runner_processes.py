"""Runners as separate processes: they share one durable queue, and a killed runner loses nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from typing import Any

import pytest

from kneo_client.sdk import AsyncServiceClient
from kneo_events.schemas import loads

pytestmark = pytest.mark.slow

SLOW_SPEC = """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 4, latency_ms: 25}}}
workflow: {name: w, kind: sequential, steps: [{id: one}, {id: two}, {id: three}]}
"""
CRASH_SPEC = """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 12, latency_ms: 250}}}
workflow: {name: w, kind: sequential, steps: [{id: first}, {id: second}]}
"""


async def _wait_consumers(kernel: Any, n: int, timeout: float = 30) -> None:
    """Wait until ``n`` runner processes are pulling (their pull requests are waiting)."""
    bus = kernel.bus
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        try:
            info = await bus.js.consumer_info(bus.names.commands, bus.consumer_name("runner"))
            if (info.num_waiting or 0) >= n:
                return
        except Exception:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"{n} runner processes did not start pulling")


async def _wait_terminal(store: Any, run_id: str, timeout: float = 90) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        state = await store.get_run(run_id)
        if state and state["status"] in ("succeeded", "failed", "cancelled"):
            return state
        await asyncio.sleep(0.1)
    raise AssertionError(f"run {run_id} did not finish")


async def test_two_runner_processes_share_one_queue(platform_factory: Any, spawn_service: Any) -> None:
    front = await platform_factory(("gateway", "compiler"))
    procs = [spawn_service("runner", KNEO_RUNNER_NAME=f"runner-{i}") for i in range(2)]
    await _wait_consumers(front.kernel, 2)
    async with AsyncServiceClient(front.url) as client:
        bodies = await asyncio.gather(*(client.create_run(input=str(i), spec=SLOW_SPEC) for i in range(24)))
    assert {b["status"] for b in bodies} == {"succeeded"}
    rows = await front.kernel.store.pool.fetch(
        "SELECT metadata->>'runner' AS runner, count(*) AS n FROM events WHERE type = 'step.completed' GROUP BY 1"
    )
    by_runner = {r["runner"]: r["n"] for r in rows}
    assert set(by_runner) == {"runner-0", "runner-1"}, by_runner
    assert sum(by_runner.values()) == 72
    assert all(p.poll() is None for p in procs)


async def test_kill_9_runner_mid_step_step_is_redelivered_and_not_duplicated(
    platform_factory: Any, spawn_service: Any
) -> None:
    front = await platform_factory(("gateway", "compiler"))
    env = {"KNEO_COMMAND_ACK_WAIT_SECONDS": "2"}
    victim = spawn_service("runner", KNEO_RUNNER_NAME="victim", **env)
    await _wait_consumers(front.kernel, 1)
    bus = front.kernel.bus
    chunks: list[dict[str, Any]] = []
    got_chunk = asyncio.Event()

    async def on_chunk(msg: Any) -> None:
        chunks.append(loads(msg.data))
        got_chunk.set()

    sub = await bus.subscribe_core("kneo.out.>", on_chunk)
    try:
        async with AsyncServiceClient(front.url) as client:
            run_id = (await client.create_run(input="crash", spec=CRASH_SPEC, async_mode=True))["run_id"]
        await asyncio.wait_for(got_chunk.wait(), timeout=30)  # the victim is mid-step, streaming
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)
        spawn_service("runner", KNEO_RUNNER_NAME="rescuer", **env)
        state = await _wait_terminal(front.kernel.store, run_id)
    finally:
        await sub.unsubscribe()  # type: ignore[attr-defined]
    assert state["status"] == "succeeded"
    events = await front.kernel.store.read_stream(f"run-{run_id}")
    completed = [e for e in events if e.type == "step.completed"]
    assert [e.data["step_id"] for e in completed] == ["first", "second"], "each step completed exactly once"
    assert {e.metadata["runner"] for e in completed} == {"rescuer"}
    # the redelivered step streamed again and says so (delivery > 1) so SSE clients can mark the restart
    assert any(c["step_id"] == "first" and c["delivery"] > 1 for c in chunks)
    assert victim.returncode == -signal.SIGKILL


async def test_runner_stops_cleanly_on_sigterm(platform_factory: Any, spawn_service: Any) -> None:
    front = await platform_factory(("gateway",))
    proc = spawn_service("runner")
    await _wait_consumers(front.kernel, 1)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 20) == 0
    assert proc.returncode == 0 and isinstance(proc, subprocess.Popen)


PARALLEL_SPEC = """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 10, latency_ms: 60}}}
workflow:
  name: fan
  kind: concurrent
  participants:
    - {id: left, kind: agent, prompt: "left {input}"}
    - {id: right, kind: agent, prompt: "right {input}"}
"""


async def test_concurrent_branches_run_on_two_processes_at_once(platform_factory: Any, spawn_service: Any) -> None:
    front = await platform_factory(("gateway", "compiler"))
    spawn_service("runner", KNEO_RUNNER_NAME="runner-a", KNEO_CONSUMER_CONCURRENCY="1")
    spawn_service("runner", KNEO_RUNNER_NAME="runner-b", KNEO_CONSUMER_CONCURRENCY="1")
    await _wait_consumers(front.kernel, 2)
    async with AsyncServiceClient(front.url) as client:
        body = await client.create_run(input="x", spec=PARALLEL_SPEC)
        events = (await client.run_events(body["run_id"]))["events"]
    assert body["status"] == "succeeded"
    done = [e for e in events if e["type"] == "step.completed"]
    assert {e["metadata"]["runner"] for e in done} == {"runner-a", "runner-b"}
    # both branches were in flight together: each took ~0.6 s and the whole fan-out took less than their sum
    compiled_at = next(e["recorded_at"] for e in events if e["type"] == "run.compiled")
    from datetime import datetime

    start = datetime.fromisoformat(compiled_at)
    finishes = [datetime.fromisoformat(e["recorded_at"]) for e in done]
    durations = [e["data"]["duration_ms"] / 1000 for e in done]
    assert (max(finishes) - start).total_seconds() < sum(durations) * 0.8


KIND_SPECS = {
    "graph": """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 8, latency_ms: 150}}}
workflow:
  name: g
  kind: graph
  start: first
  nodes: [{id: first, kind: agent, prompt: "one {input}"}, {id: second, kind: agent, prompt: "two {steps.first}"}]
  edges: [{from: first, to: second}]
""",
    "concurrent": """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 8, latency_ms: 150}}}
workflow:
  name: c
  kind: concurrent
  participants: [{id: first, kind: agent, prompt: "one {input}"}, {id: second, kind: agent, prompt: "two {input}"}]
""",
    "group_chat": """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 8, latency_ms: 150}}}
workflow:
  name: chat
  kind: group_chat
  rounds: 1
  participants: [{id: first, kind: agent}, {id: second, kind: agent}]
""",
}


@pytest.mark.parametrize("kind", sorted(KIND_SPECS))
async def test_kill_9_mid_step_for_every_workflow_kind(platform_factory: Any, spawn_service: Any, kind: str) -> None:
    front = await platform_factory(("gateway", "compiler"))
    env = {"KNEO_COMMAND_ACK_WAIT_SECONDS": "2"}
    victim = spawn_service("runner", KNEO_RUNNER_NAME="victim", **env)
    await _wait_consumers(front.kernel, 1)
    got_chunk = asyncio.Event()

    async def on_chunk(msg: Any) -> None:
        got_chunk.set()

    sub = await front.kernel.bus.subscribe_core("kneo.out.>", on_chunk)
    try:
        async with AsyncServiceClient(front.url) as client:
            run_id = (await client.create_run(input="crash", spec=KIND_SPECS[kind], async_mode=True))["run_id"]
        await asyncio.wait_for(got_chunk.wait(), timeout=30)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)
        spawn_service("runner", KNEO_RUNNER_NAME="rescuer", **env)
        state = await _wait_terminal(front.kernel.store, run_id)
    finally:
        await sub.unsubscribe()  # type: ignore[attr-defined]
    assert state["status"] == "succeeded", state
    events = await front.kernel.store.read_stream(f"run-{run_id}")
    completed = sorted(e.data["step_id"] for e in events if e.type == "step.completed")
    assert completed == ["first", "second"], "each step completed exactly once"
    assert sum(1 for e in events if e.type == "run.succeeded") == 1
