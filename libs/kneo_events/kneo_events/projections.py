"""Projections: pure folds of a stream into state, and the inline projectors that keep tables current.

``fold_run`` is the one definition of a run's state. The store calls the run projector inside the append's
transaction, so a read right after a write sees it; ``rebuild_runs`` replays the whole log into the same tables.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import asyncpg
import asyncpg.pool

from kneo_events.schemas import JSON, RecordedEvent

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "expired", "timed_out"})
RUN_STATUSES = ("queued", "running", "paused", "succeeded", "failed", "cancelled", "expired", "timed_out")


def initial_run_state() -> JSON:
    """The state of a run before its first event."""
    return {
        "run_id": None,
        "status": "queued",
        "agent_name": None,
        "workflow_name": None,
        "workflow_kind": None,
        "current_step_index": 0,
        "current_node_id": None,
        "visited_steps": [],
        "visited_nodes": [],
        "trace_event_count": 0,
        "output_text": None,
        "error": None,
        "metadata": {},
        "input": None,
        "face": "kneo",
        "step_count": 0,
        "step_outputs": {},
        "next_step": None,
        "pending": {},
        "awaiting_human": None,
        "human_decision": None,
        "checkpoint_count": 0,
        "turn": 0,
        "transcript": [],
        "edge_counts": {},
        "created_at": None,
        "updated_at": None,
        "version": 0,
    }


def fold_run(state: JSON | None, events: Iterable[RecordedEvent]) -> JSON:
    """Fold run events into state (pure: no I/O, no clock; a terminal status never changes)."""
    s: JSON = dict(state) if state is not None else initial_run_state()
    for ev in events:
        before = s["status"]
        _apply(s, ev.type, ev.data, ev.recorded_at)
        if s["status"] != before:  # when it started doing something, and when it ended
            if before == "queued" and not s.get("started_at"):
                s["started_at"] = ev.recorded_at.isoformat()
            if s["status"] in TERMINAL_STATUSES and not s.get("finished_at"):
                s["finished_at"] = ev.recorded_at.isoformat()
        s["version"] = ev.version
        s["trace_event_count"] = int(s["trace_event_count"]) + 1
        s["updated_at"] = ev.recorded_at.isoformat()
    return s


def _without_step(s: JSON, step_index: int) -> JSON:
    return {k: v for k, v in (s.get("pending") or {}).items() if v["step_index"] != step_index}


def _latest(pending: JSON) -> JSON | None:
    return list(pending.values())[-1] if pending else None


def _set_status(s: JSON, status: str) -> None:
    if s["status"] not in TERMINAL_STATUSES:
        s["status"] = status


def _apply(s: JSON, etype: str, d: JSON, at: datetime) -> None:
    if etype == "run.created":
        s["run_id"] = d["run_id"]
        s["input"] = d.get("input")
        s["face"] = d.get("face", "kneo")
        meta = dict(d.get("metadata") or {})
        if d.get("environment"):
            meta["environment"] = d["environment"]
        if d.get("face", "kneo") != "kneo":  # started by the Jobs or Knap face
            meta["face"] = d["face"]
        s["metadata"] = meta
        s["created_at"] = at.isoformat()
        spec = d.get("spec") or {}
        s["workflow_name"] = _spec_workflow_name(spec)
        s["agent_name"] = _spec_agent_name(spec)
        if d.get("timeout_seconds"):  # the run-level deadline (the human service's timer enforces it)
            s["timeout_seconds"] = float(d["timeout_seconds"])
            s["deadline_epoch"] = at.timestamp() + float(d["timeout_seconds"])
    elif etype == "run.compiled":
        s["agent_name"] = d.get("agent_name") or s["agent_name"]
        s["workflow_name"] = d.get("workflow_name") or s["workflow_name"]
        s["workflow_kind"] = d.get("workflow_kind")
        s["step_count"] = d.get("step_count", 0)
        s["metadata"] = {
            **s["metadata"],
            "plan_hash": d.get("plan_hash"),
            "workflow_kind": d.get("workflow_kind"),
        }
        spec_timeout = ((d.get("plan") or {}).get("workflow") or {}).get("timeout_seconds")
        if spec_timeout and not s.get("deadline_epoch") and s.get("created_at"):  # the request's value wins
            s["timeout_seconds"] = float(spec_timeout)
            s["deadline_epoch"] = datetime.fromisoformat(s["created_at"]).timestamp() + float(spec_timeout)
    elif etype == "step.scheduled":
        scheduled = {
            "step_index": d["step_index"],
            "step_id": d["step_id"],
            "attempt": d.get("attempt", 1),
            "command_id": d["command_id"],
            "not_before": d.get("not_before"),
            "turn": d.get("turn"),
        }
        s["next_step"] = scheduled
        # every step scheduled and not finished yet (several at once for concurrent branches)
        pending = {k: v for k, v in (s.get("pending") or {}).items() if v["step_index"] != d["step_index"]}
        s["pending"] = {**pending, d["command_id"]: scheduled}
        s["current_step_index"] = d["step_index"]
        s["current_node_id"] = d["step_id"]
        _set_status(s, "running")
    elif etype == "human.requested":
        request = {
            k: d.get(k)
            for k in ("request_id", "continuation_id", "prompt", "options", "deadline_epoch", "step_id", "reviewers")
        }
        s["metadata"] = {**s["metadata"], "pending_human_request": request}
        s["awaiting_human"] = {k: d.get(k) for k in ("continuation_id", "request_id", "step_index", "step_id", "turn")}
        s["pending"] = _without_step(s, int(d["step_index"]))
        s["next_step"] = _latest(s["pending"])
        _set_status(s, "paused")
    elif etype == "human.decided":
        s["metadata"] = {k: v for k, v in s["metadata"].items() if k != "pending_human_request"}
        s["human_decision"] = {
            k: d.get(k) for k in ("continuation_id", "request_id", "decision", "content", "selected_option", "reviewer")
        }
        _set_status(s, "running")
    elif etype == "step.started":
        _set_status(s, "running")
    elif etype == "graph.edge_taken":
        key = f"{d['source']}->{d['target']}"
        s["edge_counts"] = {**s.get("edge_counts", {}), key: int(d["traversal"])}
    elif etype == "step.completed":
        sid = d["step_id"]
        s["turn"] = int(s.get("turn", 0)) + 1
        s["awaiting_human"] = None
        s["human_decision"] = None
        s["transcript"] = [*s.get("transcript", []), {"step_id": sid, "output": d.get("output")}]
        s["step_outputs"] = {**s["step_outputs"], sid: d.get("output")}
        s["visited_steps"] = [*s["visited_steps"], sid]
        s["visited_nodes"] = [*s["visited_nodes"], sid]
        s["current_step_index"] = int(d["step_index"])
        s["pending"] = _without_step(s, int(d["step_index"]))
        s["next_step"] = _latest(s["pending"])
        out = d.get("output")
        s["output_text"] = out if isinstance(out, str) else s["output_text"]
    elif etype == "step.retrying":
        s["error"] = d.get("error")
    elif etype == "step.failed":
        s["error"] = d.get("error")
        s["failed_steps"] = [*s.get("failed_steps", []), d["step_id"]]
        s["awaiting_human"] = None
        s["human_decision"] = None
        s["pending"] = _without_step(s, int(d["step_index"]))
        s["next_step"] = _latest(s["pending"])
    elif etype == "checkpoint.saved":
        s["checkpoint_count"] = int(s["checkpoint_count"]) + 1
    elif etype == "run.succeeded":
        if s["status"] not in TERMINAL_STATUSES:
            s["output_text"] = d.get("output_text", s["output_text"])
        _set_status(s, "succeeded")
        s["next_step"] = None
        s["pending"] = {}
    elif etype == "run.failed":
        if s["status"] not in TERMINAL_STATUSES:
            s["error"] = d.get("error")
            if d.get("diagnostics"):
                s["metadata"] = {**s["metadata"], "diagnostics": d["diagnostics"]}
        _set_status(s, "failed")
        s["next_step"] = None
        s["pending"] = {}
    elif etype == "run.expired":
        if s["status"] not in TERMINAL_STATUSES:
            s["error"] = d.get("reason")
            s["metadata"] = {k: v for k, v in s["metadata"].items() if k != "pending_human_request"}
        _set_status(s, "expired")
        s["next_step"] = None
        s["pending"] = {}
    elif etype == "run.timed_out":
        if s["status"] not in TERMINAL_STATUSES:
            s["error"] = d.get("reason")
            s["metadata"] = {k: v for k, v in s["metadata"].items() if k != "pending_human_request"}
            s["awaiting_human"] = None
        _set_status(s, "timed_out")
        s["next_step"] = None
        s["pending"] = {}
    elif etype == "run.cancelled":
        _set_status(s, "cancelled")
        s["next_step"] = None
        s["pending"] = {}
    elif etype in ("run.continued", "run.forked"):
        # A continuation or fork starts with the source run's state at a step boundary (its memory, not its status)
        s.update(carried_state(d.get("carried") or {}))
        link = {"run_id": d["source_run_id"], "step_id": d["from_step_id"], "step_index": d["from_step_index"]}
        if etype == "run.forked":
            s["metadata"] = {**s["metadata"], "forked_from": {**link, "sequence": d["sequence"]}}
        else:
            s["metadata"] = {**s["metadata"], "continued_from": link}
    elif etype == "job.cleaned":
        # A job's sandbox was deleted: the job shows ``cleaned`` (kneo_events.jobs); the run's status never changes.
        s["metadata"] = {**s["metadata"], "cleaned_at": d.get("cleaned_at") or at.isoformat()}


# What a continuation or a fork carries over from its source run: everything a later step reads or extends.
CARRIED_KEYS = (
    "step_outputs",
    "transcript",
    "visited_steps",
    "visited_nodes",
    "turn",
    "edge_counts",
    "output_text",
    "checkpoint_count",
)


def carried_state(state: JSON) -> JSON:
    """The part of a run's state that a continuation or fork of it starts from (see :data:`CARRIED_KEYS`)."""
    return {k: state[k] for k in CARRIED_KEYS if k in state}


