"""Run inspection: checkpoints, checkpoint diff, replay timeline, recovery context and the paginated trace.

Every route is a read-only view of the run's stream ``run-<run_id>``: nothing new is stored. Statuses at a point in
the past come from folding the stream up to that event with :func:`kneo_events.projections.fold_run`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from kneo_events.checkpoints import CheckpointLimits, preview_value, unpack
from kneo_events.errors import InvalidRequest, NotFound
from kneo_events.ids import run_stream
from kneo_events.projections import fold_run
from kneo_events.redaction import redact
from kneo_events.schemas import RecordedEvent, dumps
from kneo_gateway.auth import require
from kneo_gateway.lineage import continuation_point
from kneo_gateway.paging import page_params
from kneo_gateway.responses import JSONBody
from kneo_gateway.state import Gateway

router = APIRouter(tags=["runs"], dependencies=[Depends(require("runs:read"))])

JSON = dict[str, Any]
CHECKPOINT_SORT_FIELDS = ("sequence", "created_at")
TRACE_SORT_FIELDS = ("version", "recorded_at")
CHECKPOINT_TYPE = "step"  # every checkpoint.saved is a step (or graph node) boundary
_ERROR_EVENTS = frozenset({"step.retrying", "step.failed", "run.failed", "command.dead_lettered"})
_QUIET_EVENTS = frozenset({"step.scheduled", "step.started"})  # left out of the replay timeline


# ---------------------------------------------------------------- payload limits


PreviewLimits = CheckpointLimits  # the same limits bound what the views show


def bounded_payload(state: Any, limits: PreviewLimits) -> JSON:
    """The redacted checkpoint state, or its preview when its JSON exceeds ``max_bytes``.

    Returns ``{"payload", "truncated", "original_bytes"}`` (``original_bytes``: size of the redacted state as JSON).
    """
    clean = redact(state)
    size = len(dumps(clean))
    if size <= limits.max_bytes:
        return {"payload": clean, "truncated": False, "original_bytes": size}
    return {"payload": preview_value(clean, limits), "truncated": True, "original_bytes": size}


def cut_text(text: str | None, limits: PreviewLimits) -> str | None:
    """A redacted error message, cut to the preview length."""
    return None if text is None else preview_value(redact(text), limits)


# ---------------------------------------------------------------- folding the stream


@dataclass(frozen=True)
class EventPoint:
    """One event of the stream with the run's state right after it."""

    event: RecordedEvent
    state: JSON


def fold_points(events: list[RecordedEvent]) -> list[EventPoint]:
    """Fold the stream one event at a time, keeping the state after each event."""
    points: list[EventPoint] = []
    state: JSON | None = None
    for ev in events:
        state = fold_run(state, [ev])
        points.append(EventPoint(ev, state))
    return points


