"""MCP tools through the official SDK: ToolBox against examples/mcp_server.py over stdio and streamable HTTP.

The HTTP server is a subprocess on a free loopback port, polled for readiness and killed at the end of each test.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kneo_compiler.compile import build_plan
from kneo_compiler.models import Spec
from kneo_events.settings import Settings
from kneo_runner.engine import execute_step
from kneo_runner.tools import ToolBox

ROOT = Path(__file__).resolve().parents[2]
SERVER = "examples/mcp_server.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the MCP server exited with {proc.returncode}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            assert time.monotonic() < deadline, f"the MCP server did not listen on {port} within {timeout}s"
            time.sleep(0.05)


class HttpServer:
    """examples/mcp_server.py --http as a subprocess."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.proc = subprocess.Popen(
            [sys.executable, SERVER, "--http", "--port", str(self.port)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_listening(self.port, self.proc)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@pytest.fixture
def http_server() -> Iterator[HttpServer]:
    server = HttpServer()
    try:
        yield server
    finally:
        server.kill()


def settings(**kw: Any) -> Settings:
    return Settings(spec_root=ROOT, **kw)


def stdio(server_id: str = "facts", tools: list[str] | None = None, **kw: Any) -> dict[str, Any]:
    return {
        "id": server_id,
        "transport": "stdio",
        "command": "python",
        "args": [SERVER],
        "env": {},
        "tools": tools,
        **kw,
    }


def http(url: str, server_id: str = "web", tools: list[str] | None = None) -> dict[str, Any]:
    return {"id": server_id, "transport": "http", "url": url, "tools": tools}


def agent(*servers: dict[str, Any], tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"tools": tools or [], "mcp": list(servers)}


# ------------------------------------------------------------------------------------------ list and call


async def test_stdio_lists_and_calls_with_allow_list_and_naming() -> None:
    spec = agent(
        stdio(tools=["lookup_fact", "word_count"]),
        tools=[
            {"id": "fact", "mcp": "facts:lookup_fact", "description": "Look a fact up."},
            {"id": "word_count", "mcp_tool": True},
        ],
    )
    async with ToolBox.for_agent(spec, settings(), ()) as box:
        specs = {s.name: s for s in box.specs()}
        assert set(specs) == {"fact", "word_count"}  # pause is not allow-listed; entries name the others
        assert specs["fact"].description == "Look a fact up."
        assert specs["fact"].parameters["required"] == ["topic"]
        assert specs["word_count"].description == "Count the words in a text."
        fact = await box.call("fact", {"topic": "NATS"})
        count = await box.call("word_count", {"text": "one two three"})
        not_offered = await box.call("facts__pause", {"seconds": 0})
    assert fact.ok and fact.content == "NATS JetStream is a persistent streaming layer built into the NATS server."
    assert count.ok and count.content == "3"
    assert not not_offered.ok and "unknown tool 'facts__pause'" in not_offered.content


async def test_stdio_import_all_uses_server_prefixed_names() -> None:
    async with ToolBox.for_agent(agent(stdio()), settings(), ()) as box:
        names = sorted(s.name for s in box.specs())
        result = await box.call("facts__word_count", {"text": "a b"})
    assert names == ["facts__lookup_fact", "facts__pause", "facts__word_count"]
    assert result.ok and result.content == "2"


async def test_stdio_tool_error_is_an_error_result() -> None:
    async with ToolBox.for_agent(agent(stdio()), settings(), ()) as box:
        unknown_topic = await box.call("facts__lookup_fact", {"topic": "cobol"})
        bad_args = await box.call("facts__word_count", {"words": "a"})
    assert not unknown_topic.ok
    assert "no fact about 'cobol'; known topics: kneo, mcp, nats, postgres" in unknown_topic.content
    assert not bad_args.ok and "text" in bad_args.content and "Field required" in bad_args.content


async def test_spec_params_are_bound_for_mcp_tools() -> None:
    tools = [{"id": "kneo_fact", "mcp": "facts:lookup_fact", "params": {"topic": "kneo"}}]
    async with ToolBox.for_agent(agent(stdio(tools=["lookup_fact"]), tools=tools), settings(), ()) as box:
        (spec,) = box.specs()
        assert spec.parameters["properties"] == {} and spec.parameters.get("required") == []
        result = await box.call("kneo_fact", {"topic": "mcp"})  # the spec's value wins
    assert result.ok and result.content.startswith("Kneo runs AI agents")


async def test_http_lists_and_calls(http_server: HttpServer) -> None:
    async with ToolBox.for_agent(agent(http(http_server.url, tools=["lookup_fact"])), settings(), ()) as box:
        assert [s.name for s in box.specs()] == ["web__lookup_fact"]
        ok = await box.call("web__lookup_fact", {"topic": "postgres"})
        error = await box.call("web__lookup_fact", {"topic": "fortran"})
    assert ok.ok and ok.content == "PostgreSQL is an open-source relational database first released in 1996."
    assert not error.ok and "no fact about 'fortran'" in error.content


async def test_example_spec_calls_its_mcp_tool() -> None:
    text = (ROOT / "examples" / "mcp_tools_workflow.yaml").read_text()
    plan = build_plan(Spec.model_validate(yaml.safe_load(text)), None)
    async with ToolBox.for_agent(plan["agent"], settings(), ("examples",)) as box:
        assert [s.name for s in box.specs()] == ["lookup_fact", "facts__word_count"]
        result = await box.call("lookup_fact", {"topic": "Look up: NATS"})
    assert result.ok and result.content.startswith("NATS JetStream")


async def test_example_run_step_calls_the_mcp_tool_end_to_end() -> None:
    """The dummy provider calls the agent's tools: the example's first step goes through the MCP server."""
    text = (ROOT / "examples" / "mcp_tools_workflow.yaml").read_text()
    plan = build_plan(Spec.model_validate(yaml.safe_load(text)), None)
    chunks: list[str] = []

    async def sink(piece: str, index: int) -> None:
        chunks.append(piece)

    state = {"input": "nats", "step_outputs": {}}
    outcome: Any = await execute_step(plan, state, 0, 1, sink, 60, ("examples",), settings=settings())
    calls = {c.tool: c for c in outcome.tool_calls}
    assert calls["lookup_fact"].ok
    assert calls["lookup_fact"].result_preview.startswith("NATS JetStream")
    assert calls["facts__word_count"].ok
    assert "NATS JetStream" in outcome.output


# ------------------------------------------------------------------------------------------ env references


async def test_stdio_env_references_resolve_from_the_runner_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The server reads nothing from env, so a resolvable reference only has to let it start.
    monkeypatch.setenv("KNEO_TEST_MCP_TOKEN", "s3cret-value")
    spec = agent(stdio(env={"TOKEN": "${env:KNEO_TEST_MCP_TOKEN}", "OTHER": "KNEO_TEST_MCP_TOKEN"}))
    async with ToolBox.for_agent(spec, settings(), ()) as box:
        assert (await box.call("facts__word_count", {"text": "x"})).content == "1"


async def test_missing_env_reference_makes_the_server_unavailable_without_leaking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KNEO_TEST_MCP_MISSING", raising=False)
    spec = agent(stdio(tools=["word_count"], env={"TOKEN": "${KNEO_TEST_MCP_MISSING}"}))
    async with ToolBox.for_agent(spec, settings(), ()) as box:
        (spec_,) = box.specs()  # allow-listed names are still offered, marked unavailable
        result = await box.call("facts__word_count", {"text": "x"})
    assert "unavailable" in spec_.description
    assert not result.ok
    assert "environment variable KNEO_TEST_MCP_MISSING (for TOKEN) is not set" in result.content


# ------------------------------------------------------------------------------------------ timeouts, retries, dead servers


async def test_timeout_and_retries_are_obeyed(http_server: HttpServer, caplog: pytest.LogCaptureFixture) -> None:
    s = settings(mcp_timeout_seconds=0.5, mcp_retries=2, mcp_retry_backoff_seconds=0.0)
    caplog.set_level(logging.WARNING, logger="kneo.runner.tools")
    async with ToolBox.for_agent(agent(http(http_server.url)), s, ()) as box:
        slow = await box.call("web__pause", {"seconds": 30})
        after = await box.call("web__word_count", {"text": "still alive"})  # the session survived
    assert not slow.ok
    assert slow.content == "MCP tool 'pause' timed out after 0.5s (after 3 attempts)"
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert retries == [
        "MCP tool pause (server web): attempt 1/3 failed: MCP tool 'pause' timed out after 0.5s; retrying",
        "MCP tool pause (server web): attempt 2/3 failed: MCP tool 'pause' timed out after 0.5s; retrying",
    ]
    assert after.ok and after.content == "2"


async def test_no_retries_by_default(http_server: HttpServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="kneo.runner.tools")
    async with ToolBox.for_agent(agent(http(http_server.url)), settings(mcp_timeout_seconds=0.3), ()) as box:
        slow = await box.call("web__pause", {"seconds": 30})
    assert slow.content == "MCP tool 'pause' timed out after 0.3s"
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


async def test_connect_timeout_and_retries(caplog: pytest.LogCaptureFixture) -> None:
    # A "server" that never answers the handshake (and exits when its stdin closes, so shutdown is quick).
    silent = {
        "id": "silent",
        "transport": "stdio",
        "command": "python",
        "args": ["-c", "import sys; sys.stdin.read()"],
        "tools": ["x"],
    }
    caplog.set_level(logging.WARNING, logger="kneo.runner.tools")
    s = settings(mcp_timeout_seconds=0.5, mcp_retries=1, mcp_retry_backoff_seconds=0.0)
    async with ToolBox.for_agent(agent(silent), s, ()) as box:
        connects = [r.getMessage() for r in caplog.records]
        result = await box.call("silent__x", {})
    assert connects == ["MCP server silent: cannot connect: timed out connecting after 0.5s"] * 2
    assert not result.ok
    assert result.content == ("MCP server 'silent' is unavailable: timed out connecting after 0.5s (after 2 attempts)")


async def test_tool_errors_are_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="kneo.runner.tools")
    async with ToolBox.for_agent(agent(stdio()), settings(mcp_retries=3, mcp_retry_backoff_seconds=0.0), ()) as box:
        result = await box.call("facts__lookup_fact", {"topic": "cobol"})
    assert not result.ok and "attempts" not in result.content
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