def _spec_workflow_name(spec: JSON) -> str | None:
    wf = spec.get("workflow")
    return wf.get("name") if isinstance(wf, dict) else None


def _spec_agent_name(spec: JSON) -> str | None:
    agent = spec.get("agent")
    return agent.get("name") if isinstance(agent, dict) else None


async def project_run(conn: Conn, stream_id: str, events: list[RecordedEvent]) -> None:
    """Inline projector for ``run-*`` streams: keeps ``runs`` and ``run_plans`` current in the append's txn."""
    run_id = stream_id.removeprefix("run-")
    row = await conn.fetchrow("SELECT state FROM runs WHERE run_id = $1", run_id)
    state = fold_run(row["state"] if row else None, events)
    if state["run_id"] is None:  # never a run without its run.created
        return
    await _upsert_run(conn, run_id, state)
    for ev in events:
        if ev.type.startswith("human.") or ev.type in ("run.cancelled", "run.expired", "run.timed_out"):
            await _project_human_task(conn, run_id, state, ev)
        if ev.type == "run.compiled":
            await conn.execute(
                "INSERT INTO run_plans (run_id, plan_hash, plan) VALUES ($1, $2, $3) "
                "ON CONFLICT (run_id) DO UPDATE SET plan_hash = EXCLUDED.plan_hash, plan = EXCLUDED.plan",
                run_id,
                ev.data["plan_hash"],
                ev.data["plan"],
            )


