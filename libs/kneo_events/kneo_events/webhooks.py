"""Webhooks, the pure part shared by the gateway (registration) and the webhooks service (delivery).

What a subscriber may subscribe to, what a delivery's body is, how it is signed (the Jobs seed's
``verify_signature``: ``X-Knify-Signature: sha256=<hex HMAC-SHA256 of the raw body>``), the retry schedule, and the
address rule that keeps deliveries off private networks (SSRF). No I/O here; docs/webhooks.md explains the choices.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from kneo_events.jobs import TERMINAL_JOB_EVENTS, is_job, job_summary
from kneo_events.schemas import dumps

JSON = dict[str, Any]

JOB_EVENT_TYPES = ("job.completed", "job.failed", "job.cancelled")
# Every run's end (a job is a run too, so a job's end is both a run.* and a job.* event).
RUN_EVENT_TYPES = ("run.succeeded", "run.failed", "run.cancelled", "run.expired", "run.timed_out")
WEBHOOK_EVENT_TYPES = JOB_EVENT_TYPES + RUN_EVENT_TYPES
WEBHOOK_ID = re.compile(r"^wh_[0-9a-f]{16}$")
SECRET_MIN_CHARS = 16
SECRET_MAX_CHARS = 256
URL_MAX_CHARS = 2048
SIGNATURE_HEADER = "X-Knify-Signature"
TIMESTAMP_HEADER = "X-Knify-Timestamp"
DELIVERY_HEADER = "X-Knify-Delivery"
EVENT_HEADER = "X-Knify-Event"


def new_webhook_id() -> str:
    """``wh_<16 hex>``."""
    return f"wh_{secrets.token_hex(8)}"


def check_url(url: str) -> str:
    """The problem with a webhook URL, or ``""`` when it is usable (http/https, a host, no credentials)."""
    if len(url) > URL_MAX_CHARS:
        return f"url is longer than {URL_MAX_CHARS} characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"url is malformed: {exc}"
    if parts.scheme not in ("http", "https"):
        return "url must start with http:// or https://"
    if not parts.hostname:
        return "url has no host"
    if parts.username is not None or parts.password is not None:
        return "url must not carry credentials (user:password@); sign deliveries with the secret instead"
    if parts.fragment:
        return "url must not have a #fragment"
    if port == 0:
        return "url has port 0"
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        return "url contains whitespace or control characters"
    return ""


def address_refusal(address: str) -> str:
    """Why deliveries may not go to ``address`` (an IP), or ``""`` when it is a public (global unicast) address.

    IPv4 addresses embedded in IPv6 ones (mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``)
    are judged as the IPv4 address they reach; Teredo and every other non-global range are refused.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"{address!r} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded: ipaddress.IPv4Address | None = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = address_refusal(str(embedded))
            return f"{ip} embeds {embedded}: {inner}" if inner else ""
        if ip.teredo is not None:
            return f"{ip} is a Teredo address"
    for attr, what in _KINDS:
        if getattr(ip, attr, False):
            return f"{ip} is a {what} address"
    if not ip.is_global:
        return f"{ip} is not a global address"
    return ""


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_KINDS = (
    ("is_unspecified", "unspecified"),
    ("is_loopback", "loopback"),
    ("is_link_local", "link-local"),
    ("is_multicast", "multicast"),
    ("is_private", "private"),
    ("is_reserved", "reserved"),
    ("is_site_local", "site-local"),
)


def sign(body: bytes, secret: str) -> str:
    """The ``X-Knify-Signature`` value: ``sha256=<hex HMAC-SHA256 of the raw body with the secret>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def delivery_id(webhook_id: str, source_event_id: uuid.UUID, event_type: str) -> str:
    """The id of the delivery of one source event to one webhook as one type: stable, so a replay yields the same."""
    digest = hashlib.sha256(f"{webhook_id}|{source_event_id}|{event_type}".encode()).hexdigest()
    return f"whd_{digest[:24]}"


def backoff_seconds(attempt: int, base: float, cap: float, jitter: float) -> float:
    """Wait before the attempt after ``attempt`` (1-based): ``min(cap, base * 2**(attempt-1))`` scaled by ``jitter``.

    ``jitter`` is drawn from [0.5, 1] by the caller ("equal jitter": never less than half the exponential step, so
    a failing receiver still sees the backoff grow, while copies that failed together spread out).
    """
    step: float = base * 2.0 ** max(0, attempt - 1)
    return min(cap, step) * jitter


def webhook_types(event_type: str, state: JSON) -> list[str]:
    """The webhook event types a run's terminal event is delivered as (its ``run.*`` type, plus ``job.*`` for a job)."""
    if event_type not in TERMINAL_JOB_EVENTS:
        return []
    types = [event_type]
    if is_job(state):
        types.append(TERMINAL_JOB_EVENTS[event_type])
    return types


def run_summary(state: JSON) -> JSON:
    """A run as ``run.*`` deliveries carry it (fetch ``GET /v1/runs/{run_id}`` for its output)."""
    return {
        k: state.get(k)
        for k in (
            "run_id",
            "status",
            "face",
            "workflow_name",
            "agent_name",
            "created_at",
            "started_at",
            "finished_at",
            "error",
        )
    }


def delivery_body(
    webhook_type: str, state: JSON, source_event_id: uuid.UUID, occurred_at: datetime, delivery: str
) -> bytes:
    """The exact bytes a delivery sends (and signs) on every attempt."""
    body: JSON = {"type": webhook_type, "delivery_id": delivery, "event_id": str(source_event_id)}
    body["occurred_at"] = occurred_at.isoformat()
    if webhook_type.startswith("job."):
        job = job_summary(state)
        body.update(job_id=job["job_id"], status=job["status"], job=job)
    else:
        body.update(run_id=state.get("run_id"), status=state.get("status"), run=run_summary(state))
    return dumps(body)
