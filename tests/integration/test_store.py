"""The event store contract on a real PostgreSQL: append, read, conflicts, idempotency, gap-free catch-up."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from kneo_events.errors import ConcurrencyConflict
from kneo_events.projections import fold_run
from kneo_events.schemas import NewEvent, RunCreated, RunSucceeded, new_event
from kneo_events.store import START, EventStore, Position


def ev(i: int, etype: str = "thing.happened") -> NewEvent:
    return NewEvent(type=etype, data={"i": i}, metadata={"request_id": "r"})


async def test_append_and_read_stream(store: EventStore) -> None:
    res = await store.append("thing-a", [ev(1), ev(2)], expected_version=0)
    assert [e.version for e in res.events] == [1, 2]
    assert res.version == 2 and not res.duplicate
    res2 = await store.append("thing-a", [ev(3)], expected_version=2)
    assert res2.version == 3
    read = await store.read_stream("thing-a")
    assert [e.data["i"] for e in read] == [1, 2, 3]
    assert [e.version for e in await store.read_stream("thing-a", from_version=2)] == [2, 3]
    assert read[0].metadata == {"request_id": "r"}
    assert await store.stream_version("thing-a") == 3
    assert await store.stream_version("thing-missing") == 0


async def test_wrong_expected_version_conflicts_and_changes_nothing(store: EventStore) -> None:
    await store.append("thing-b", [ev(1)], expected_version=0)
    with pytest.raises(ConcurrencyConflict) as too_low:
        await store.append("thing-b", [ev(2)], expected_version=0)
    assert too_low.value.retryable and too_low.value.code == "resource_locked"
    with pytest.raises(ConcurrencyConflict):
        await store.append("thing-b", [ev(2)], expected_version=5)  # would leave a gap
    assert [e.data["i"] for e in await store.read_stream("thing-b")] == [1]


async def test_concurrent_appends_at_same_version_one_wins(store: EventStore) -> None:
    await store.append("thing-c", [ev(0)], expected_version=0)
    results = await asyncio.gather(
        *(store.append("thing-c", [ev(i)], expected_version=1) for i in range(1, 9)), return_exceptions=True
    )
    wins = [r for r in results if not isinstance(r, BaseException)]
    conflicts = [r for r in results if isinstance(r, ConcurrencyConflict)]
    assert len(wins) == 1 and len(conflicts) == 7
    assert len(await store.read_stream("thing-c")) == 2


async def test_append_is_idempotent_per_command(store: EventStore) -> None:
    first = await store.append("thing-d", [ev(1), ev(2)], expected_version=0, command_id="cmd-1")
    again = await store.append("thing-d", [ev(1), ev(2)], expected_version=0, command_id="cmd-1")
    assert again.duplicate
    assert [e.event_id for e in again.events] == [e.event_id for e in first.events]
    assert len(await store.read_stream("thing-d")) == 2
    # concurrent duplicates of a new command: exactly one append
    results = await asyncio.gather(
        *(store.append("thing-d", [ev(3)], expected_version=None, command_id="cmd-2") for _ in range(6))
    )
    assert sum(not r.duplicate for r in results) == 1
    assert len(await store.read_stream("thing-d")) == 3


async def test_failed_append_does_not_consume_the_command_id(store: EventStore) -> None:
    await store.append("thing-e", [ev(1)], expected_version=0)
    with pytest.raises(ConcurrencyConflict):
        await store.append("thing-e", [ev(2)], expected_version=0, command_id="cmd-x")
    res = await store.append("thing-e", [ev(2)], expected_version=1, command_id="cmd-x")
    assert not res.duplicate and res.version == 2


async def test_inline_run_projection_is_in_the_same_transaction(store: EventStore) -> None:
    created = RunCreated(run_id="r1", input="hi", spec={"workflow": {"name": "wf"}, "agent": {"name": "a"}})
    await store.append("run-r1", [new_event(created)], expected_version=0)
    state = await store.get_run("r1")
    assert state is not None and state["status"] == "queued" and state["workflow_name"] == "wf"
    await store.append("run-r1", [new_event(RunSucceeded(output_text="done"))], expected_version=1)
    state = await store.get_run("r1")
    assert state is not None and state["status"] == "succeeded" and state["output_text"] == "done"
    assert state == fold_run(None, await store.read_stream("run-r1"))


async def test_migrations_recorded_and_idempotent(store: EventStore) -> None:
    assert await store.migrate() == []
    versions = [r["version"] for r in await store.pool.fetch("SELECT version FROM schema_migrations")]
    assert "001_event_store" in versions


async def test_read_all_follows_global_order(store: EventStore) -> None:
    for s in ("x-1", "x-2", "x-3"):
        await store.append(s, [ev(1), ev(2)], expected_version=0)
    seen = []
    pos = START
    while batch := await store.read_all(pos, limit=2):
        seen.extend(batch)
        pos = Position(batch[-1].tx_id, batch[-1].position)
    assert [(e.stream_id, e.version) for e in seen] == [
        ("x-1", 1),
        ("x-1", 2),
        ("x-2", 1),
        ("x-2", 2),
        ("x-3", 1),
        ("x-3", 2),
    ]
    assert Position.decode(pos.encode()) == pos


async def test_read_all_never_skips_a_late_commit(store: EventStore) -> None:
    """A writer that took its position early but commits late is still seen, after what came before."""
    slow = await store.pool.acquire()
    try:
        tx = slow.transaction()
        await tx.start()
        await store._append_in_tx(slow, "late-1", [ev(1)], 0, None)  # holds position p, not committed
        await store.append("fast-1", [ev(2)], expected_version=0)  # position p+1, committed
        seen = await store.read_all(START)
        # the fast event must not be handed out yet: doing so would let a reader advance past the slow one
        assert [e.stream_id for e in seen] == []
        await tx.commit()
    finally:
        await store.pool.release(slow)
    seen = await store.read_all(START)
    assert sorted(e.stream_id for e in seen) == ["fast-1", "late-1"]


@hsettings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(plan=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3), st.floats(0, 0.01)), min_size=4, max_size=24))
async def test_catch_up_reader_sees_every_event_once_under_concurrent_writers(store: EventStore, plan) -> None:
    """Property: a reader following read_all while writers commit concurrently sees each event exactly once."""
    tag = uuid.uuid4().hex[:8]
    start = await _tail(store)
    appended: list[uuid.UUID] = []

    async def writer(i: int, stream_no: int, n: int, pause: float) -> None:
        events = [ev(k) for k in range(n)]
        async with store.pool.acquire() as conn, conn.transaction():
            await store._append_in_tx(conn, f"p{tag}-{stream_no}-{i}", events, 0, None)
            await asyncio.sleep(pause)  # hold the transaction open: commits land out of position order
        appended.extend(e.event_id for e in events)

    seen: list[uuid.UUID] = []
    done = asyncio.Event()

    async def reader() -> None:
        pos = start
        while True:
            finished = done.is_set()
            batch = await store.read_all(pos, limit=5)
            seen.extend(e.event_id for e in batch if e.stream_id.startswith(f"p{tag}"))
            if batch:
                pos = Position(batch[-1].tx_id, batch[-1].position)
            elif finished:
                return
            else:
                await asyncio.sleep(0.001)

    r = asyncio.create_task(reader())
    await asyncio.gather(*(writer(i, s, n, p) for i, (s, n, p) in enumerate(plan)))
    done.set()
    await asyncio.wait_for(r, timeout=30)
    assert len(seen) == len(set(seen)), "an event was delivered twice"
    assert set(seen) == set(appended), "an event was skipped"


async def _tail(store: EventStore) -> Position:
    pos = START
    while batch := await store.read_all(pos, limit=1000):
        pos = Position(batch[-1].tx_id, batch[-1].position)
    return pos


async def test_one_round_trip_run_append_matches_the_generic_path(store: EventStore) -> None:
    created = new_event(RunCreated(run_id="r2", input="hi", spec={"workflow": {"name": "wf"}, "agent": {"name": "a"}}))
    res = await store.append("run-r2", [created], 0, prior_state=None)
    assert res.version == 1 and res.outbox_id is not None and res.events[0].position > 0
    state = await store.get_run("r2")
    assert state == fold_run(None, await store.read_stream("run-r2"))
    done = [new_event(RunSucceeded(output_text="ok"))]
    with pytest.raises(ConcurrencyConflict):
        await store.append("run-r2", done, 0, "c-1", prior_state=None)  # stale base
    res2 = await store.append("run-r2", done, 1, "c-1", prior_state=state)
    again = await store.append("run-r2", done, 1, "c-1", prior_state=state)
    assert again.duplicate and [e.event_id for e in again.events] == [e.event_id for e in res2.events]
    events = await store.read_stream("run-r2")
    assert [e.type for e in events] == ["run.created", "run.succeeded"]
    assert await store.get_run("r2") == fold_run(None, events)
    current = await store.get_run("r2")
    racers = await asyncio.gather(
        *(store.append("run-r2", [ev(i, "x.y")], 2, prior_state=current) for i in range(5)),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in racers) == 1
    assert all(isinstance(r, ConcurrencyConflict) for r in racers if isinstance(r, BaseException))


async def test_appends_at_the_end_retry_a_lost_race(store: EventStore) -> None:
    results = await asyncio.gather(*(store.append("shared-1", [ev(i)], None) for i in range(30)))
    assert sorted(r.version for r in results) == list(range(1, 31))