async def _project_human_task(conn: Conn, run_id: str, state: JSON, ev: RecordedEvent) -> None:
    d = ev.data
    if ev.type == "human.requested":
        await conn.execute(
            "INSERT INTO human_tasks (continuation_id, request_id, run_id, workflow_kind, step_id, step_index, prompt, "
            "options, reviewers, deadline_epoch, on_timeout, status, created_at, updated_at) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'pending', $12, $12) "
            "ON CONFLICT (continuation_id) DO NOTHING",
            d["continuation_id"],
            d["request_id"],
            run_id,
            state.get("workflow_kind"),
            d["step_id"],
            int(d["step_index"]),
            d.get("prompt") or "",
            d.get("options") or [],
            d.get("reviewers") or [],
            d.get("deadline_epoch"),
            d.get("on_timeout") or "fail",
            ev.recorded_at,
        )
    elif ev.type == "human.decided":
        await conn.execute(
            "UPDATE human_tasks SET status = 'decided', decision = $2, updated_at = $3 WHERE continuation_id = $1",
            d["continuation_id"],
            {k: d.get(k) for k in ("decision", "selected_option", "reviewer")},
            ev.recorded_at,
        )
    elif ev.type == "human.escalated":
        await conn.execute(
            "UPDATE human_tasks SET escalated_at = $2, updated_at = $2 WHERE continuation_id = $1 "
            "AND escalated_at IS NULL",
            d["continuation_id"],
            ev.recorded_at,
        )
    elif ev.type == "human.expired":
        await conn.execute(
            "UPDATE human_tasks SET status = 'expired', updated_at = $2 WHERE continuation_id = $1",
            d["continuation_id"],
            ev.recorded_at,
        )
    elif ev.type in ("human.cancelled", "run.cancelled", "run.timed_out"):  # close what is still open
        await conn.execute(
            "UPDATE human_tasks SET status = 'cancelled', updated_at = $2 WHERE run_id = $1 AND status = 'pending'",
            run_id,
            ev.recorded_at,
        )


