"""The ``gmail`` connector: search a local mailbox (an mbox file or a Maildir folder) with the standard library.

A real deployment points it at an export or a synced copy of the account (e.g. `mbsync`/`offlineimap` Maildir, a
Google Takeout mbox); the tool entry binds ``mailbox`` and grants read access to it.
"""

from __future__ import annotations

import email.errors
import email.header
import email.utils
import mailbox
from datetime import UTC, datetime, timedelta
from email.message import Message
from pathlib import Path
from typing import Any

from kneo_runner.tools import ToolContext

SNIPPET_CHARS = 240


def _text(value: Any) -> str:
    if value is None:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(str(value))))
    except (UnicodeDecodeError, LookupError, email.errors.HeaderParseError):
        return str(value)


def _body(msg: Message) -> str:
    part: Message | None = msg
    if msg.is_multipart():
        part = next((p for p in msg.walk() if p.get_content_type() == "text/plain"), None)
    if part is None:
        return ""
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload.decode(part.get_content_charset() or "utf-8", errors="replace")
    return str(part.get_payload())


def _when(msg: Message) -> datetime | None:
    try:
        parsed = email.utils.parsedate_to_datetime(str(msg["Date"]))
    except (TypeError, ValueError, IndexError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _open(path: Path) -> mailbox.Mailbox:
    if path.is_dir():
        return mailbox.Maildir(path, create=False)
    if path.is_file():
        return mailbox.mbox(path, create=False)
    raise FileNotFoundError(f"no mailbox at {path} (an mbox file or a Maildir folder)")


def search_emails(
    ctx: ToolContext,
    mailbox_path: str,
    query: str = "",
    since: str | None = None,
    days: int | None = None,
    limit: int = 10,
    now: str | None = None,
) -> dict[str, Any]:
    """Search the mailbox: messages whose sender, subject or body contain ``query`` (all words, any case), newest first.

    ``since`` (ISO date) or ``days`` (the last N days) restrict the date range; ``limit`` caps the list (max 50).
    """
    path = ctx.resolve(mailbox_path)
    limit = max(1, min(int(limit), 50))
    reference = datetime.fromisoformat(now) if now else datetime.now(UTC)
    if reference.tzinfo is None:
        reference = reference.replace(tzinfo=UTC)
    start: datetime | None = None
    if since:
        start = datetime.fromisoformat(since)
        start = start if start.tzinfo else start.replace(tzinfo=UTC)
    elif days is not None:
        start = reference - timedelta(days=int(days))
    words = [w.lower() for w in query.split()]
    found: list[tuple[datetime, dict[str, Any]]] = []
    box = _open(path)
    try:
        for msg in box:
            when = _when(msg)
            if start is not None and (when is None or when < start):
                continue
            sender, subject, body = _text(msg["From"]), _text(msg["Subject"]), _body(msg)
            haystack = f"{sender}\n{subject}\n{body}".lower()
            if not all(w in haystack for w in words):
                continue
            snippet = " ".join(body.split())
            found.append(
                (
                    when or datetime.min.replace(tzinfo=UTC),
                    {
                        "from": sender,
                        "to": _text(msg["To"]),
                        "subject": subject,
                        "date": when.isoformat() if when else None,
                        "snippet": snippet[:SNIPPET_CHARS] + ("…" if len(snippet) > SNIPPET_CHARS else ""),
                    },
                )
            )
    finally:
        box.close()
    found.sort(key=lambda item: item[0], reverse=True)
    emails = [item for _, item in found[:limit]]
    return {"emails": emails, "count": len(emails), "total_matches": len(found)}
