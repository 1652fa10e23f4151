"""What the gateway's routes share, built once when the app is created."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from kneo_events.kernel import Kernel
from kneo_events.settings import Settings
from kneo_gateway.auth import Authenticator
from kneo_gateway.idempotency import Idempotency
from kneo_gateway.live import LiveHub
from kneo_gateway.ratelimit import RateLimiter


@dataclass
class Gateway:
    """The gateway's dependencies: settings, the kernel (store + bus), the live hub, auth, limits, idempotency."""

    settings: Settings
    kernel: Kernel
    hub: LiveHub
    auth: Authenticator
    limiter: RateLimiter
    idempotency: Idempotency
    spec_cache: OrderedDict[tuple[bytes, str], dict[str, Any]] = field(default_factory=OrderedDict)
    knap_connectors: dict[str, Any] | None = None  # the Knap face's connectors (KNEO_KNAP_*), loaded on first use
