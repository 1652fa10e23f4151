"""The audit log: ``GET /audit-events`` over the audit service's redacted projection, newest first."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from kneo_events.errors import InvalidRequest
from kneo_gateway.auth import require
from kneo_gateway.paging import page_params
from kneo_gateway.responses import JSONBody
from kneo_gateway.state import Gateway

router = APIRouter(tags=["audit"])
SORT_FIELDS = ("occurred_at",)
_FILTERS = (
    "WHERE ($1::text IS NULL OR event_type = $1) AND ($2::text IS NULL OR run_id = $2) "
    "AND ($3::text IS NULL OR continuation_id = $3) AND ($4::text IS NULL OR actor = $4) "
    "AND ($5::timestamptz IS NULL OR occurred_at >= $5) AND ($6::timestamptz IS NULL OR occurred_at < $6)"
)


def _record(row: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": row["id"],
        "event_type": row["event_type"],
        "actor": row["actor"],
        "occurred_at": row["occurred_at"].isoformat().replace("+00:00", "Z"),
        "request_id": row["request_id"],
        "payload": row["payload"],
    }
    if row["run_id"]:
        out["run_id"] = row["run_id"]
    if row["continuation_id"]:
        out["continuation_id"] = row["continuation_id"]
    return out


@router.get("/audit-events", dependencies=[Depends(require("audit:read"))])
async def list_audit_events(
    request: Request,
    event_type: str | None = None,
    run_id: str | None = None,
    continuation_id: str | None = None,
    actor: str | None = None,
    since: Annotated[datetime | None, Query(description="ISO 8601; records at or after it")] = None,
    until: Annotated[datetime | None, Query(description="ISO 8601; records before it")] = None,
    limit: Annotated[int | None, Query()] = None,
    offset: Annotated[int, Query()] = 0,
    sort_by: str = "occurred_at",
    sort_order: str = "desc",
) -> JSONBody:
    """Redacted audit records, newest first (``sort_order=asc`` for oldest first).

    Filters: ``event_type`` (e.g. ``run.created``, ``human.decision``), ``run_id``, ``continuation_id``, ``actor``
    (an API-key name, or ``system``), ``since`` / ``until`` (ISO 8601, a naive time is UTC). Records appear within
    moments of their event (the audit service projects the log asynchronously).
    """
    gw: Gateway = request.app.state.gateway
    limit = page_params(limit, offset, sort_by, sort_order, SORT_FIELDS, gw.settings.max_list_items)
    since, until = _utc(since), _utc(until)
    if since is not None and until is not None and since > until:
        raise InvalidRequest("since must not be after until", field="since")
    args = (event_type, run_id, continuation_id, actor, since, until)
    pool = gw.kernel.store.pool
    order = sort_order.upper()
    rows = await pool.fetch(
        f"SELECT id, event_type, actor, occurred_at, run_id, continuation_id, request_id, payload FROM audit_events "
        f"{_FILTERS} ORDER BY occurred_at {order}, position {order} LIMIT $7 OFFSET $8",
        *args,
        limit,
        offset,
    )
    total = await pool.fetchval(f"SELECT count(*) FROM audit_events {_FILTERS}", *args)
    events = [_record(r) for r in rows]
    return JSONBody(
        {
            "events": events,
            "count": len(events),
            "total": int(total),
            "limit": limit,
            "offset": offset,
            "sort_by": sort_by,
            "sort_order": sort_order,
        }
    )


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)
