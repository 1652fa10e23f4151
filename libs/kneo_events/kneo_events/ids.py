"""Identifiers in the shapes the seeds use."""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime


def new_run_id(now: datetime | None = None) -> str:
    """A run id ``run_<UTC %Y-%m-%dT%H:%M:%S>_<8 hex>`` (the seed's shape)."""
    ts = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S")
    return f"run_{ts}_{secrets.token_hex(4)}"


def new_event_id() -> uuid.UUID:
    """A random event id (also the JetStream ``Nats-Msg-Id``)."""
    return uuid.uuid4()


def new_request_id() -> str:
    """A request id for requests that did not bring one."""
    return uuid.uuid4().hex


def run_stream(run_id: str) -> str:
    """The event stream of one run."""
    return f"run-{run_id}"