async def _upsert_run(conn: Conn, run_id: str, state: JSON) -> None:
    await conn.execute(
        """
        INSERT INTO runs (run_id, status, workflow_name, face, version, state, created_at, updated_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7::text::timestamptz, $8::text::timestamptz)
        ON CONFLICT (run_id) DO UPDATE SET status = EXCLUDED.status, workflow_name = EXCLUDED.workflow_name,
            version = EXCLUDED.version, state = EXCLUDED.state, updated_at = EXCLUDED.updated_at
        """,
        run_id,
        state["status"],
        state["workflow_name"],
        state["face"],
        state["version"],
        state,
        state["created_at"] or state["updated_at"],
        state["updated_at"],
    )


async def project_policy(conn: Conn, stream_id: str, events: list[RecordedEvent]) -> None:
    """Inline projector for ``policy-<environment>`` streams: the current policy of each environment."""
    for ev in events:
        if ev.type != "policy.changed":
            continue
        await conn.execute(
            "INSERT INTO environment_policies (environment, policy, version, updated_at, updated_by) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (environment) DO UPDATE SET policy = EXCLUDED.policy, "
            "version = EXCLUDED.version, updated_at = EXCLUDED.updated_at, updated_by = EXCLUDED.updated_by",
            ev.data["environment"],
            ev.data["current"],
            ev.version,
            ev.recorded_at,
            ev.metadata.get("actor"),
        )


async def project_webhook(conn: Conn, stream_id: str, events: list[RecordedEvent]) -> None:
    """Inline projector for ``webhook-<id>`` streams: the ``webhooks`` table (the sealed secret as the event has it)."""
    for ev in events:
        d = ev.data
        if ev.type == "webhook.registered":
            await conn.execute(
                "INSERT INTO webhooks (webhook_id, url, events, secret, status, version, created_at, created_by) "
                "VALUES ($1, $2, $3, $4, 'active', $5, $6, $7) ON CONFLICT (webhook_id) DO NOTHING",
                d["webhook_id"],
                d["url"],
                list(d["events"]),
                d["secret"],
                ev.version,
                ev.recorded_at,
                ev.metadata.get("actor"),
            )
        elif ev.type == "webhook.deleted":
            await conn.execute(
                "UPDATE webhooks SET status = 'deleted', deleted_at = $2, version = $3 WHERE webhook_id = $1",
                d["webhook_id"],
                ev.recorded_at,
                ev.version,
            )