async def test_server_that_exits_is_unavailable_not_a_crash(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="kneo.runner.tools")
    dead = {"id": "dead", "transport": "stdio", "command": "python", "args": ["-c", "pass"], "tools": ["x"]}
    s = settings(mcp_retries=1, mcp_retry_backoff_seconds=0.0)
    async with ToolBox.for_agent(agent(dead, stdio(tools=["word_count"])), s, ()) as box:
        names = sorted(spec.name for spec in box.specs())
        result = await box.call("dead__x", {})
        alive = await box.call("facts__word_count", {"text": "a b c d"})
    assert names == ["dead__x", "facts__word_count"]
    assert not result.ok
    assert result.content.startswith("MCP server 'dead' is unavailable: the server closed the connection")
    assert result.content.endswith("(after 2 attempts)")
    connects = [r for r in caplog.records if r.getMessage().startswith("MCP server dead: cannot connect")]
    assert len(connects) == 2 + 2  # two at start (1 + 1 retry), then a reconnect per call attempt
    assert alive.ok and alive.content == "4"  # one dead server does not take the others down


def _stdio_servers_of_this_process() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and SERVER.encode() in cmdline:
            found.append(int(entry.name))
    return found


async def test_cancelled_step_mid_call_stops_the_stdio_server() -> None:
    assert _stdio_servers_of_this_process() == []
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(3):  # the engine bounds a step the same way
            async with ToolBox.for_agent(agent(stdio()), settings(), ()) as box:
                assert _stdio_servers_of_this_process() != []
                await box.call("facts__pause", {"seconds": 60})
    deadline = time.monotonic() + 15
    while _stdio_servers_of_this_process():
        assert time.monotonic() < deadline, "the stdio MCP server outlived its ToolBox"
        await asyncio.sleep(0.05)


