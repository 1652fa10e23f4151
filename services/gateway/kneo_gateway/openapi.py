"""The OpenAPI document of the Kneo face, and the committed copy in docs/openapi.json.

Regenerate with ``python -m kneo_gateway.openapi`` (a test fails when the committed copy is stale).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson

from kneo_events.settings import Settings

DOC = Path(__file__).resolve().parents[3] / "docs" / "openapi.json"


def build_openapi() -> dict[str, Any]:
    """The OpenAPI document, built from the app's routes (no servers needed)."""
    from kneo_gateway.app import create_app

    app = create_app(SimpleNamespace(settings=Settings(), bus=None, store=None))  # type: ignore[arg-type]
    doc: dict[str, Any] = app.openapi()
    return doc


def render() -> bytes:
    """The document as committed: sorted keys, two-space indent, trailing newline."""
    return orjson.dumps(build_openapi(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def main() -> None:
    """Write docs/openapi.json (or the path given)."""
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DOC
    target.write_bytes(render())
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
