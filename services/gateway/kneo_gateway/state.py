"""What the gateway's routes share, built once in the lifespan."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from kneo_events.kernel import Kernel
from kneo_events.settings import Settings
from kneo_gateway.live import LiveHub


@dataclass
class Gateway:
    """The gateway's dependencies: settings, the kernel (store + bus) and the live hub."""

    settings: Settings
    kernel: Kernel
    hub: LiveHub
    spec_cache: OrderedDict[tuple[bytes, str], dict[str, Any]] = field(default_factory=OrderedDict)
