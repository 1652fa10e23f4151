"""Delivery intents: the log's terminal run events → one ``webhook_deliveries`` row per subscribed webhook.

Like the audit projection, this follows the log itself (``read_all``'s gap-free order from a saved position) and
writes the rows and the new position in one transaction, so an intent is recorded exactly once however often the
service restarts or replays: the row's key is (webhook, source event, webhook event type) and inserts that meet an
existing row do nothing. One copy at a time advances it (an advisory lock the others skip).
"""

from __future__ import annotations

from typing import Any

from kneo_events.jobs import TERMINAL_JOB_EVENTS
from kneo_events.projections import TERMINAL_STATUSES, fold_run
from kneo_events.schemas import RecordedEvent
from kneo_events.store import START, Conn, EventStore, Position
from kneo_events.webhooks import delivery_body, delivery_id, webhook_types

CHECKPOINT = "webhooks"
_LOCK = 0x6B6E656F_77686B73  # "kneowhks"
RUN_TERMINAL_EVENTS = frozenset(TERMINAL_JOB_EVENTS)


async def _run_state_at(conn: Conn, stream_id: str, version: int) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The run's state just before and just after the event at ``version`` (folded from its stream)."""
    rows = await conn.fetch(
        "SELECT position, tx_id::text::bigint AS tx_id, stream_id, version, event_id, type, data, metadata, "
        "recorded_at FROM events WHERE stream_id = $1 AND version <= $2 ORDER BY version",
        stream_id,
        version,
    )
    events = [RecordedEvent.model_construct(**dict(r)) for r in rows]
    before = fold_run(None, events[:-1]) if len(events) > 1 else None
    return before, fold_run(before, events[-1:])


async def intents_for(conn: Conn, events: list[RecordedEvent]) -> int:
    """Record the deliveries that ``events`` call for. Returns rows inserted (existing ones are kept)."""
    ends = [ev for ev in events if ev.type in RUN_TERMINAL_EVENTS and ev.stream_id.startswith("run-")]
    if not ends:
        return 0
    hooks = await conn.fetch("SELECT webhook_id, events, created_at FROM webhooks WHERE status = 'active'")
    if not hooks:
        return 0
    inserted = 0
    for ev in ends:
        # A webhook hears of what happened after it was registered, not of the past it was registered into.
        listening = [h for h in hooks if h["created_at"] <= ev.recorded_at]
        if not listening:
            continue
        before, state = await _run_state_at(conn, ev.stream_id, ev.version)
        if before is not None and before.get("status") in TERMINAL_STATUSES:
            continue  # a late second terminal event changes nothing (a terminal status never changes)
        rows = []
        for wtype in webhook_types(ev.type, state):
            for h in listening:
                if wtype in h["events"]:
                    did = delivery_id(h["webhook_id"], ev.event_id, wtype)
                    body = delivery_body(wtype, state, ev.event_id, ev.recorded_at, did)
                    rows.append((did, h["webhook_id"], ev.event_id, wtype, state.get("run_id"), body.decode()))
        for row in rows:
            done = await conn.fetchval(
                "INSERT INTO webhook_deliveries (delivery_id, webhook_id, source_event_id, event_type, run_id, body) "
                "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING true",
                *row,
            )
            inserted += 1 if done else 0
    return inserted


async def catch_up(store: EventStore, batch: int = 1000) -> tuple[int, int]:
    """Record the intents of the events after the saved position, batch by batch. Returns (events read, intents).

    Each batch is one transaction (intents + position) under an advisory lock that other copies skip.
    """
    read = recorded = 0
    while True:
        async with store.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _LOCK):
                return read, recorded  # another copy is at it right now
            row = await conn.fetchrow(
                "SELECT tx_id::text::bigint AS tx_id, position FROM subscriber_checkpoints WHERE name = $1",
                CHECKPOINT,
            )
            after = Position(int(row["tx_id"]), int(row["position"])) if row else START
            events, upto = await store.read_all_of(after, RUN_TERMINAL_EVENTS, batch, conn=conn)
            if upto == after:
                return read, recorded
            recorded += await intents_for(conn, events)
            await store.save_checkpoint(CHECKPOINT, upto, conn)
        read += len(events)
