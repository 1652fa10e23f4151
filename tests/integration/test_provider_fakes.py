"""The openai and anthropic providers against local fake servers that speak each API's HTTP protocol.

Each fake is a plain asyncio HTTP/1.1 server on a free 127.0.0.1 port: every request is recorded and answered with
the next scripted reply (a streamed SSE body, an error status, or no answer at all until the test ends). The SDKs
are the real ones, unpatched; the steps run through the runner's engine (and, last, the whole platform over HTTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from kneo_compiler.spec import compile_spec
from kneo_events.schemas import new_event
from kneo_events.settings import Settings
from kneo_runner.domain import StepErrored, StepSucceeded
from kneo_runner.engine import execute_step

KEY_ENV = "FAKE_LLM_TEST_API_KEY"


@dataclass
class Reply:
    status: int = 200
    events: list[tuple[str | None, Any]] = field(default_factory=list)  # (SSE event name, data)
    hang: bool = False  # never answer (a timeout)


class FakeLLM:
    """A scripted loopback HTTP server (one reply per request, in order)."""

    def __init__(self) -> None:
        self.script: list[Reply] = []
        self.requests: list[dict[str, Any]] = []
        self.release = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = (await reader.readline()).decode()
            headers: dict[str, str] = {}
            while (line := (await reader.readline()).decode().strip()) != "":
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append(
                {"path": request_line.split()[1], "headers": headers, "body": json.loads(body or b"{}")}
            )
            reply = self.script.pop(0) if self.script else Reply(500, [(None, {"error": "script ran out"})])
            if reply.hang:
                await self.release.wait()
                return
            if reply.status != 200:
                payload = json.dumps({"error": {"type": "fake_error", "message": f"status {reply.status}"}}).encode()
                writer.write(
                    f"HTTP/1.1 {reply.status} Fake\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
                return
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                b"connection: close\r\n\r\n"
            )
            for name, data in reply.events:
                text = data if isinstance(data, str) else json.dumps(data)
                frame = (f"event: {name}\n" if name else "") + f"data: {text}\n\n"
                raw = frame.encode()
                writer.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


@pytest.fixture
async def fake() -> AsyncIterator[FakeLLM]:
    server = FakeLLM()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# ---------------------------------------------------------------- protocol builders


def oa_chunk(delta: dict[str, Any], finish: str | None = None) -> tuple[None, dict[str, Any]]:
    return (
        None,
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "fake-gpt",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        },
    )


def oa_text(*pieces: str) -> Reply:
    events = [oa_chunk({"role": "assistant", "content": ""})]
    events += [oa_chunk({"content": p}) for p in pieces]
    return Reply(events=[*events, oa_chunk({}, "stop"), (None, "[DONE]")])


def oa_tool_call(call_id: str, name: str, argument_parts: list[str]) -> Reply:
    first = {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
    events = [oa_chunk({"role": "assistant", "tool_calls": [first]})]
    events += [oa_chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}) for part in argument_parts]
    return Reply(events=[*events, oa_chunk({}, "tool_calls"), (None, "[DONE]")])


def an(name: str, **data: Any) -> tuple[str, dict[str, Any]]:
    return name, {"type": name, **data}


def an_message(blocks: list[list[tuple[str, dict[str, Any]]]], stop: str) -> Reply:
    start = an(
        "message_start",
        message={
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": "fake-claude",
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 3, "output_tokens": 0},
        },
    )
    events = [start]
    for block in blocks:
        events += block
    events += [
        an("message_delta", delta={"stop_reason": stop, "stop_sequence": None}, usage={"output_tokens": 7}),
        an("message_stop"),
    ]
    return Reply(events=events)


def an_text(index: int, *pieces: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        an("content_block_start", index=index, content_block={"type": "text", "text": ""}),
        *[an("content_block_delta", index=index, delta={"type": "text_delta", "text": p}) for p in pieces],
        an("content_block_stop", index=index),
    ]


def an_tool(index: int, call_id: str, name: str, parts: list[str]) -> list[tuple[str, dict[str, Any]]]:
    return [
        an(
            "content_block_start",
            index=index,
            content_block={"type": "tool_use", "id": call_id, "name": name, "input": {}},
        ),
        *[an("content_block_delta", index=index, delta={"type": "input_json_delta", "partial_json": p}) for p in parts],
        an("content_block_stop", index=index),
    ]


# ---------------------------------------------------------------- running a step


def plan_for(provider: str, base_url: str, *, tools: bool = False, **params: Any) -> dict[str, Any]:
    agent: dict[str, Any] = {
        "name": "a",
        "model": {"provider": provider, "name": f"fake-{provider}", "params": {"base_url": base_url, **params}},
        "instructions": "Be brief.",
    }
    if tools:
        agent["tools"] = [
            {"id": "web_search", "function": "examples.app_functions:web_search", "description": "Search the web."}
        ]
    spec = {
        "version": "v1",
        "name": "fake-provider",
        "agent": agent,
        "workflow": {"name": "w", "kind": "sequential", "steps": [{"id": "ask", "prompt": "Tell me about {input}"}]},
    }
    return compile_spec(spec, None)


async def run(plan: dict[str, Any], **settings: Any) -> tuple[StepSucceeded | StepErrored, list[tuple[str, int]]]:
    chunks: list[tuple[str, int]] = []

    async def sink(text: str, seq: int) -> None:
        chunks.append((text, seq))

    s = Settings(KNEO_SERV_PROVIDER_RETRY_BACKOFF_SECONDS=0.01, **settings)
    state = {"input": "GPUs", "step_outputs": {}, "transcript": []}
    outcome = await execute_step(plan, state, 0, 1, sink, 60.0, ("examples",), settings=s)
    return outcome, chunks


def openai_url(fake: FakeLLM) -> str:
    return f"{fake.url}/v1"


# ---------------------------------------------------------------- openai


async def test_openai_streams_chunks_in_order_and_passes_model_params(fake: FakeLLM) -> None:
    fake.script = [oa_text("Hel", "lo ", "world")]
    outcome, chunks = await run(plan_for("openai", openai_url(fake), temperature=0.2, max_turns=4))
    assert isinstance(outcome, StepSucceeded), outcome
    assert chunks == [("Hel", 0), ("lo ", 1), ("world", 2)]
    assert (outcome.output, outcome.chunks) == ("Hello world", 3)
    [req] = fake.requests
    assert req["path"] == "/v1/chat/completions"
    body = req["body"]
    assert body["model"] == "fake-openai" and body["stream"] is True and body["temperature"] == 0.2
    assert "base_url" not in body and "max_turns" not in body and "tools" not in body
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about GPUs"},
    ]


async def test_openai_tool_call_round_trip(fake: FakeLLM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test-abcdefghijklmnopqrstuvwxyz")
    fake.script = [
        oa_tool_call("call_abc", "web_search", ['{"que', 'ry": "GPU', 's", "limit": 1}']),
        oa_text("Found ", "it."),
    ]
    outcome, chunks = await run(plan_for("openai", openai_url(fake), tools=True, api_key_env=KEY_ENV))
    assert isinstance(outcome, StepSucceeded), outcome
    assert outcome.output == "Found it." and chunks == [("Found ", 0), ("it.", 1)]
    first, second = (r["body"] for r in fake.requests)
    assert fake.requests[0]["headers"]["authorization"] == "Bearer sk-test-abcdefghijklmnopqrstuvwxyz"
    [tool] = first["tools"]
    assert tool["type"] == "function" and tool["function"]["name"] == "web_search"
    assert tool["function"]["parameters"]["properties"]["query"]["type"] == "string"
    assistant, answer = second["messages"][-2:]
    assert assistant["tool_calls"] == [
        {
            "id": "call_abc",
            "type": "function",
            "function": {"name": "web_search", "arguments": json.dumps({"query": "GPUs", "limit": 1})},
        }
    ]
    assert answer["role"] == "tool" and answer["tool_call_id"] == "call_abc"
    assert "https://en.wikipedia.org/wiki/Result_1" in answer["content"]
    [called] = outcome.tool_calls
    data = new_event(called).data
    assert (data["tool"], data["ok"], data["turn"], data["call_id"]) == ("web_search", True, 1, "call_abc")
    assert data["arguments"] == {"query": "GPUs", "limit": 1}
    assert "sk-test" not in json.dumps([new_event(e).data for e in outcome.tool_calls]) + outcome.output


async def test_openai_429_is_retried_per_setting(fake: FakeLLM) -> None:
    fake.script = [Reply(429), oa_text("ok")]
    outcome, _ = await run(plan_for("openai", openai_url(fake)), KNEO_SERV_PROVIDER_RETRIES=1)
    assert isinstance(outcome, StepSucceeded) and outcome.output == "ok"
    assert len(fake.requests) == 2

    fake.requests.clear()
    fake.script = [Reply(429), oa_text("never asked")]
    outcome, _ = await run(plan_for("openai", openai_url(fake)))  # KNEO_SERV_PROVIDER_RETRIES=0: no retry
    assert isinstance(outcome, StepErrored) and outcome.retryable and "HTTP 429" in outcome.error
    assert len(fake.requests) == 1


async def test_openai_500_exhausts_retries_as_a_retryable_step_error(fake: FakeLLM) -> None:
    fake.script = [Reply(500), Reply(502), Reply(503)]
    outcome, chunks = await run(plan_for("openai", openai_url(fake)), KNEO_SERV_PROVIDER_RETRIES=2)
    assert isinstance(outcome, StepErrored) and outcome.retryable is True
    assert "HTTP 503" in outcome.error and "after 3 attempts" in outcome.error
    assert len(fake.requests) == 3 and chunks == []


async def test_openai_400_is_not_retried(fake: FakeLLM) -> None:
    fake.script = [Reply(400), oa_text("never asked")]
    outcome, _ = await run(plan_for("openai", openai_url(fake)), KNEO_SERV_PROVIDER_RETRIES=2)
    assert isinstance(outcome, StepErrored) and outcome.retryable is False and "HTTP 400" in outcome.error
    assert len(fake.requests) == 1


async def test_openai_timeout_is_a_retryable_step_error(fake: FakeLLM) -> None:
    fake.script = [Reply(hang=True)]
    outcome, _ = await run(plan_for("openai", openai_url(fake)), KNEO_SERV_PROVIDER_TIMEOUT_SECONDS=0.2)
    assert isinstance(outcome, StepErrored) and outcome.retryable is True
    assert "timed out" in outcome.error and len(fake.requests) == 1


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_missing_key_with_require_provider_secrets(
    fake: FakeLLM, monkeypatch: pytest.MonkeyPatch, provider: str
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    plan = plan_for(provider, fake.url, api_key_env=KEY_ENV)
    outcome, _ = await run(plan, KNEO_SERV_REQUIRE_PROVIDER_SECRETS=True)
    assert isinstance(outcome, StepErrored) and outcome.retryable is False
    assert f"environment variable {KEY_ENV}, which is not set" in outcome.error
    assert fake.requests == [], "nothing was sent"
    fake.script = [oa_text("fine") if provider == "openai" else an_message([an_text(0, "fine")], "end_turn")]
    url = openai_url(fake) if provider == "openai" else fake.url
    relaxed, _ = await run(plan_for(provider, url, api_key_env=KEY_ENV))  # the default: a placeholder key
    assert isinstance(relaxed, StepSucceeded) and relaxed.output == "fine"


# ---------------------------------------------------------------- anthropic


async def test_anthropic_streams_and_round_trips_a_tool_use(fake: FakeLLM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-ant-test-abcdefghijklmnopqrstuvwxyz")
    fake.script = [
        an_message(
            [an_text(0, "Let me ", "look."), an_tool(1, "toolu_1", "web_search", ['{"query"', ': "GPUs"}'])], "tool_use"
        ),
        an_message([an_text(0, "Two ", "sources", ".")], "end_turn"),
    ]
    plan = plan_for("anthropic", fake.url, tools=True, api_key_env=KEY_ENV, max_tokens=256, temperature=0)
    outcome, chunks = await run(plan)
    assert isinstance(outcome, StepSucceeded), outcome
    assert outcome.output == "Two sources."
    assert [c for c, _ in chunks] == ["Let me ", "look.", "Two ", "sources", "."]
    assert [s for _, s in chunks] == [0, 1, 2, 3, 4]
    first, second = fake.requests
    assert first["path"] == "/v1/messages"
    key = "sk-ant-test-abcdefghijklmnopqrstuvwxyz"  # sent as x-api-key or, by newer SDKs, as a bearer token
    assert key in (first["headers"].get("x-api-key"), first["headers"].get("authorization", "").removeprefix("Bearer "))
    body = first["body"]
    assert body["system"] == "Be brief." and body["max_tokens"] == 256 and body["temperature"] == 0
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Tell me about GPUs"}]}]
    assert body["tools"][0]["name"] == "web_search" and "query" in body["tools"][0]["input_schema"]["properties"]
    assistant, user = second["body"]["messages"][-2:]
    assert assistant["content"] == [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_1", "name": "web_search", "input": {"query": "GPUs"}},
    ]
    [result] = user["content"]
    assert result["type"] == "tool_result" and result["tool_use_id"] == "toolu_1" and result["is_error"] is False
    assert "https://en.wikipedia.org/wiki/Result_1" in result["content"]
    assert [(e.tool, e.ok, e.call_id) for e in outcome.tool_calls] == [("web_search", True, "toolu_1")]


async def test_anthropic_overloaded_then_success_and_timeout(fake: FakeLLM) -> None:
    fake.script = [Reply(529), an_message([an_text(0, "ok")], "end_turn")]
    outcome, _ = await run(plan_for("anthropic", fake.url), KNEO_SERV_PROVIDER_RETRIES=1)
    assert isinstance(outcome, StepSucceeded) and outcome.output == "ok" and len(fake.requests) == 2

    fake.requests.clear()
    fake.script = [Reply(401)]
    outcome, _ = await run(plan_for("anthropic", fake.url), KNEO_SERV_PROVIDER_RETRIES=3)
    assert isinstance(outcome, StepErrored) and not outcome.retryable and "HTTP 401" in outcome.error
    assert len(fake.requests) == 1

    fake.script = [Reply(hang=True)]
    outcome, _ = await run(plan_for("anthropic", fake.url), KNEO_SERV_PROVIDER_TIMEOUT_SECONDS=0.2)
    assert isinstance(outcome, StepErrored) and outcome.retryable and "timed out" in outcome.error


# ---------------------------------------------------------------- the whole platform


SPEC = """
version: v1
name: fake-openai-agent
agent:
  name: researcher
  model: {provider: openai, name: fake-gpt, params: {base_url: "%(url)s"}}
  tools:
    - {id: web_search, function: "examples.app_functions:web_search", description: Search the web.}
