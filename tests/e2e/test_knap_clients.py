"""The Knap document's three client examples (JavaScript, Python, TypeScript), run as written against
`kneo service serve` with only the base URL swapped, print the events of a run over the fixture calendar."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.e2e.test_cli import cli_env, served  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow
CLIENTS = ROOT / "examples" / "knap" / "clients"
TSC = ROOT / "tests" / "clients" / "node_modules" / ".bin" / "tsc"
NODE = shutil.which("node")


def _run(argv: list[str], url: str) -> str:
    env = {"PATH": "/usr/bin:/bin", "KNEO_BASE_URL": url, "HOME": str(ROOT)}
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _check_python_style(out: str) -> None:
    events = [ast.literal_eval(line.removeprefix("Event: ")) for line in out.splitlines() if line.startswith("Event: ")]
    types = [e["type"] for e in events]
    assert types[:2] == ["tool_execution", "tool_result"] and types[-1] == "done", types
    assert events[0]["tool_name"] == "google_calendar" and events[1]["queryUuid"] == events[0]["queryUuid"]
    assert {"Team standup"} <= {e["summary"] for e in events[1]["result"]["events"]}  # the fixture calendar
    assert "message_chunk" in types and events[-1]["chatId"].startswith("chat_")
    assert out.rstrip().endswith("Execution complete")


def test_the_python_example(served: tuple[str, subprocess.Popen[str], dict[str, str]]) -> None:  # noqa: F811
    url, _, _ = served
    _check_python_style(_run([sys.executable, str(CLIENTS / "knap_client.py")], url))


@pytest.mark.skipif(NODE is None, reason="node is not installed (the JavaScript and TypeScript examples need it)")
def test_the_javascript_and_typescript_examples(
    served: tuple[str, subprocess.Popen[str], dict[str, str]],  # noqa: F811
    tmp_path: Path,
) -> None:
    url, _, _ = served
    assert NODE is not None
    js = _run([NODE, str(CLIENTS / "knap_client.mjs")], url)
    assert "Event: {" in js and "type: 'tool_execution'" in js and "tool_name: 'google_calendar'" in js
    assert "type: 'tool_result'" in js and "type: 'message_chunk'" in js
    assert js.rstrip().endswith("Execution complete")
    assert TSC.exists(), "run `make install` (it installs the TypeScript compiler into tests/clients with npm)"
    subprocess.run(
        [str(TSC), "--target", "es2022", "--module", "es2022", "--lib", "es2022,dom", "--outDir", str(tmp_path),
         str(CLIENTS / "knap_client.ts")],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    (tmp_path / "package.json").write_text('{"type": "module"}')
    ts = _run([NODE, str(tmp_path / "knap_client.js")], url)
    lines = ts.splitlines()
    assert lines[0] == "Tool google_calendar: running"
    assert any(line.startswith("Agent: On What meetings do I have tomorrow?") for line in lines)
    assert lines[-1] == "Execution complete"


def test_the_knap_cli(served: tuple[str, subprocess.Popen[str], dict[str, str]]) -> None:  # noqa: F811
    import json

    from tests.e2e.test_cli import kneo

    url, _, env = served
    res = kneo(env, "knap", "run", "Summarize my emails", "-t", "gmail", "--json", "--service-url", url)
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines()]
    assert [e["type"] for e in events][:2] == ["tool_execution", "tool_result"] and events[-1]["type"] == "done"
    chat_id = events[-1]["chatId"]
    again = kneo(env, "knap", "run", "Summarize my emails", "-t", "gmail", "--chat-id", chat_id, "--service-url", url)
    assert again.returncode == 0 and "← gmail (cached)" in again.stdout and f"chat {chat_id}" in again.stdout
    chat = kneo(env, "knap", "chat", chat_id, "--service-url", url)
    assert chat.stdout.count("user: Summarize my emails") == 2
    made = kneo(env, "knap", "register", "weekly", "-t", "google_calendar", "--service-url", url)
    knap_uuid = made.stdout.strip()
    assert made.returncode == 0 and len(knap_uuid) == 36
    assert knap_uuid in kneo(env, "knap", "list", "--service-url", url).stdout
    ran = kneo(env, "knap", "run", "my week", "--knap", knap_uuid, "--json", "--service-url", url)
    assert [json.loads(x)["tool_name"] for x in ran.stdout.splitlines() if '"tool_execution"' in x] == [
        "google_calendar"
    ]
    assert kneo(env, "knap", "delete", knap_uuid, "--service-url", url).returncode == 0
    gone = kneo(env, "knap", "run", "x", "--knap", knap_uuid, "--service-url", url)
    assert gone.returncode == 4 and f"Knap {knap_uuid} not found" in gone.stderr
    bad = kneo(env, "knap", "run", "x", "-t", "fax", "--service-url", url)
    assert bad.returncode == 1 and "unknown tool_type 'fax'" in bad.stderr
