"""deploy/kneo.env.example lists every environment variable the settings read (operators copy it)."""

from __future__ import annotations

import re

from kneo_events.settings import Settings
from tests.conftest import ROOT


def test_every_setting_is_in_the_env_example() -> None:
    text = (ROOT / "deploy" / "kneo.env.example").read_text()
    missing = []
    for name, field in Settings.model_fields.items():
        choices = getattr(field.validation_alias, "choices", None) or [f"KNEO_{name.upper()}"]
        names = [c for c in choices if isinstance(c, str)]
        if not any(re.search(rf"^# {re.escape(n)}=", text, re.M) for n in names):
            missing.append(names[0])
    assert missing == []
