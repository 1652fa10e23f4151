"""Where a request's spec comes from: inline (YAML text or a JSON object) or ``spec_path`` under the spec root.

Shared by the runs and spec routes. Limits: ``KNEO_SERV_MAX_INLINE_SPEC_BYTES`` (also for files),
``KNEO_SERV_MAX_PATH_CHARS``; a path may not leave ``KNEO_SERV_SPEC_ROOT`` (default: the working directory).
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import anyio
import orjson
import yaml

from kneo_events.errors import InvalidRequest, PayloadTooLarge
from kneo_gateway.state import Gateway

SpecSource = str | bytes | dict[str, Any]


async def read_source(
    gw: Gateway, spec: str | dict[str, Any] | None, spec_path: str | None
) -> tuple[SpecSource, str | None, str]:
    """The spec as given (text, bytes of a file, or an object), its path (if any) and the request field it came from."""
    s = gw.settings
    if spec is not None and spec_path is not None:
        raise InvalidRequest("give either spec or spec_path, not both")
    if spec is not None:
        size = len(spec.encode("utf-8", "surrogatepass")) if isinstance(spec, str) else len(orjson.dumps(spec))
        if size > s.max_inline_spec_bytes:
            raise PayloadTooLarge(
                f"spec exceeds {s.max_inline_spec_bytes} bytes", field="spec", limit=s.max_inline_spec_bytes
            )
        return spec, None, "spec"
    if spec_path is None:
        raise InvalidRequest("a spec is needed: give spec_path or an inline spec", field="spec_path")
    if len(spec_path) > s.max_path_chars:
        raise PayloadTooLarge(
            f"spec_path exceeds {s.max_path_chars} characters", field="spec_path", limit=s.max_path_chars
        )
    data = await anyio.to_thread.run_sync(_read_file, gw, spec_path)  # file I/O off the event loop
    return data, spec_path, "spec_path"


def _read_file(gw: Gateway, spec_path: str) -> bytes:
    s = gw.settings
    root = (s.spec_root or Path.cwd()).resolve()
    try:
        path = (root / spec_path).resolve()
    except (OSError, ValueError):
        raise InvalidRequest("spec_path is not a usable path", field="spec_path") from None
    if not path.is_relative_to(root):
        raise InvalidRequest(f"spec_path must stay inside the service's spec root {root}", field="spec_path")
    try:
        if path.stat().st_size > s.max_inline_spec_bytes:
            raise PayloadTooLarge(
                f"spec file exceeds {s.max_inline_spec_bytes} bytes", field="spec_path", limit=s.max_inline_spec_bytes
            )
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise InvalidRequest(f"spec_path not found: {spec_path}", field="spec_path") from None
    except (OSError, ValueError) as exc:
        raise InvalidRequest(
            f"spec_path unreadable: {getattr(exc, 'strerror', None) or exc}", field="spec_path"
        ) from None


async def load_spec(
    gw: Gateway, spec: str | dict[str, Any] | None, spec_path: str | None
) -> tuple[dict[str, Any], str | None]:
    """The spec as a mapping (parsed, memoized) and its path; 4xx in the Kneo envelope when it can't be had."""
    source, path, field = await read_source(gw, spec, spec_path)
    if isinstance(source, dict):
        return source, path
    return parse_spec(gw, source, field), path


class _NoAliasLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases are not allowed in specs", self.peek_event().start_mark
            )
        return super().compose_node(parent, index)


def parse_spec(gw: Gateway, text: str | bytes, field: str) -> dict[str, Any]:
    """Parse spec YAML, memoized per text (parsing in pure Python costs ~1 ms; clients resend the same specs)."""
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    key = (hashlib.blake2b(raw, digest_size=16).digest(), field)
    cached = gw.spec_cache.get(key)
    if cached is not None:
        gw.spec_cache.move_to_end(key)
        return copy.deepcopy(cached)
    data = _parse_uncached(text, field)
    gw.spec_cache[key] = data
    if len(gw.spec_cache) > 256:
        gw.spec_cache.popitem(last=False)
    return copy.deepcopy(data)


def _parse_uncached(text: str | bytes, field: str) -> dict[str, Any]:
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        data = yaml.load(text, Loader=_NoAliasLoader)
    except UnicodeDecodeError:
        raise InvalidRequest("the spec is not UTF-8 text", field=field) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise InvalidRequest(f"the spec is not valid YAML{where}: {problem}", field=field) from None
    if not isinstance(data, dict):
        raise InvalidRequest("the spec must be a YAML mapping", field=field)
    return data