async def test_missing_command_is_unavailable() -> None:
    gone = {"id": "gone", "transport": "stdio", "command": "/nonexistent/mcp-server", "tools": ["x"]}
    async with ToolBox.for_agent(agent(gone), settings(), ()) as box:
        result = await box.call("gone__x", {})
    assert not result.ok and "MCP server 'gone' is unavailable" in result.content
    assert "No such file or directory" in result.content


async def test_http_server_killed_mid_session(http_server: HttpServer) -> None:
    async with ToolBox.for_agent(agent(http(http_server.url)), settings(mcp_timeout_seconds=5), ()) as box:
        assert (await box.call("web__word_count", {"text": "a b"})).content == "2"
        http_server.kill()
        result = await box.call("web__word_count", {"text": "a b c"})
    assert not result.ok
    assert "MCP server 'web'" in result.content


async def test_unreachable_http_server_at_start() -> None:
    url = f"http://127.0.0.1:{_free_port()}/mcp"
    async with ToolBox.for_agent(agent(http(url, tools=["word_count"])), settings(mcp_timeout_seconds=5), ()) as box:
        (spec,) = box.specs()
        result = await box.call("web__word_count", {"text": "a"})
    assert spec.name == "web__word_count" and "unavailable" in spec.description
    assert not result.ok and "MCP server 'web' is unavailable" in result.content
