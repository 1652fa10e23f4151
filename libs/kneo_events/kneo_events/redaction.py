"""Redaction: applied before anything leaves a service, is logged, or is written to audit.

Two layers: values under secret-like keys are replaced whole; inside any string, inline secrets (bearer tokens,
API-key shapes, passwords in URLs, ``key=value`` secrets), emails, SSNs and card numbers (Luhn-checked) are
replaced. The result is a new structure; the input is never modified.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "[REDACTED]"

_SECRET_KEY = re.compile(
    r"(pass(word|wd|phrase)?|secret|token|api[_-]?key|apikey|access[_-]?key|private[_-]?key|client[_-]?secret|"
    r"authori[sz]ation|auth[_-]?header|credential|cookie|session[_-]?id|signature|x-kneo-api-key|dsn|ssn)",
    re.IGNORECASE,
)
# Keys that contain a secret-looking word but are known to be harmless metadata.
_SAFE_KEYS = frozenset(
    {
        "token_count",
        "tokens",
        "max_tokens",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "idempotency_key",
        "key_count",
        "present",
        "env_var",
        "secret_ref",
        "name",
    }
)

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(?i)\b(bearer|basic|token)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 " + REDACTED),
    (re.compile(r"(?i)\b(sk|pk|rk)-[A-Za-z0-9_-]{16,}"), REDACTED),  # OpenAI / Stripe style keys
    (re.compile(r"\bsk-ant-[A-Za-z0-9_-]{16,}"), REDACTED),
    (re.compile(r"\b(ghp|gho|ghu|ghs|github_pat|glpat|xox[abpr])[-_][A-Za-z0-9_-]{16,}"), REDACTED),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), REDACTED),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), REDACTED),  # JWT
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/@]+):[^\s@/]+@"), r"\1:" + REDACTED + "@"),  # user:pass@ in URLs
    (
        re.compile(r"(?i)\b(password|passwd|pwd|secret|token|api[_-]?key|apikey)\s*[=:]\s*[^\s,;&\"']+"),
        r"\1=" + REDACTED,
    ),
    (  # "password": "…" inside JSON text (log lines, stored payload previews)
        re.compile(
            r'(?i)("(?:[a-z_-]*(?:password|passwd|secret|token|api[_-]?key|apikey|authorization)[a-z_-]*)"\s*:\s*)"[^"]*"'
        ),
        r'\1"' + REDACTED + '"',
    ),
    (re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b"), REDACTED),  # email
    (re.compile(r"\b\d{3}-\d{2}-\d{4}\b"), REDACTED),  # US SSN
]
_CARD = re.compile(r"\b(?:\d[ -]?){13,19}\b")
# Every pattern above needs one of these; text without any (most prose) skips the eleven scans.
_MAYBE = re.compile(
    r"[@=]|://|\d{3}|(?i:bearer|basic|token|sk-|pk-|rk-|gh[pousr]_|github_pat|glpat|xox[abpr]|akia|eyj|pass|pwd|"
    r"secret|api[_-]?key|apikey|authori)"
)


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"[ -]", "", match.group(0))
    return REDACTED if 13 <= len(digits) <= 19 and _luhn_ok(digits) else match.group(0)


def redact_text(text: str) -> str:
    """Replace inline secrets and personal data inside one string."""
    if not _MAYBE.search(text):
        return text
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return _CARD.sub(_card, text)


def is_secret_key(key: str) -> bool:
    """True when a mapping key names a secret (its value is redacted whole)."""
    return key.lower() not in _SAFE_KEYS and bool(_SECRET_KEY.search(key))


def redact(value: Any) -> Any:
    """A redacted copy of a JSON-like value (dicts, lists, strings, scalars)."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if isinstance(k, str) and is_secret_key(k) and v not in (None, "", [], {}) else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value