async def project_knap(conn: Conn, stream_id: str, events: list[RecordedEvent]) -> None:
    """Inline projector for ``knap-<uuid>`` streams: the pre-configured Knaps."""
    for ev in events:
        if ev.type == "knap.registered":
            await conn.execute(
                "INSERT INTO knaps (knap_uuid, name, definition, created_by, created_at) VALUES ($1, $2, $3, $4, $5) "
                "ON CONFLICT (knap_uuid) DO NOTHING",
                ev.data["knap_uuid"],
                ev.data["name"],
                ev.data["definition"],
                ev.metadata.get("actor"),
                ev.recorded_at,
            )
        elif ev.type == "knap.deleted":
            await conn.execute(
                "UPDATE knaps SET deleted_at = $2 WHERE knap_uuid = $1 AND deleted_at IS NULL",
                ev.data["knap_uuid"],
                ev.recorded_at,
            )


async def _rebuild_inline(conn: Conn, table: str, stream_type: str) -> int:
    """Truncate the inline projection ``table`` and replay every ``<stream_type>-*`` stream through its projector
    (the same one the appends use). Returns the streams replayed."""
    projector = INLINE_PROJECTORS[stream_type]
    async with conn.transaction():
        await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        await conn.execute(f"TRUNCATE {table}")
        rows = await conn.fetch(
            "SELECT position, tx_id::text::bigint AS tx_id, stream_id, version, event_id, type, data, metadata, "
            "recorded_at FROM events WHERE stream_id LIKE $1 ORDER BY stream_id, version",
            f"{stream_type}-%",
        )
        streams: dict[str, list[RecordedEvent]] = {}
        for r in rows:
            streams.setdefault(r["stream_id"], []).append(RecordedEvent(**dict(r)))
        for stream_id, evs in streams.items():
            await projector(conn, stream_id, evs)
    return len(streams)


async def rebuild_policies(conn: Conn) -> int:
    """Rebuild ``environment_policies`` from the ``policy-*`` streams. Returns environments rebuilt."""
    return await _rebuild_inline(conn, "environment_policies", "policy")


async def rebuild_knaps(conn: Conn) -> int:
    """Rebuild the Knaps projection from the ``knap-*`` streams. Returns Knaps rebuilt."""
    return await _rebuild_inline(conn, "knaps", "knap")


async def rebuild_webhooks(conn: Conn) -> int:
    """Rebuild the ``webhooks`` projection from the ``webhook-*`` streams. Returns webhooks rebuilt.

    (The delivery log is the webhooks service's operational state, not a projection: a rebuild leaves it alone.)
    """
    return await _rebuild_inline(conn, "webhooks", "webhook")


INLINE_PROJECTORS: dict[str, Any] = {
    "run": project_run,
    "policy": project_policy,
    "knap": project_knap,
    "webhook": project_webhook,
}


async def rebuild_runs(conn: Conn) -> int:
    """Truncate the run projections and fold the whole log into them again. Returns runs rebuilt."""
    async with conn.transaction():
        await conn.execute("LOCK TABLE runs, run_plans, human_tasks IN ACCESS EXCLUSIVE MODE")
        await conn.execute("TRUNCATE runs, run_plans, human_tasks")
        streams = await conn.fetch("SELECT DISTINCT stream_id FROM events WHERE stream_id LIKE 'run-%'")
        for rec in streams:
            rows = await conn.fetch(
                "SELECT position, tx_id::text::bigint AS tx_id, stream_id, version, event_id, type, data, "
                "metadata, recorded_at FROM events WHERE stream_id = $1 ORDER BY version",
                rec["stream_id"],
            )
            evs = [RecordedEvent(**dict(r)) for r in rows]
            await project_run(conn, rec["stream_id"], evs)
    return len(streams)
