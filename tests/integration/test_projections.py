"""Projections are derived data: rebuilding them from the log gives exactly the live tables."""

from __future__ import annotations

from typing import Any

from kneo_client.sdk import AsyncServiceClient
from kneo_events.projections import fold_run, rebuild_runs

SPEC = """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 2}}}
workflow: {name: w, kind: sequential, steps: [{id: one}, {id: two}]}
"""
BAD = "version: v1\nagent: {name: a}\nworkflow: {name: w, steps: [{id: x}, {id: x}]}\n"
# step two fails once (no retries): the run fails, and its continuation (attempt 2) succeeds
FAILS_ONCE = """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 2}}}
components:
  agents:
    wobbly: {name: wobbly, model: {provider: dummy, params: {chunks: 2, fail_attempts: 1}}}
workflow: {name: w, kind: sequential, steps: [{id: one}, {id: two, ref: wobbly}, {id: three}]}
"""


async def _snapshot(store: Any) -> tuple[list[Any], list[Any]]:
    runs = await store.pool.fetch("SELECT * FROM runs ORDER BY run_id")
    plans = await store.pool.fetch("SELECT * FROM run_plans ORDER BY run_id")
    return [dict(r) for r in runs], [dict(r) for r in plans]


async def test_rebuild_equals_live_projection(platform: Any) -> None:
    store = platform.kernel.store
    async with AsyncServiceClient(platform.url) as client:
        for i in range(5):
            first = await client.create_run(input=str(i), spec=SPEC)
        await client.create_run(input="bad", spec=BAD)
        failed = await client.create_run(input="f", spec=FAILS_ONCE)
        assert failed["status"] == "failed"
        continued = await client.continue_run(failed["run_id"])
        forked = await client.fork_run(first["run_id"], 1)
        assert continued["status"] == forked["status"] == "succeeded"
        assert continued["metadata"]["continued_from"]["run_id"] == failed["run_id"]
        assert forked["metadata"]["forked_from"]["sequence"] == 1
    live = await _snapshot(store)
    assert len(live[0]) == 9 and len(live[1]) == 8
    async with store.pool.acquire() as conn:
        assert await rebuild_runs(conn) == 9
    assert await _snapshot(store) == live
    # and the projection is exactly the fold of each stream
    for row in live[0]:
        events = await store.read_stream(f"run-{row['run_id']}")
        assert fold_run(None, events) == row["state"]
