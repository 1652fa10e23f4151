"""The bus on a real NATS JetStream: streams, publish-after-commit + relay, reconciler, dead letters."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from nats.js import api

from kneo_events.bus import Bus
from kneo_events.kernel import Kernel
from kneo_events.schemas import Command, NewEvent
from kneo_events.settings import Settings
from kneo_events.store import EventStore

FAST_SPEC = """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 2}}}
workflow: {name: w, kind: sequential, steps: [{id: one}, {id: two}, {id: three}]}
"""


async def _stream_msgs(bus: Bus, name: str) -> int:
    return int((await bus.js.stream_info(name)).state.messages)


async def test_streams_are_declared_idempotently(bus: Bus) -> None:
    await bus.ensure_streams()
    await bus.ensure_streams()
    cmds = await bus.js.stream_info(bus.names.commands)
    assert cmds.config.retention == api.RetentionPolicy.WORK_QUEUE
    evts = await bus.js.stream_info(bus.names.events)
    assert evts.config.retention == api.RetentionPolicy.LIMITS and evts.config.duplicate_window == 120.0
    out = await bus.js.stream_info(bus.names.output)
    assert out.config.max_age == 300.0


async def test_relay_publishes_what_a_crash_left_unpublished_exactly_once(
    store: EventStore, bus: Bus, settings: Settings
) -> None:
    kernel = Kernel(settings=settings, store=store, bus=bus)
    # commit without publishing: the process "crashed" right after the transaction
    res = await store.append("order-1", [NewEvent(type="order.placed", data={"n": i}) for i in range(3)], 0)
    assert await _stream_msgs(bus, bus.names.events) == 0
    assert await kernel.relay_once(grace_seconds=60) == 0  # still inside the grace period: the fast path may come
    assert await kernel.relay_once(grace_seconds=0) == 3
    assert await _stream_msgs(bus, bus.names.events) == 3
    assert await store.pool.fetchval("SELECT count(*) FROM outbox") == 0
    # a late fast-path publish of the same events is de-duplicated by Nats-Msg-Id = event_id
    await bus.publish_events(res.events)
    assert await _stream_msgs(bus, bus.names.events) == 3
    # and consumers see each event once, in order, with the stored payload
    sub = await bus.js.subscribe(bus.subject("kneo.evt.order.>"), ordered_consumer=True)
    got = [await sub.next_msg(timeout=5) for _ in range(3)]
    await sub.unsubscribe()
    assert [m.headers["Nats-Msg-Id"] for m in got] == [str(e.event_id) for e in res.events]
    assert got[0].subject == bus.subject("kneo.evt.order.1.order.placed")


async def test_fast_path_publishes_and_clears_the_outbox(store: EventStore, bus: Bus, settings: Settings) -> None:
    kernel = Kernel(settings=settings, store=store, bus=bus)
    kernel.start(relay=False)
    try:
        await kernel.commit("order-2", [NewEvent(type="order.placed", data={})], 0)
        for _ in range(100):
            if await store.pool.fetchval("SELECT count(*) FROM outbox") == 0:
                break
            await asyncio.sleep(0.05)
        assert await store.pool.fetchval("SELECT count(*) FROM outbox") == 0
        assert await _stream_msgs(bus, bus.names.events) == 1
    finally:
        await kernel.stop()


async def _wait_status(store: EventStore, run_id: str, statuses: set[str], timeout: float = 60) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        state = await store.get_run(run_id)
        if state and state["status"] in statuses:
            return state
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"run {run_id} stuck in {state and state['status']}")
        await asyncio.sleep(0.05)


async def test_a_lost_command_delays_a_run_but_never_strands_it(platform_factory: Any) -> None:
    from kneo_client.sdk import AsyncServiceClient

    front = await platform_factory(("gateway", "compiler"))
    store = front.kernel.store
    async with AsyncServiceClient(front.url) as client:
        run_id = (await client.create_run(input="x", spec=FAST_SPEC, async_mode=True))["run_id"]
    for _ in range(200):  # compiled, first step scheduled, its command waiting in the queue
        state = await store.get_run(run_id)
        if state and state.get("next_step"):
            break
        await asyncio.sleep(0.02)
    bus = front.kernel.bus
    for _ in range(100):
        if await _stream_msgs(bus, bus.names.commands) == 1:
            break
        await asyncio.sleep(0.02)
    assert await _stream_msgs(bus, bus.names.commands) == 1
    await bus.js.purge_stream(bus.names.commands)  # the pending command is lost
    assert await _stream_msgs(bus, bus.names.commands) == 0
    await platform_factory(("runner",), reconcile_after_seconds=0.5, reconcile_interval_seconds=0.2)
    final = await _wait_status(store, run_id, {"succeeded", "failed"})
    assert final["status"] == "succeeded"
    completed = await store.pool.fetchval(
        "SELECT count(*) FROM events WHERE stream_id = $1 AND type = 'step.completed'", f"run-{run_id}"
    )
    assert completed == 3


async def test_a_poison_command_is_dead_lettered_and_the_queue_moves_on(platform_factory: Any) -> None:
    from kneo_client.sdk import AsyncServiceClient

    p = await platform_factory(command_max_deliveries=3, command_retry_backoff_seconds=0.05)
    poison = Command(
        command_id="poison-1",
        service="runner",
        name="execute_step",
        stream_id="run-ghost",
        data={"run_id": "ghost", "step_index": 0},
    )
    await p.kernel.bus.publish_command(poison)
    async with AsyncServiceClient(p.url) as client:
        body = await client.create_run(input="x", spec=FAST_SPEC)
    assert body["status"] == "succeeded"
    for _ in range(200):
        rows = await p.kernel.store.read_stream("deadletter-poison-1")
        if rows:
            break
        await asyncio.sleep(0.05)
    assert [e.type for e in rows] == ["command.dead_lettered"]
    assert rows[0].data["command_id"] == "poison-1" and rows[0].data["deliveries"] == 3
    assert "not found" in rows[0].data["error"]
    assert await p.kernel.store.get_run("ghost") is None, "a dead letter never creates a phantom run"


@pytest.mark.parametrize("bad", [b"not json", b'{"command_id": 1}'])
async def test_malformed_commands_are_dropped_not_retried(platform_factory: Any, bad: bytes) -> None:
    p = await platform_factory()
    bus = p.kernel.bus
    await bus.js.publish(bus.subject("kneo.cmd.runner.execute_step"), bad, stream=bus.names.commands)
    for _ in range(100):
        if await _stream_msgs(bus, bus.names.commands) == 0:
            break
        await asyncio.sleep(0.05)
    assert await _stream_msgs(bus, bus.names.commands) == 0
