"""The ``google_calendar`` connector: list events of a local iCalendar file or folder of ``.ics`` files.

Parsed with the maintained ``icalendar`` library; recurring events are not expanded (their first occurrence is
listed). A real deployment points it at an exported or synced calendar (Google Calendar's "secret address in iCal
format", a vdirsyncer folder); the tool entry binds ``calendar_path`` and grants read access to it.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import icalendar

from kneo_runner.tools import ToolContext


def _as_datetime(value: Any) -> datetime | None:
    if value is None:
        return None
    v = value.dt if hasattr(value, "dt") else value
    if isinstance(v, datetime):
        return v if v.tzinfo else v.replace(tzinfo=UTC)
    if isinstance(v, date):
        return datetime.combine(v, time.min, tzinfo=UTC)
    return None


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*.ics") if p.is_file())
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"no calendar at {path} (an .ics file or a folder of them)")


def list_events(
    ctx: ToolContext,
    calendar_path: str,
    start: str | None = None,
    end: str | None = None,
    days: int = 7,
    query: str = "",
    limit: int = 20,
    now: str | None = None,
) -> dict[str, Any]:
    """Calendar events overlapping [start, end) (ISO dates or times; default: from now for ``days`` days), soonest
    first; ``query`` keeps events whose summary, location or description contain all its words."""
    root = ctx.resolve(calendar_path)
    reference = datetime.fromisoformat(now) if now else datetime.now(UTC)
    reference = reference if reference.tzinfo else reference.replace(tzinfo=UTC)
    lo = _as_datetime(datetime.fromisoformat(start)) if start else reference
    hi = _as_datetime(datetime.fromisoformat(end)) if end else (lo or reference) + timedelta(days=int(days))
    assert lo is not None and hi is not None
    words = [w.lower() for w in query.split()]
    limit = max(1, min(int(limit), 100))
    found: list[tuple[datetime, dict[str, Any]]] = []
    for f in _files(root):
        cal = icalendar.Calendar.from_ical(ctx.read_bytes(f))
        for ev in cal.walk("VEVENT"):
            begins = _as_datetime(ev.get("DTSTART"))
            if begins is None:
                continue
            ends = _as_datetime(ev.get("DTEND")) or begins
            if ends <= lo or begins >= hi:
                continue
            item = {
                "summary": str(ev.get("SUMMARY", "")),
                "start": begins.isoformat(),
                "end": ends.isoformat(),
                "location": str(ev.get("LOCATION", "")) or None,
                "description": str(ev.get("DESCRIPTION", "")) or None,
                "attendees": [str(a).removeprefix("mailto:") for a in _list(ev.get("ATTENDEE"))],
            }
            text = " ".join(str(item[k] or "") for k in ("summary", "location", "description")).lower()
            if all(w in text for w in words):
                found.append((begins, item))
    found.sort(key=lambda x: x[0])
    events = [item for _, item in found[:limit]]
    return {"events": events, "count": len(events), "range": {"start": lo.isoformat(), "end": hi.isoformat()}}


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]
