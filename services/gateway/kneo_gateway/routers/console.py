"""``GET /console``: the web console (seeds/002 "Web Console"), one static page with plain JS and CSS.

The page holds no data and needs no key; the API calls it makes do (the key is typed into the page, kept in
sessionStorage, sent as ``Authorization: Bearer`` on fetch and as ``?access_token=`` on EventSource). It is read
once from the package (kneo_gateway/console/index.html), given the names of every registered event type, and
served with a strict Content-Security-Policy: no external origins (the page must work offline).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import orjson
from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from kneo_events.schemas import event_types

router = APIRouter(tags=["console"])

_CSP = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


_EVENT_TYPES_MARK = b"__KNEO_EVENT_TYPES__"


@lru_cache(maxsize=1)
def console_page() -> bytes:
    """The console's HTML, as packaged, with the event registry filled in (the SSE event names it listens for)."""
    page = resources.files("kneo_gateway").joinpath("console/index.html").read_bytes()
    names = orjson.dumps(event_types()).replace(b"<", b"\\u003c")  # never able to close the <script>
    return page.replace(_EVENT_TYPES_MARK, names)


@router.get("/console", response_class=HTMLResponse, responses={200: {"content": {"text/html": {}}}})
async def console() -> HTMLResponse:
    """The monitoring console: jobs and runs with status, live events and output over SSE, artifacts, filters."""
    return HTMLResponse(
        console_page(),
        headers={
            "Content-Security-Policy": _CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        },
    )
