"""The audit projection: which events of the log are audited, and how each becomes a redacted record.

Pure mapping (:func:`audit_record`) plus the two ways of writing the ``audit_events`` table: :func:`catch_up` (the
service's loop: the next events after the saved position, records and position in one transaction) and
:func:`rebuild` (truncate, then replay the whole log through the same mapping). Both go through :func:`apply`, so a
rebuilt table equals the live one.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from kneo_events.redaction import redact
from kneo_events.schemas import JSON, RecordedEvent
from kneo_events.store import START, Conn, EventStore, Position

CHECKPOINT = "audit"
# A transaction-scoped advisory lock: with several audit replicas one advances the projection at a time.
_LOCK = 0x6B6E656F_61756474  # "kneoaudt"

# Stored event type -> the audit record's event_type (the seed calls a decision "human.decision").
AUDITED: dict[str, str] = {
    "spec.validated": "spec.validated",
    "spec.compiled": "spec.compiled",
    "spec.explained": "spec.explained",
    "spec.policy_reported": "spec.policy_reported",
    "run.created": "run.created",
    "run.cancelled": "run.cancelled",
    "run.continued": "run.continued",
    "run.forked": "run.forked",
    "run.timed_out": "run.timed_out",
    "run.expired": "run.expired",
    "human.decided": "human.decision",
    "human.cancelled": "human.cancelled",
    "human.expired": "human.expired",
    "human.continued": "human.continued",
    "human.continue_failed": "human.continue_failed",
    "human.escalated": "human.escalated",
    "credential.inventory_accessed": "credential.inventory_accessed",
    "policy.changed": "policy.changed",
    "workspace.uploaded": "workspace.uploaded",
    "webhook.registered": "webhook.registered",
    "webhook.deleted": "webhook.deleted",
    "knap.registered": "knap.registered",
    "knap.deleted": "knap.deleted",
    "job.cleaned": "job.cleaned",
}


def _payload(ev: RecordedEvent) -> JSON:
    """What an audit reader needs of the event (never a run's input or a spec's body: sizes and flags instead)."""
    d = ev.data
    if ev.type == "run.created":
        out: JSON = {
            k: d.get(k) for k in ("spec_path", "target", "environment", "async_mode", "face", "timeout_seconds")
        }
        out["input_present"] = d.get("input") is not None
        out["spec_name"] = (d.get("spec") or {}).get("name")
        if d.get("metadata"):
            out["metadata"] = d["metadata"]
        return out
    if ev.type == "human.decided":
        content = d.get("content")
        return {
            "request_id": d.get("request_id"),
            "decision": d.get("decision"),
            "selected_option": d.get("selected_option"),
            "reviewer": d.get("reviewer"),
            "content_present": content not in (None, "", {}),
        }
    if ev.type == "webhook.registered":  # never the (sealed) secret
        return {k: d.get(k) for k in ("webhook_id", "url", "events")}
    if ev.type == "policy.changed":
        return {k: d.get(k) for k in ("surface", "environment", "changed_fields", "previous", "current")}
    return dict(d)


def audit_record(ev: RecordedEvent) -> JSON | None:
    """The redacted audit record of one stored event, or ``None`` when the event is not audited."""
    event_type = AUDITED.get(ev.type)
    if event_type is None:
        return None
    if ev.type == "run.created" and ev.metadata.get("route") == "POST /specs/run":
        event_type = "spec.run"  # a run started through the spec-run route
    meta = ev.metadata
    run_id = ev.stream_id.removeprefix("run-") if ev.stream_id.startswith("run-") else ev.data.get("run_id")
    payload = _payload(ev)
    if ev.type.startswith("spec.") and "source" in ev.data:
        payload["metadata"] = {**(payload.get("metadata") or {}), "source": ev.data["source"]}
    return {
        "id": f"evt_{ev.event_id.hex}",
        "position": ev.position,
        "event_type": event_type,
        "actor": str(meta.get("actor") or "system"),
        "occurred_at": ev.recorded_at,
        "run_id": run_id,
        "continuation_id": ev.data.get("continuation_id"),
        "request_id": meta.get("request_id"),
        "payload": redact(payload),
    }


async def apply(conn: Conn, events: list[RecordedEvent]) -> int:
    """Write the records of ``events`` (idempotent: a record already there is kept). Returns records written."""
    rows = [r for r in (audit_record(ev) for ev in events) if r is not None]
    if rows:
        await conn.executemany(
            "INSERT INTO audit_events (id, position, event_type, actor, occurred_at, run_id, continuation_id, "
            "request_id, payload) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING",
            [
                (
                    r["id"],
                    r["position"],
                    r["event_type"],
                    r["actor"],
                    r["occurred_at"],
                    r["run_id"],
                    r["continuation_id"],
                    r["request_id"],
                    r["payload"],
                )
                for r in rows
            ],
        )
    return len(rows)


async def catch_up(store: EventStore, batch: int = 1000) -> int:
    """Project the events after the saved position, batch by batch, until none is left. Returns audited events read.

    Each batch is one transaction (records + position), under an advisory lock that other replicas skip.
    """
    total = 0
    while True:
        async with store.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _LOCK):
                return total  # another replica is projecting right now
            row = await conn.fetchrow(
                "SELECT tx_id::text::bigint AS tx_id, position FROM subscriber_checkpoints WHERE name = $1",
                CHECKPOINT,
            )
            after = Position(int(row["tx_id"]), int(row["position"])) if row else START
            events, upto = await store.read_all_of(after, AUDITED, batch, conn=conn)
            if upto == after:
                return total
            await apply(conn, events)
            await store.save_checkpoint(CHECKPOINT, upto, conn)
        total += len(events)


async def rebuild(store: EventStore, batch: int = 2000) -> int:
    """Truncate the audit projection and replay the whole log into it. Returns the records written."""
    written = 0
    async with store.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK)  # the live loop waits meanwhile
        await conn.execute("TRUNCATE audit_events")
        after = START
        while True:
            events, upto = await store.read_all_of(after, AUDITED, batch, conn=conn)
            if upto == after:
                break
            written += await apply(conn, events)
            after = upto
        await store.save_checkpoint(CHECKPOINT, after, conn)
    return written


async def lag_ms(pool: asyncpg.Pool, since: Any = None) -> list[float]:
    """Projection lag of each record (written − recorded, in ms), oldest first; for the benchmark."""
    rows = await pool.fetch(
        "SELECT EXTRACT(EPOCH FROM (projected_at - occurred_at)) * 1000 AS lag FROM audit_events "
        "WHERE ($1::timestamptz IS NULL OR occurred_at >= $1) ORDER BY occurred_at",
        since,
    )
    return [float(r["lag"]) for r in rows]