workflow:
  name: one
  kind: sequential
  steps:
    - {id: research, kind: agent, prompt: "Research {input}"}
"""


async def test_platform_runs_an_openai_agent_with_tools_over_http(fake: FakeLLM, platform_factory: Any) -> None:
    fake.script = [oa_tool_call("call_1", "web_search", ['{"query": "chips"}']), oa_text("Chips ", "are ", "hot.")]
    platform = await platform_factory()
    async with httpx.AsyncClient(base_url=platform.url, timeout=60) as http:
        resp = await http.post("/v1/runs", json={"input": "chips", "spec": SPEC % {"url": openai_url(fake)}})
        assert resp.status_code == 200, resp.text
        run_ = resp.json()
        events = (await http.get(f"/v1/runs/{run_['run_id']}/events")).json()["events"]
    assert run_["status"] == "succeeded" and run_["output_text"] == "Chips are hot."
    types = [e["type"] for e in events]
    assert types[types.index("step.tool_called") :] == [
        "step.tool_called",
        "step.completed",
        "checkpoint.saved",
        "run.succeeded",
    ]
    called = events[types.index("step.tool_called")]["data"]
    assert (called["step_id"], called["tool"], called["ok"], called["arguments"]) == (
        "research",
        "web_search",
        True,
        {"query": "chips"},
    )
    assert "Result_1" in called["result_preview"]
    assert len(fake.requests) == 2
