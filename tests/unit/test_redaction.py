"""Redaction of secrets and personal data in nested values and inline text."""

from __future__ import annotations

import pytest

from kneo_events.redaction import REDACTED, redact, redact_text

SECRETS = [
    "Bearer abcdefghijklmnop1234",
    "sk-proj-ABCDEFGHIJKLMNOPQRSTUV",
    "sk-ant-api03-ABCDEFGHIJKLMNOPQRST",
    "ghp_ABCDEFGHIJKLMNOPQRSTUVWXYZ012345",
    "AKIAABCDEFGHIJKLMNOP",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "jane.doe@example.com",
    "123-45-6789",
    "4111 1111 1111 1111",
    "5500-0000-0000-0004",
]


@pytest.mark.parametrize("secret", SECRETS)
def test_inline_secrets_are_redacted(secret: str) -> None:
    out = redact_text(f"before {secret} after")
    assert secret not in out and REDACTED in out and out.startswith("before ")


def test_urls_keep_user_and_host_but_lose_the_password() -> None:
    assert redact_text("postgresql://kneo:hunter2@db:5432/kneo") == f"postgresql://kneo:{REDACTED}@db:5432/kneo"
    assert redact_text("password=hunter2&x=1") == f"password={REDACTED}&x=1"


def test_keys_redact_whole_values_recursively_without_mutating() -> None:
    src = {
        "input": "call me at jane@example.com",
        "metadata": {"api_key": "abc", "nested": [{"Authorization": "Bearer zzz"}, {"password": 123}]},
        "headers": {"X-Kneo-Api-Key": "k"},
        "max_tokens": 100,
        "ok": "plain text 1234",
    }
    out = redact(src)
    assert out["input"] == f"call me at {REDACTED}"
    assert out["metadata"]["api_key"] == REDACTED
    assert out["metadata"]["nested"] == [{"Authorization": REDACTED}, {"password": REDACTED}]
    assert out["headers"]["X-Kneo-Api-Key"] == REDACTED
    assert out["max_tokens"] == 100 and out["ok"] == "plain text 1234"
    assert src["metadata"]["api_key"] == "abc"  # input untouched


def test_numbers_that_fail_luhn_stay() -> None:
    assert redact_text("order 1234 5678 9012 3456") == "order 1234 5678 9012 3456"


def test_json_text_secret_values() -> None:
    line = '{"event": "x", "api_key": "abc123", "user_password": "hunter2", "max_tokens": 5}'
    out = redact_text(line)
    assert "abc123" not in out and "hunter2" not in out and '"max_tokens": 5' in out
