"""The ``google_calendar`` connector: list events of a local iCalendar file or folder of ``.ics`` files.

Parsed with the maintained ``icalendar`` library; recurring events (``RRULE``) are expanded with ``dateutil``'s
rrule into the occurrences inside the range (``EXDATE`` respected). A real deployment points it at an exported or
synced calendar (Google Calendar's "secret address in iCal format", a vdirsyncer folder); the tool entry binds
``calendar_path`` and grants read access to it.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import icalendar
from dateutil import rrule

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
            for start_at in _occurrences(ev, begins, ends - begins, lo, hi):
                end_at = start_at + (ends - begins)
                if end_at <= lo or start_at >= hi:
                    continue
                item = {
                    "summary": str(ev.get("SUMMARY", "")),
                    "start": start_at.isoformat(),
                    "end": end_at.isoformat(),
                    "location": str(ev.get("LOCATION", "")) or None,
                    "description": str(ev.get("DESCRIPTION", "")) or None,
                    "attendees": [str(a).removeprefix("mailto:") for a in _list(ev.get("ATTENDEE"))],
                    "recurring": "RRULE" in ev,
                }
                text = " ".join(str(item[k] or "") for k in ("summary", "location", "description")).lower()
                if all(w in text for w in words):
                    found.append((start_at, item))
                if len(found) > 10_000:  # a runaway rule: enough
                    break
    found.sort(key=lambda x: x[0])
    events = [item for _, item in found[:limit]]
    return {"events": events, "count": len(events), "range": {"start": lo.isoformat(), "end": hi.isoformat()}}


def _occurrences(ev: Any, begins: datetime, length: timedelta, lo: datetime, hi: datetime) -> list[datetime]:
    """The starts of an event inside [lo - length, hi): itself, or its recurrences."""
    rule = ev.get("RRULE")
    if rule is None:
        return [begins]
    text = rule.to_ical().decode()
    # UNTIL must match DTSTART's kind (aware): icalendar gives UTC "Z" values; dateutil parses them aware.
    starts = rrule.rrulestr(text, dtstart=begins).between(lo - length, hi, inc=True)
    skipped = {_as_datetime(d) for ex in _list(ev.get("EXDATE")) for d in getattr(ex, "dts", [])}
    return [s for s in starts if s not in skipped]


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]
