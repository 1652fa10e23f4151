"""The webhooks service: signed delivery to subscribers (arrives with the Jobs-face issue).

Today it declares its durable consumer, acknowledges commands (none are defined for it yet) and stops cleanly.
"""

from __future__ import annotations

from kneo_events.service import WorkerService

SERVICE = "webhooks"


class WebhooksService(WorkerService):
    """Consumes ``kneo.cmd.webhooks.*``."""

    name = SERVICE
