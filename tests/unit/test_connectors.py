"""The built-in connectors read a local mailbox / calendar through the tool's granted path only."""

from __future__ import annotations

import mailbox
from email.message import EmailMessage
from pathlib import Path

import pytest

from kneo_runner.connectors.gmail import search_emails
from kneo_runner.connectors.google_calendar import list_events
from kneo_runner.tools import FilesystemNotAllowed, Permissions, ToolContext

NOW = "2026-11-26T09:00:00+00:00"
ICS = """BEGIN:VCALENDAR
VERSION:2.0
PRODID:-//kneo tests//EN
BEGIN:VEVENT
UID:1@kneo
SUMMARY:Design review
DTSTART:20261127T100000Z
DTEND:20261127T110000Z
LOCATION:Room 4
ATTENDEE:mailto:ana@example.com
END:VEVENT
BEGIN:VEVENT
UID:2@kneo
SUMMARY:Budget sync
DTSTART:20261127T150000Z
DTEND:20261127T153000Z
END:VEVENT
BEGIN:VEVENT
UID:3@kneo
SUMMARY:Last month's offsite
DTSTART;VALUE=DATE:20261020
END:VEVENT
END:VCALENDAR
"""


def _ctx(root: Path) -> ToolContext:
    return ToolContext("t", Permissions(read_roots=(root.resolve(),)), root, 5.0)


def _mail(path: Path, maildir: bool = False) -> Path:
    box: mailbox.Mailbox = mailbox.Maildir(path) if maildir else mailbox.mbox(path)
    for sender, subject, date, body in [
        ("Ana <ana@example.com>", "Q4 budget", "Mon, 23 Nov 2026 10:00:00 +0000", "The budget is approved."),
        ("Bo <bo@example.com>", "Lunch?", "Tue, 24 Nov 2026 12:00:00 +0000", "Tacos at noon"),
        ("Cy <cy@example.com>", "Old news", "Mon, 02 Nov 2026 08:00:00 +0000", "Budget draft v1"),
    ]:
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"], msg["Date"] = sender, "me@example.com", subject, date
        msg.set_content(body)
        box.add(msg)
    box.close()
    return path


@pytest.mark.parametrize("maildir", [False, True])
def test_search_emails_filters_by_words_and_date_newest_first(tmp_path: Path, maildir: bool) -> None:
    box = _mail(tmp_path / ("Mail" if maildir else "mail.mbox"), maildir)
    ctx = _ctx(tmp_path)
    everything = search_emails(ctx, str(box), now=NOW)
    assert [e["subject"] for e in everything["emails"]] == ["Lunch?", "Q4 budget", "Old news"]
    budget = search_emails(ctx, str(box), query="budget", now=NOW)
    assert [e["subject"] for e in budget["emails"]] == ["Q4 budget", "Old news"]
    last_week = search_emails(ctx, str(box), query="BUDGET", days=7, now=NOW)
    assert [e["from"] for e in last_week["emails"]] == ["Ana <ana@example.com>"]
    assert last_week["emails"][0]["snippet"] == "The budget is approved."
    assert search_emails(ctx, str(box), since="2026-11-24", now=NOW)["count"] == 1
    assert search_emails(ctx, str(box), limit=1, now=NOW)["total_matches"] == 3


def test_calendar_events_in_range_soonest_first(tmp_path: Path) -> None:
    (tmp_path / "cal.ics").write_text(ICS)
    ctx = _ctx(tmp_path)
    tomorrow = list_events(ctx, str(tmp_path / "cal.ics"), start="2026-11-27", end="2026-11-28")
    assert [e["summary"] for e in tomorrow["events"]] == ["Design review", "Budget sync"]
    assert tomorrow["events"][0]["location"] == "Room 4" and tomorrow["events"][0]["attendees"] == ["ana@example.com"]
    week = list_events(ctx, str(tmp_path), now=NOW)  # a folder of .ics files, the next 7 days
    assert week["count"] == 2
    assert list_events(ctx, str(tmp_path), query="budget", now=NOW)["events"][0]["summary"] == "Budget sync"
    october = list_events(ctx, str(tmp_path), start="2026-10-01", end="2026-11-01")
    assert [e["summary"] for e in october["events"]] == ["Last month's offsite"]


def test_paths_outside_the_grant_are_refused(tmp_path: Path) -> None:
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    (outside / "cal.ics").write_text(ICS)
    box = _mail(outside / "mail.mbox")
    ctx = _ctx(inside)
    with pytest.raises(FilesystemNotAllowed):
        list_events(ctx, str(outside / "cal.ics"))
    with pytest.raises(FilesystemNotAllowed):
        search_emails(ctx, str(box))
    (inside / "link.ics").symlink_to(outside / "cal.ics")
    with pytest.raises(FilesystemNotAllowed):
        list_events(ctx, str(inside / "link.ics"))


def test_recurring_events_expand_inside_the_range(tmp_path: Path) -> None:
    (tmp_path / "weekly.ics").write_text(
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//kneo tests//EN\r\n"
        "BEGIN:VEVENT\r\nUID:w@kneo\r\nSUMMARY:Team standup\r\n"
        "DTSTART:20260105T090000Z\r\nDTEND:20260105T091500Z\r\nRRULE:FREQ=WEEKLY;BYDAY=MO,WE\r\n"
        "EXDATE:20261202T090000Z\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    )
    ctx = _ctx(tmp_path)
    week = list_events(ctx, str(tmp_path / "weekly.ics"), start="2026-11-30", end="2026-12-07")
    assert [e["start"] for e in week["events"]] == ["2026-11-30T09:00:00+00:00"]  # Wednesday's is an EXDATE
    assert week["events"][0]["recurring"] is True and week["events"][0]["end"] == "2026-11-30T09:15:00+00:00"
    later = list_events(ctx, str(tmp_path / "weekly.ics"), start="2026-12-07", end="2026-12-10")
    assert len(later["events"]) == 2
