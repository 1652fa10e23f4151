"""How a checkpoint's state is stored (seeds/004 "Checkpoint storage and payload limits").

The runner packs the state of every ``checkpoint.saved`` before it is appended: kept as is below
``KNEO_SERV_CHECKPOINT_COMPRESS_BYTES`` (of JSON), zlib-compressed (base64 in the JSONB) at or above it, and, when even
the compressed form exceeds ``KNEO_SERV_CHECKPOINT_MAX_BYTES``, replaced by a bounded preview (strings cut to
``_PREVIEW_CHARS``, lists and dicts to ``_MAX_LIST_ITEMS`` / ``_MAX_DICT_ITEMS``) that says how big the original was.
Readers call :func:`unpack`. Run state itself is the fold of the log and never depends on these payloads.
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

JSON = dict[str, Any]
ENCODING = "zlib+base64"


@dataclass(frozen=True)
class CheckpointLimits:
    """The seed's checkpoint limits (defaults are the seed's)."""

    compress_bytes: int = 65_536
    max_bytes: int = 1_048_576
    preview_chars: int = 1200
    max_list_items: int = 20
    max_dict_items: int = 50

    @classmethod
    def from_settings(cls, settings: Any) -> CheckpointLimits:
        """Read ``checkpoint_*`` settings (any missing one keeps its default)."""
        d = cls()
        return cls(
            compress_bytes=int(getattr(settings, "checkpoint_compress_bytes", d.compress_bytes)),
            max_bytes=int(getattr(settings, "checkpoint_max_bytes", d.max_bytes)),
            preview_chars=int(getattr(settings, "checkpoint_preview_chars", d.preview_chars)),
            max_list_items=int(getattr(settings, "checkpoint_max_list_items", d.max_list_items)),
            max_dict_items=int(getattr(settings, "checkpoint_max_dict_items", d.max_dict_items)),
        )


def preview_value(value: Any, limits: CheckpointLimits) -> Any:
    """A bounded copy: strings cut to ``preview_chars`` (plus "…"), lists and dicts cut to their item limits."""
    if isinstance(value, str):
        return value if len(value) <= limits.preview_chars else value[: limits.preview_chars] + "…"
    if isinstance(value, list):
        return [preview_value(v, limits) for v in value[: limits.max_list_items]]
    if isinstance(value, dict):
        return {k: preview_value(v, limits) for k, v in list(value.items())[: limits.max_dict_items]}
    return value


def pack(state: JSON, limits: CheckpointLimits) -> JSON:
    """The stored form of a checkpoint state: itself, compressed, or a bounded preview (see the module doc)."""
    raw = orjson.dumps(state)
    if len(raw) < limits.compress_bytes:
        return state
    packed = base64.b64encode(zlib.compress(raw, 6)).decode()
    if len(packed) <= limits.max_bytes:
        return {"_encoding": ENCODING, "bytes": len(raw), "data": packed}
    return {"_truncated": True, "bytes": len(raw), "preview": preview_value(state, limits)}


def unpack(stored: JSON | None) -> JSON:
    """The state of a stored checkpoint (for a truncated one: its preview, with ``_truncated`` and ``_bytes``)."""
    if not stored:
        return {}
    if stored.get("_encoding") == ENCODING:
        state: JSON = orjson.loads(zlib.decompress(base64.b64decode(stored["data"])))
        return state
    if stored.get("_truncated") is True and "preview" in stored:
        return {**stored["preview"], "_truncated": True, "_bytes": stored.get("bytes")}
    return stored
