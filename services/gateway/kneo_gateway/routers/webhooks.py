"""Webhooks (the Jobs face, seeds/000 "Webhooks for Async Updates"; docs/webhooks.md).

``POST /webhooks`` appends ``webhook.registered`` on the stream ``webhook-<id>`` with the secret SEALED
(``kneo_events.sealing``); the ``webhooks`` table is its inline projection, so a GET right after sees it. The secret
is never echoed back, not even by the POST. ``DELETE`` appends ``webhook.deleted``; the webhooks service then cancels
the webhook's pending deliveries. ``GET /webhooks/{id}/deliveries`` reads the service's delivery log.
Errors come in the Jobs envelope ``{"error", "detail", "code"}`` (``kneo_gateway.errors``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Body, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from kneo_events.errors import ConcurrencyConflict, InvalidRequest, NotFound
from kneo_events.schemas import WebhookDeleted, WebhookRegistered, new_event
from kneo_events.sealing import Keyring, load_keyring
from kneo_events.webhooks import (
    SECRET_MAX_CHARS,
    SECRET_MIN_CHARS,
    URL_MAX_CHARS,
    WEBHOOK_EVENT_TYPES,
    WEBHOOK_ID,
    address_refusal,
    check_url,
    new_webhook_id,
)
from kneo_gateway.auth import Principal, require
from kneo_gateway.responses import JSONBody
from kneo_gateway.state import Gateway

router = APIRouter(tags=["webhooks"])


class JobsError(BaseModel):
    """The Jobs-face error envelope."""

    error: str
    detail: Any = None
    code: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": JobsError, "description": "BAD_REQUEST"},
    401: {"model": JobsError, "description": "UNAUTHORIZED"},
    403: {"model": JobsError, "description": "FORBIDDEN"},
    413: {"model": JobsError, "description": "payload too large"},
    429: {"model": JobsError, "description": "rate limited"},
    500: {"model": JobsError, "description": "INTERNAL_ERROR"},
}


class WebhookCreate(BaseModel):
    """A subscription: where to POST, which events, and the secret deliveries are signed with."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(min_length=1, max_length=URL_MAX_CHARS, examples=["https://your-domain.com/webhooks/knify"])
    events: list[str] = Field(min_length=1, max_length=len(WEBHOOK_EVENT_TYPES), examples=[["job.completed"]])
    secret: SecretStr = Field(min_length=SECRET_MIN_CHARS, max_length=SECRET_MAX_CHARS)


class WebhookOut(BaseModel):
    """A webhook as the API shows it (never its secret)."""

    id: str
    url: str
    events: list[str]
    created_at: str


class Pagination(BaseModel):
    """The Jobs face's pagination section."""

    page: int
    limit: int
    total: int
    pages: int


class WebhookList(BaseModel):
    """``GET /webhooks``."""

    data: list[WebhookOut]
    pagination: Pagination


class DeliveryAttempt(BaseModel):
    """One attempt of a delivery."""

    attempt: int
    started_at: str
    finished_at: str | None
    status_code: int | None
    error: str | None
    response_excerpt: str | None
    duration_ms: float | None
    next_retry_at: str | None


class Delivery(BaseModel):
    """One delivery (a source event sent to this webhook as one event type) and all its attempts."""

    id: str
    webhook_id: str
    event_type: str
    run_id: str | None
    job_id: str | None
    status: str
    attempt_count: int
    failures: int
    next_retry_at: str | None
    last_status_code: int | None
    last_error: str | None
    created_at: str
    updated_at: str
    completed_at: str | None
    attempts: list[DeliveryAttempt]


class DeliveryList(BaseModel):
    """``GET /webhooks/{id}/deliveries``, newest first."""

    data: list[Delivery]
    pagination: Pagination


class Deleted(BaseModel):
    """``DELETE /webhooks/{id}``."""

    id: str
    deleted: bool
    deleted_at: str