def _gw(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


async def load_stream(request: Request, run_id: str) -> list[RecordedEvent]:
    """The run's events in order; 404 ``not_found`` for a run without a stream."""
    request.state.run_id = run_id
    events: list[RecordedEvent] = await _gw(request).kernel.store.read_stream(run_stream(run_id))
    if not events:
        raise NotFound(f"run {run_id} not found", run_id=run_id)
    return events


def checkpoint_view(point: EventPoint, limits: PreviewLimits) -> JSON:
    """One checkpoint.saved event as the API shows it."""
    ev, d = point.event, point.event.data
    return {
        "sequence": d["sequence"],
        "type": CHECKPOINT_TYPE,
        "step_id": d["step_id"],
        "node_id": d["step_id"],
        "step_index": d["step_index"],
        "status": point.state["status"],
        "position": ev.version,
        "pending_human_request": None,
        "error_summary": cut_text(point.state.get("error"), limits),
        "created_at": ev.recorded_at.isoformat(),
        **bounded_payload(d.get("state") or {}, limits),
    }


def checkpoints_of(points: list[EventPoint], limits: PreviewLimits) -> list[JSON]:
    """Every checkpoint of the run, in stream order."""
    return [checkpoint_view(p, limits) for p in points if p.event.type == "checkpoint.saved"]


def recovery_context(events: list[RecordedEvent], state: JSON) -> JSON:
    """Where a run stands for a continuation: completed steps, the failed step, the next step and its input.

    ``completed_steps`` include the steps a continuation or fork carried over from its source run.
    """
    cont = continuation_point(events)
    completed = [ev.data for ev in events if ev.type == "step.completed"]
    if cont.start is not None:
        next_index = cont.start.step_index
    else:
        failed_index = next(
            (
                e.data["step_index"]
                for e in reversed(events)
                if e.type == "step.failed" and e.data["step_id"] == cont.failed_step
            ),
            None,
        )
        if failed_index is not None:
            next_index = int(failed_index)
        else:
            next_index = int(completed[-1]["step_index"]) + 1 if completed else 0
    transcript = state.get("transcript") or []
    resume_input = transcript[-1].get("output") if transcript else state.get("input")
    return {
        "run_id": state["run_id"],
        "status": state["status"],
        "workflow_kind": state.get("workflow_kind"),
        "completed_steps": list(state.get("visited_steps") or []),
        "failed_step": cont.failed_step,
        "resume_input": redact(resume_input),
        "next_step_index": next_index,
        "can_continue": cont.start is not None,
        "reason": cont.reason,
    }


# ---------------------------------------------------------------- routes


@router.get("/runs/{run_id}/checkpoints")
async def list_checkpoints(
    run_id: str,
    request: Request,
    checkpoint_type: Annotated[str | None, Query(alias="type")] = None,
    limit: Annotated[int | None, Query()] = None,
    offset: Annotated[int, Query()] = 0,
    sort_by: str = "sequence",
    sort_order: str = "asc",
) -> JSONBody:
    """The run's checkpoints (one per step boundary); oversized payloads come back as bounded previews.

    ``limit`` defaults to and is clamped at ``KNEO_SERV_MAX_LIST_ITEMS``.
    """
    gw = _gw(request)
    limit = page_params(limit, offset, sort_by, sort_order, CHECKPOINT_SORT_FIELDS, gw.settings.max_list_items)
    points = fold_points(await load_stream(request, run_id))
    items = [
        c
        for c in checkpoints_of(points, PreviewLimits.from_settings(gw.settings))
        if checkpoint_type in (None, c["type"])
    ]
    items.sort(key=lambda c: (c[sort_by], c["sequence"]), reverse=sort_order == "desc")
    page = items[offset : offset + limit]
    return JSONBody(
        {
            "run_id": run_id,
            "checkpoints": page,
            "count": len(page),
            "total": len(items),
            "limit": limit,
            "offset": offset,
            "sort_by": sort_by,
            "sort_order": sort_order,
        }
    )


def flatten(value: Any, prefix: str = "") -> JSON:
    """Dotted paths to leaf values: ``a.b`` for dict keys, ``a[0]`` for list items; empty containers are leaves."""
    if isinstance(value, dict) and value:
        out: JSON = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, item in enumerate(value):
            out.update(flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: value} if prefix else {}


def diff_states(old: Any, new: Any) -> JSON:
    """Added, removed and changed flattened paths between two (redacted) checkpoint states."""
    a, b = flatten(redact(old)), flatten(redact(new))
    return {
        "added": {p: v for p, v in b.items() if p not in a},
        "removed": {p: v for p, v in a.items() if p not in b},
        "changed": {p: {"from": a[p], "to": v} for p, v in b.items() if p in a and a[p] != v},
    }


def _checkpoint_states(events: list[RecordedEvent]) -> dict[int, Any]:
    return {int(ev.data["sequence"]): unpack(ev.data.get("state")) for ev in events if ev.type == "checkpoint.saved"}


def _pick(states: dict[int, Any], sequence: int | None, run_id: str, field: str) -> int:
    """``sequence`` if the run has it, else (when not given) the run's latest checkpoint."""
    available = sorted(states)
    if not available:
        raise InvalidRequest(f"run {run_id} has no checkpoint to compare", field=field, checkpoints=0)
    if sequence is None:
        return available[-1]
    if sequence not in states:
        raise InvalidRequest(
            f"checkpoint sequence {sequence} does not exist in run {run_id}", field=field, available=available
        )
    return sequence


@router.get("/runs/{run_id}/checkpoints/diff")
async def diff_checkpoints(
    run_id: str,
    request: Request,
    from_sequence: Annotated[int | None, Query()] = None,
    to_sequence: Annotated[int | None, Query()] = None,
    other_run_id: Annotated[str | None, Query(max_length=200)] = None,
    other_sequence: Annotated[int | None, Query()] = None,
) -> JSONBody:
    """Compare two checkpoint states: the latest two by default; ``to_sequence`` defaults to the latest and
    ``from_sequence`` to the checkpoint before ``to_sequence``.

    Across runs (e.g. a fork and its source): with ``other_run_id``, checkpoint ``from_sequence`` of this run
    (default: its latest) is compared with checkpoint ``other_sequence`` of the other run (default: its latest).
    """
    events = await load_stream(request, run_id)
    states = _checkpoint_states(events)
    if other_run_id is not None:
        if to_sequence is not None:
            raise InvalidRequest(
                "with other_run_id, name the other run's checkpoint with other_sequence", field="to_sequence"
            )
        other_events = await _gw(request).kernel.store.read_stream(run_stream(other_run_id))
        if not other_events:
            raise NotFound(f"run {other_run_id} not found", run_id=other_run_id)
        others = _checkpoint_states(other_events)
        from_seq = _pick(states, from_sequence, run_id, "from_sequence")
        other_seq = _pick(others, other_sequence, other_run_id, "other_sequence")
        return JSONBody(
            {
                "run_id": run_id,
                "from_sequence": from_seq,
                "other_run_id": other_run_id,
                "other_sequence": other_seq,
                **diff_states(states[from_seq], others[other_seq]),
            }
        )
    if other_sequence is not None:
        raise InvalidRequest("other_sequence needs other_run_id", field="other_sequence")
    available = sorted(states)
    if len(available) < 2:
        raise InvalidRequest(
            f"run {run_id} has {len(available)} checkpoint(s); a diff needs at least two", checkpoints=len(available)
        )
    for field, seq in (("from_sequence", from_sequence), ("to_sequence", to_sequence)):
        if seq is not None and seq not in states:
            raise InvalidRequest(
                f"checkpoint sequence {seq} does not exist in run {run_id}", field=field, available=available
            )
    to_seq = available[-1] if to_sequence is None else to_sequence
    if from_sequence is None:
        earlier = [s for s in available if s < to_seq]
        if not earlier:
            raise InvalidRequest(
                f"no checkpoint before sequence {to_seq}: give from_sequence",
                field="from_sequence",
                available=available,
            )
        from_seq = earlier[-1]
    else:
        from_seq = from_sequence
    return JSONBody(
        {
            "run_id": run_id,
            "from_sequence": from_seq,
            "to_sequence": to_seq,
            **diff_states(states[from_seq], states[to_seq]),
        }
    )


def timeline_entry(point: EventPoint, limits: PreviewLimits) -> JSON:
    """One event of interest in the replay timeline."""
    ev, d = point.event, point.event.data
    return {
        "position": ev.version,
        "sequence": d.get("sequence") if ev.type == "checkpoint.saved" else None,
        "type": ev.type,
        "step_id": d.get("target") if ev.type == "graph.edge_taken" else d.get("step_id", d.get("from_step_id")),
        "status": point.state["status"],
        "at": ev.recorded_at.isoformat(),
        "error": cut_text(d.get("error"), limits) if ev.type in _ERROR_EVENTS else None,
    }


@router.get("/runs/{run_id}/replay")
async def replay_run(run_id: str, request: Request) -> JSONBody:
    """The compact timeline (no checkpoint payloads) with the current position and the recovery context."""
    limits = PreviewLimits.from_settings(_gw(request).settings)
    events = await load_stream(request, run_id)
    points = fold_points(events)
    state = points[-1].state
    timeline = [timeline_entry(p, limits) for p in points if p.event.type not in _QUIET_EVENTS]
    sequences = [p.event.data["sequence"] for p in points if p.event.type == "checkpoint.saved"]
    return JSONBody(
        {
            "run_id": run_id,
            "status": state["status"],
            "workflow_kind": state.get("workflow_kind"),
            "timeline": timeline,
            "count": len(timeline),
            "checkpoint_count": len(sequences),
            "latest_checkpoint_sequence": sequences[-1] if sequences else None,
            "current_position": {
                "step_index": state["current_step_index"],
                "node_id": state["current_node_id"],
                "version": state["version"],
            },
            "pending_human_request": None,
            "error_summary": cut_text(state.get("error"), limits),
            "replay_context": recovery_context(events, state),
        }
    )


@router.get("/runs/{run_id}/recovery")
async def recover_run(run_id: str, request: Request) -> JSONBody:
    """Completed steps, failed step, resume input, next step index and whether ``POST .../continue`` may run."""
    events = await load_stream(request, run_id)
    return JSONBody(recovery_context(events, fold_run(None, events)))


@router.get("/runs/{run_id}/trace")
async def trace_run(
    run_id: str,
    request: Request,
    event_type: str | None = None,
    limit: Annotated[int | None, Query()] = None,
    offset: Annotated[int, Query()] = 0,
    sort_by: str = "version",
    sort_order: str = "asc",
) -> JSONBody:
    """The run's stored events (redacted), filtered by ``event_type`` and paginated."""
    gw = _gw(request)
    limit = page_params(limit, offset, sort_by, sort_order, TRACE_SORT_FIELDS, gw.settings.max_list_items)
    events = [e for e in await load_stream(request, run_id) if event_type in (None, e.type)]
    events.sort(
        key=lambda e: (e.recorded_at, e.version) if sort_by == "recorded_at" else (e.version,),
        reverse=sort_order == "desc",
    )
    page = events[offset : offset + limit]
    return JSONBody(
        {
            "run_id": run_id,
            "events": [redact(e.wire()) for e in page],
            "count": len(page),
            "total": len(events),
            "limit": limit,
            "offset": offset,
            "sort_by": sort_by,
            "sort_order": sort_order,
        }
    )