def _gw(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


async def _keyring(request: Request) -> Keyring:
    """The sealing keys, loaded once per app (the key file, when used, is read or created on first use)."""
    keyring: Keyring | None = getattr(request.app.state, "webhook_keyring", None)
    if keyring is None:
        s = _gw(request).settings
        raw = s.webhooks_secret_key.get_secret_value() if s.webhooks_secret_key else None
        keyring = await asyncio.to_thread(load_keyring, raw, s.data_dir)
        request.app.state.webhook_keyring = keyring
    return keyring


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _webhook(row: Any) -> dict[str, Any]:
    return {
        "id": row["webhook_id"],
        "url": row["url"],
        "events": list(row["events"]),
        "created_at": _iso(row["created_at"]),
    }


def _pagination(page: int, limit: int, total: int) -> dict[str, int]:
    return {"page": page, "limit": limit, "total": total, "pages": math.ceil(total / limit) if total else 0}


def _page(request: Request, page: int, limit: int | None) -> tuple[int, int]:
    cap = _gw(request).settings.max_list_items
    if page < 1:
        raise InvalidRequest("page must be 1 or more", detail={"field": "page"})
    if limit is not None and limit < 1:
        raise InvalidRequest("limit must be 1 or more", detail={"field": "limit"})
    if page > 1_000_000:
        raise InvalidRequest("page must be at most 1000000", detail={"field": "page"})
    return page, cap if limit is None else min(limit, cap)


def _validate(request: Request, body: WebhookCreate) -> tuple[str, list[str]]:
    url = body.url.strip()
    problem = check_url(url)
    if problem:
        raise InvalidRequest(problem, detail={"field": "url"})
    if not _gw(request).settings.webhooks_allow_private:
        # An IP literal can be judged now; a name is judged after DNS resolution, on every delivery attempt.
        host = urlsplit(url).hostname or ""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            reason = address_refusal(host)
            if reason:
                raise InvalidRequest(
                    f"url points at a non-public address ({reason}); set KNEO_WEBHOOKS_ALLOW_PRIVATE=true to allow it",
                    detail={"field": "url"},
                )
    events = list(dict.fromkeys(body.events))
    unknown = [e for e in events if e not in WEBHOOK_EVENT_TYPES]
    if unknown:
        raise InvalidRequest(
            f"unknown event types: {', '.join(map(repr, unknown))}",
            detail={"field": "events", "unknown": unknown, "known": list(WEBHOOK_EVENT_TYPES)},
        )
    return url, events


@router.post("/webhooks", status_code=201, responses={201: {"model": WebhookOut}, **_ERRORS})
async def register_webhook(
    request: Request,
    principal: Annotated[Principal, Depends(require("webhooks:write"))],
    body: Annotated[WebhookCreate, Body()],
) -> JSONBody:
    """Register a webhook. Answers ``{id, url, events, created_at}``: the secret is never echoed back."""
    url, events = _validate(request, body)
    keyring = await _keyring(request)
    webhook_id = new_webhook_id()
    payload = WebhookRegistered(
        webhook_id=webhook_id,
        url=url,
        events=events,
        secret=keyring.seal(body.secret.get_secret_value(), webhook_id),
    )
    meta = {"request_id": request.state.request_id, "actor": principal.name}
    result = await _gw(request).kernel.commit(f"webhook-{webhook_id}", [new_event(payload, meta)], 0)
    created = result.events[0].recorded_at
    return JSONBody({"id": webhook_id, "url": url, "events": events, "created_at": created.isoformat()}, 201)


@router.get(
    "/webhooks",
    dependencies=[Depends(require("webhooks:read"))],
    responses={200: {"model": WebhookList}, **_ERRORS},
)
async def list_webhooks(
    request: Request,
    page: Annotated[int, Query()] = 1,
    limit: Annotated[int | None, Query()] = None,
) -> JSONBody:
    """The registered (not deleted) webhooks, newest first."""
    page, limit = _page(request, page, limit)
    pool = _gw(request).kernel.store.pool
    rows = await pool.fetch(
        "SELECT webhook_id, url, events, created_at FROM webhooks WHERE status = 'active' "
        "ORDER BY created_at DESC, webhook_id LIMIT $1 OFFSET $2",
        limit,
        (page - 1) * limit,
    )
    total = await pool.fetchval("SELECT count(*) FROM webhooks WHERE status = 'active'")
    return JSONBody({"data": [_webhook(r) for r in rows], "pagination": _pagination(page, limit, int(total))})


async def _row(request: Request, webhook_id: str) -> Any:
    row = None
    if WEBHOOK_ID.match(webhook_id):
        row = await _gw(request).kernel.store.pool.fetchrow(
            "SELECT webhook_id, url, events, created_at, status, version, deleted_at FROM webhooks "
            "WHERE webhook_id = $1",
            webhook_id,
        )
    if row is None:
        raise NotFound(f"webhook {webhook_id} not found", detail={"webhook_id": webhook_id})
    return row


@router.get(
    "/webhooks/{webhook_id}",
    dependencies=[Depends(require("webhooks:read"))],
    responses={200: {"model": WebhookOut}, 404: {"model": JobsError, "description": "NOT_FOUND"}, **_ERRORS},
)
async def get_webhook(webhook_id: str, request: Request) -> JSONBody:
    """One registered webhook (never its secret)."""
    row = await _row(request, webhook_id)
    if row["status"] != "active":
        raise NotFound(f"webhook {webhook_id} was deleted", detail={"webhook_id": webhook_id})
    return JSONBody(_webhook(row))


@router.delete(
    "/webhooks/{webhook_id}",
    responses={
        200: {"model": Deleted},
        404: {"model": JobsError, "description": "NOT_FOUND"},
        409: {"model": JobsError, "description": "CONFLICT"},
        **_ERRORS,
    },
)
async def delete_webhook(
    webhook_id: str, request: Request, principal: Annotated[Principal, Depends(require("webhooks:write"))]
) -> JSONBody:
    """Delete a webhook: nothing more is sent to it (pending retries are cancelled; its delivery log stays)."""
    row = await _row(request, webhook_id)
    if row["status"] != "active":
        raise NotFound(f"webhook {webhook_id} was already deleted", detail={"webhook_id": webhook_id})
    meta = {"request_id": request.state.request_id, "actor": principal.name}
    try:
        result = await _gw(request).kernel.commit(
            f"webhook-{webhook_id}", [new_event(WebhookDeleted(webhook_id=webhook_id), meta)], int(row["version"])
        )
    except ConcurrencyConflict as exc:
        raise ConcurrencyConflict(
            f"webhook {webhook_id} changed meanwhile; retry", detail={"webhook_id": webhook_id}
        ) from exc
    return JSONBody({"id": webhook_id, "deleted": True, "deleted_at": result.events[0].recorded_at.isoformat()})


@router.get(
    "/webhooks/{webhook_id}/deliveries",
    dependencies=[Depends(require("webhooks:read"))],
    responses={200: {"model": DeliveryList}, 404: {"model": JobsError, "description": "NOT_FOUND"}, **_ERRORS},
)
async def list_deliveries(
    webhook_id: str,
    request: Request,
    page: Annotated[int, Query()] = 1,
    limit: Annotated[int | None, Query()] = None,
) -> JSONBody:
    """The delivery log of a webhook (also after it was deleted), newest first, each with every attempt."""
    await _row(request, webhook_id)
    page, limit = _page(request, page, limit)
    pool = _gw(request).kernel.store.pool
    rows = await pool.fetch(
        "SELECT delivery_id, webhook_id, event_type, run_id, status, attempts, failures, next_attempt_at, "
        "last_status_code, last_error, created_at, updated_at, completed_at FROM webhook_deliveries "
        "WHERE webhook_id = $1 ORDER BY created_at DESC, delivery_id LIMIT $2 OFFSET $3",
        webhook_id,
        limit,
        (page - 1) * limit,
    )
    total = await pool.fetchval("SELECT count(*) FROM webhook_deliveries WHERE webhook_id = $1", webhook_id)
    attempts: dict[str, list[dict[str, Any]]] = {}
    if rows:
        for a in await pool.fetch(
            "SELECT delivery_id, attempt, started_at, finished_at, status_code, error, response_excerpt, duration_ms, "
            "next_retry_at FROM webhook_delivery_attempts WHERE delivery_id = ANY($1::text[]) "
            "ORDER BY delivery_id, attempt",
            [r["delivery_id"] for r in rows],
        ):
            attempts.setdefault(a["delivery_id"], []).append(
                {
                    "attempt": a["attempt"],
                    "started_at": _iso(a["started_at"]),
                    "finished_at": _iso(a["finished_at"]),
                    "status_code": a["status_code"],
                    "error": a["error"],
                    "response_excerpt": a["response_excerpt"],
                    "duration_ms": a["duration_ms"],
                    "next_retry_at": _iso(a["next_retry_at"]),
                }
            )
    data = [
        {
            "id": r["delivery_id"],
            "webhook_id": r["webhook_id"],
            "event_type": r["event_type"],
            "run_id": r["run_id"],
            "job_id": r["run_id"] if r["event_type"].startswith("job.") else None,
            "status": r["status"],
            "attempt_count": r["attempts"],
            "failures": r["failures"],
            "next_retry_at": _iso(r["next_attempt_at"]) if r["status"] == "pending" else None,
            "last_status_code": r["last_status_code"],
            "last_error": r["last_error"],
            "created_at": _iso(r["created_at"]),
            "updated_at": _iso(r["updated_at"]),
            "completed_at": _iso(r["completed_at"]),
            "attempts": attempts.get(r["delivery_id"], []),
        }
        for r in rows
    ]
    return JSONBody({"data": data, "pagination": _pagination(page, limit, int(total))})
