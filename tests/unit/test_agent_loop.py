"""The agent step: the dummy provider, the multi-turn tool loop, guardrails, memory, provider keys and retries.

The ToolBox here is a fake with the runner's ToolBox interface (specs / call, an async context manager); guardrail
and memory functions live in a module registered for the test, imported through the same allow-list as in a run.
"""

from __future__ import annotations

import sys
import types
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from kneo_compiler.spec import compile_spec
from kneo_events.projections import fold_run
from kneo_events.schemas import RecordedEvent, new_event
from kneo_events.settings import Settings
from kneo_runner.domain import StepErrored, StepSucceeded, decide
from kneo_runner.engine import execute_step
from kneo_runner.providers import (
    PLACEHOLDER_KEY,
    DummyProvider,
    Message,
    ProviderError,
    ProviderSettings,
    StreamItem,
    TextDelta,
    ToolCallRequest,
    TurnContext,
    TurnEnd,
    anthropic_messages,
    openai_messages,
    resolve_api_key,
    stream_with_retries,
)

MODULE = "kneo_test_agent_functions"
ALLOWED = ("examples", MODULE)


# ---------------------------------------------------------------- fakes


@dataclass(frozen=True)
class Spec:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class Result:
    ok: bool
    content: str


SEARCH = Spec(
    "web_search",
    "Search the web.",
    {
        "type": "object",
        "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
        "required": ["query"],
    },
)
READER = Spec("webpage_reader", "Read a page.", {"type": "object", "properties": {"url": {"type": "string"}}})


class FakeBox:
    """The ToolBox interface over plain callables; a tool that raises is an error result, like the real one."""

    def __init__(self, tools: dict[str, tuple[Spec, Callable[..., Any]]]) -> None:
        self.tools = tools
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.entered = self.exited = 0

    async def __aenter__(self) -> FakeBox:
        self.entered += 1
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.exited += 1

    def specs(self) -> list[Spec]:
        return [spec for spec, _ in self.tools.values()]

    async def call(self, name: str, arguments: dict[str, Any]) -> Result:
        self.calls.append((name, arguments))
        if name not in self.tools:
            return Result(False, f"unknown tool {name}")
        try:
            return Result(True, str(self.tools[name][1](**arguments)))
        except Exception as exc:
            return Result(False, f"{type(exc).__name__}: {exc}")


def search(query: str, limit: int = 2) -> str:
    return " ".join(f"https://en.wikipedia.org/wiki/R{i} about {query}" for i in range(limit))


def read(url: str) -> str:
    return f"page {url}"


def broken(url: str) -> str:
    raise RuntimeError("the page is gone")


def boxes(box: FakeBox | None) -> Callable[..., Any]:
    def factory(agent: dict[str, Any], settings: Settings, allowed: tuple[str, ...]) -> FakeBox:
        if box is None:
            raise AssertionError("an agent without tools must not open a ToolBox")
        return box

    return factory


@pytest.fixture
def functions(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Guardrail and memory functions, importable as ``kneo_test_agent_functions:<name>``."""
    mod = types.ModuleType(MODULE)
    mod.seen = []  # type: ignore[attr-defined]

    def passes(text: str) -> bool:
        return True

    def fails(text: str) -> bool:
        return False

    def shout(text: str) -> str:
        return text.upper()

    def refuse(text: str) -> dict[str, Any]:
        return {"allowed": False, "reason": "mentions secrets"}

    def explode(text: str) -> bool:
        raise ValueError("guard crashed")

    async def tidy(text: str) -> dict[str, Any]:
        return {"allowed": True, "text": text.replace("banned", "***")}

    def compress(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        mod.seen.append(messages)  # type: ignore[attr-defined]
        return [{"role": "system", "content": f"{len(messages)} earlier turns"}]

    for fn in (passes, fails, shout, refuse, explode, tidy, compress):
        setattr(mod, fn.__name__, fn)
    monkeypatch.setitem(sys.modules, MODULE, mod)
    return mod


def plan_of(agent: dict[str, Any], steps: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec = {
        "version": "v1",
        "name": "loop",
        "agent": {"name": "a", **agent},
        "workflow": {"name": "w", "kind": "sequential", "steps": steps or [{"id": "ask", "prompt": "Find {input}"}]},
    }
    return compile_spec(spec, None)


TOOLS = [
    {"id": "web_search", "function": "examples.app_functions:web_search"},
    {"id": "webpage_reader", "function": "examples.app_functions:webpage_reader"},
]


class Chunks:
    def __init__(self) -> None:
        self.items: list[tuple[str, int]] = []

    async def __call__(self, text: str, seq: int) -> None:
        self.items.append((text, seq))


async def run_step(
    plan: dict[str, Any],
    *,
    state: dict[str, Any] | None = None,
    box: FakeBox | None = None,
    attempt: int = 1,
    index: int = 0,
    providers: dict[str, Any] | None = None,
    sink: Chunks | None = None,
) -> StepSucceeded | StepErrored:
    return await execute_step(
        plan,
        state or {"input": "GPU supply", "step_outputs": {}, "transcript": []},
        index,
        attempt,
        sink or Chunks(),
        30.0,
        ALLOWED,
        settings=Settings(),
        providers=providers,
        toolboxes=boxes(box),
    )


async def collect(gen: AsyncGenerator[StreamItem, None]) -> list[StreamItem]:
    return [item async for item in gen]


CTX = TurnContext(seed="s", step_id="ask", attempt=1, turn=1)


# ---------------------------------------------------------------- dummy provider


async def test_dummy_is_deterministic_and_keeps_its_text_shape() -> None:
    p = DummyProvider({"params": {"chunks": 4}})
    msgs = [Message("user", "Find GPU supply\nmore")]
    one, two = await collect(p.stream(msgs, [], CTX)), await collect(p.stream(msgs, [], CTX))
    assert one == two
    texts = [i.text for i in one if isinstance(i, TextDelta)]
    assert len(texts) == 5 and texts[0] == "On Find GPU supply: " and texts[-1].endswith(".")
    assert isinstance(one[-1], TurnEnd) and one[-1].stop_reason == "stop"
    other = await collect(p.stream([Message("user", "something else")], [], CTX))
    assert [i for i in other if isinstance(i, TextDelta)][1:] != texts[1:]


async def test_dummy_injects_failures_by_attempt_and_step() -> None:
    p = DummyProvider({"params": {"fail_attempts": 1}})
    with pytest.raises(ProviderError, match="injected failure on attempt 1") as info:
        await collect(p.stream([Message("user", "p")], [], CTX))
    assert info.value.retryable
    second = TurnContext("s", "ask", attempt=2, turn=1)
    assert isinstance((await collect(p.stream([Message("user", "p")], [], second)))[-1], TurnEnd)
    with pytest.raises(ProviderError, match="step ask"):
        await collect(DummyProvider({"params": {"fail_steps": ["ask"]}}).stream([Message("user", "p")], [], CTX))


async def test_dummy_calls_each_tool_once_then_answers_with_the_results() -> None:
    p = DummyProvider({"params": {"chunks": 2}})
    prompt = Message("user", "Find sources about: GPU supply")
    first = await collect(p.stream([prompt], [SEARCH, READER], CTX))
    assert first == [
        ToolCallRequest("call_1_0", "web_search", {"query": "Find sources about: GPU supply"}),
        ToolCallRequest(
            "call_1_1", "webpage_reader", {"url": "https://en.wikipedia.org/wiki/Find_sources_about_GPU_supply"}
        ),
        TurnEnd("tool_calls"),
    ]
    calls = tuple(i for i in first if isinstance(i, ToolCallRequest))
    convo = [
        prompt,
        Message("assistant", "", tool_calls=calls),
        Message("tool", "https://x.test/a", tool_call_id="call_1_0", name="web_search"),
        Message("tool", "gone", tool_call_id="call_1_1", name="webpage_reader", is_error=True),
    ]
    answer = await collect(p.stream(convo, [SEARCH, READER], TurnContext("s", "ask", 1, 2)))
    text = "".join(i.text for i in answer if isinstance(i, TextDelta))
    assert text.startswith("On Find sources about: GPU supply: ")
    assert text.endswith("From 2 tool results: web_search: https://x.test/a; webpage_reader failed: gone.")


async def test_dummy_tool_call_count_and_opt_out() -> None:
    prompt = [Message("user", "p")]
    many = DummyProvider({"params": {"tool_calls": 3}})
    first = [i for i in await collect(many.stream(prompt, [SEARCH, READER], CTX)) if isinstance(i, ToolCallRequest)]
    assert [c.name for c in first] == ["web_search", "webpage_reader"]
    convo = [*prompt, Message("assistant", "", tool_calls=tuple(first))]
    second = await collect(many.stream(convo, [SEARCH, READER], TurnContext("s", "ask", 1, 2)))
    assert [c.name for c in second if isinstance(c, ToolCallRequest)] == ["web_search"]
    off = await collect(DummyProvider({"params": {"call_tools": False}}).stream(prompt, [SEARCH], CTX))
    assert not [i for i in off if isinstance(i, ToolCallRequest)]


# ---------------------------------------------------------------- the loop


async def test_agent_without_tools_streams_one_turn_and_opens_no_toolbox() -> None:
    sink = Chunks()
    outcome = await run_step(plan_of({"model": {"provider": "dummy", "params": {"chunks": 3}}}), sink=sink)
    assert isinstance(outcome, StepSucceeded)
    assert outcome.chunks == 4 and outcome.tool_calls == () and outcome.guardrails == ()
    assert [seq for _, seq in sink.items] == [0, 1, 2, 3]
    assert "".join(t for t, _ in sink.items) == outcome.output
    assert outcome.output.startswith("On Find GPU supply: ")


async def test_tool_round_trip_records_each_call_and_feeds_results_back() -> None:
    box = FakeBox({"web_search": (SEARCH, search), "webpage_reader": (READER, read)})
    sink = Chunks()
    plan = plan_of({"model": {"provider": "dummy", "params": {"chunks": 2}}, "tools": TOOLS})
    outcome = await run_step(plan, box=box, sink=sink)
    assert isinstance(outcome, StepSucceeded), outcome
    assert box.entered == box.exited == 1
    assert box.calls == [
        ("web_search", {"query": "Find GPU supply"}),
        ("webpage_reader", {"url": "https://en.wikipedia.org/wiki/Find_GPU_supply"}),
    ]
    events = [e.model_dump() for e in outcome.tool_calls]
    assert [(e["step_id"], e["turn"], e["tool"], e["ok"], e["call_id"]) for e in events] == [
        ("ask", 1, "web_search", True, "call_1_0"),
        ("ask", 1, "webpage_reader", True, "call_1_1"),
    ]
    assert events[0]["arguments"] == {"query": "Find GPU supply"}
    assert events[0]["result_preview"] == search("Find GPU supply")
    assert events[1]["result_chars"] == len(read("https://en.wikipedia.org/wiki/Find_GPU_supply"))
    assert "From 2 tool results: web_search: https://en.wikipedia.org/wiki/R0 about Find GPU supply" in outcome.output
    assert "".join(t for t, _ in sink.items) == outcome.output  # the tool turn streamed no text


async def test_a_failing_tool_is_a_result_the_model_sees_not_a_crash() -> None:
    class RaisingBox(FakeBox):
        async def call(self, name: str, arguments: dict[str, Any]) -> Result:
            if name == "web_search":
                raise OSError("toolbox broke")
            return await super().call(name, arguments)

    box = RaisingBox({"web_search": (SEARCH, search), "webpage_reader": (READER, broken)})
    plan = plan_of({"model": {"provider": "dummy", "params": {"chunks": 1}}, "tools": TOOLS})
    outcome = await run_step(plan, box=box)
    assert isinstance(outcome, StepSucceeded), outcome
    assert [(e.tool, e.ok) for e in outcome.tool_calls] == [("web_search", False), ("webpage_reader", False)]
    assert outcome.tool_calls[1].result_preview == "RuntimeError: the page is gone"
    assert "web_search failed: tool 'web_search' failed: OSError: toolbox broke" in outcome.output
    assert "webpage_reader failed: RuntimeError: the page is gone" in outcome.output


async def test_max_turns_bounds_the_loop_and_keeps_the_calls_made() -> None:
    box = FakeBox({"web_search": (SEARCH, search)})
    agent = {"model": {"provider": "dummy", "params": {"tool_calls": 50, "max_turns": 3}}, "tools": TOOLS[:1]}
    outcome = await run_step(plan_of(agent), box=box)
    assert isinstance(outcome, StepErrored)
    assert outcome.retryable is False and "max_turns=3" in outcome.error
    assert [e.turn for e in outcome.tool_calls] == [1, 2, 3]


async def test_tool_arguments_are_redacted_and_previews_bounded() -> None:
    class Secretive:
        def __init__(self, model: dict[str, Any], settings: ProviderSettings) -> None:
            pass

        async def aclose(self) -> None:
            pass

        async def stream(self, messages: Sequence[Message], tools: Sequence[Any], ctx: TurnContext) -> Any:
            if ctx.turn == 1:
                yield ToolCallRequest("c1", "web_search", {"query": "x" * 5000, "api_key": "sk-abcdefghijklmnopqrstuv"})
                yield ToolCallRequest("c2", "web_search", {}, arguments_error="the arguments were not valid JSON")
            else:
                yield TextDelta("done")
            yield TurnEnd()

    box = FakeBox({"web_search": (SEARCH, lambda **kw: "y" * 5000)})
    plan = plan_of({"model": {"provider": "dummy"}, "tools": TOOLS[:1]})
    outcome = await run_step(plan, box=box, providers={"dummy": Secretive})
    assert isinstance(outcome, StepSucceeded) and outcome.output == "done"
    first, second = outcome.tool_calls
    assert len(first.result_preview) == 1000 and first.result_chars == 5000
    assert "sk-abc" not in str(first.arguments) and first.arguments["_chars"] > 5000
    assert (second.ok, second.result_preview) == (
        False,
        "tool 'web_search' was not called: the arguments were not valid JSON",
    )
    assert len(box.calls) == 1, "a call with broken arguments never reaches the tool"


async def test_unknown_provider_is_a_non_retryable_step_error() -> None:
    outcome = await run_step(plan_of({"model": {"provider": "dummy"}}), providers={})
    assert isinstance(outcome, StepErrored) and not outcome.retryable and "'dummy' is not available" in outcome.error


async def test_missing_sdk_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)  # what an install without the extra looks like
    outcome = await run_step(plan_of({"model": {"provider": "openai", "name": "gpt"}}))
    assert isinstance(outcome, StepErrored) and not outcome.retryable
    assert "pip install 'kneo[openai]'" in outcome.error


# ---------------------------------------------------------------- guardrails


def guarded(stage: str, *guards: tuple[str, str, str]) -> dict[str, Any]:
    return plan_of(
        {
            "model": {"provider": "dummy", "params": {"chunks": 1}},
            "guardrails": {stage: [{"id": g, "function": f"{MODULE}:{fn}", "on_fail": on} for g, fn, on in guards]},
        }
    )


async def test_input_guardrail_block_fails_the_step_before_the_model(functions: types.ModuleType) -> None:
    sink = Chunks()
    outcome = await run_step(guarded("input", ("ok", "passes", "block"), ("no_secrets", "refuse", "block")), sink=sink)
    assert isinstance(outcome, StepErrored) and outcome.retryable is False
    assert outcome.error == "guardrail no_secrets blocked the input: mentions secrets"
    assert [g.model_dump() for g in outcome.guardrails] == [
        {
            "step_index": 0,
            "step_id": "ask",
            "attempt": 1,
            "stage": "input",
            "guardrail_id": "no_secrets",
            "action": "blocked",
            "reason": "mentions secrets",
        }
    ]
    assert sink.items == [], "the model never ran"


async def test_input_rewrite_replaces_the_prompt(functions: types.ModuleType) -> None:
    outcome = await run_step(guarded("input", ("loud", "shout", "block")))
    assert isinstance(outcome, StepSucceeded) and outcome.output.startswith("On FIND GPU SUPPLY: ")
    assert [(g.stage, g.guardrail_id, g.action) for g in outcome.guardrails] == [("input", "loud", "rewritten")]


async def test_output_guardrails_warn_rewrite_and_block(functions: types.ModuleType) -> None:
    warned = await run_step(guarded("output", ("strict", "fails", "warn"), ("loud", "shout", "warn")))
    assert isinstance(warned, StepSucceeded) and warned.output.startswith("ON FIND GPU SUPPLY: ")
    assert [(g.stage, g.guardrail_id, g.action, g.reason) for g in warned.guardrails] == [
        ("output", "strict", "warned", "the output did not pass strict"),
        ("output", "loud", "rewritten", None),
    ]
    crashed = await run_step(guarded("output", ("fragile", "explode", "block")))
    assert isinstance(crashed, StepErrored) and not crashed.retryable
    assert crashed.error == "guardrail fragile blocked the output: the guardrail raised ValueError: guard crashed"
    assert [g.action for g in crashed.guardrails] == ["blocked"]


async def test_async_guardrail_dict_rewrite_and_a_disallowed_module(functions: types.ModuleType) -> None:
    plan = guarded("input", ("tidy", "tidy", "block"))
    outcome = await run_step(plan, state={"input": "banned words", "step_outputs": {}, "transcript": []})
    assert isinstance(outcome, StepSucceeded) and outcome.output.startswith("On Find *** words: ")
    bad = plan_of({"model": {"provider": "dummy"}, "guardrails": {"input": [{"id": "sh", "function": "json:dumps"}]}})
    refused = await run_step(bad)
    assert isinstance(refused, StepErrored) and not refused.retryable
    assert "guardrail sh" in refused.error and "KNEO_SERV_FUNCTION_PACKAGES" in refused.error


# ---------------------------------------------------------------- memory


class Recording:
    """A provider that remembers the conversation it was given and answers "ok"."""

    seen: list[list[Message]]

    def __init__(self, model: dict[str, Any], settings: ProviderSettings) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def stream(self, messages: Sequence[Message], tools: Sequence[Any], ctx: TurnContext) -> Any:
        Recording.seen.append(list(messages))
        yield TextDelta("ok")
        yield TurnEnd()


TRANSCRIPT = [{"step_id": f"s{i}", "output": f"out {i}"} for i in range(5)]
FIVE = [{"id": f"s{i}", "prompt": f"p{i}"} for i in range(5)] + [{"id": "ask", "prompt": "Now {input}"}]


async def remembered(memory: dict[str, Any] | None, other_agent_steps: bool = False) -> list[Message]:
    Recording.seen = []
    agent: dict[str, Any] = {"model": {"provider": "dummy"}, "instructions": "Be brief."}
    if memory is not None:
        agent["memory"] = memory
    steps = [dict(s) for s in FIVE]
    spec_agents: dict[str, Any] = {}
    if other_agent_steps:
        steps[1]["ref"] = "critic"
        spec_agents = {"critic": {"name": "critic", "model": {"provider": "dummy"}}}
    spec = {
        "version": "v1",
        "name": "mem",
        "agent": {"name": "a", **agent},
        "components": {"agents": spec_agents},
        "workflow": {"name": "w", "kind": "sequential", "steps": steps},
    }
    state = {"input": "go", "step_outputs": {}, "transcript": TRANSCRIPT}
    outcome = await run_step(compile_spec(spec, None), state=state, index=5, providers={"dummy": Recording})
    assert isinstance(outcome, StepSucceeded), outcome
    return Recording.seen[0]


async def test_memory_window_keeps_the_last_turns() -> None:
    msgs = await remembered({"kind": "window", "window": 2})
    assert [(m.role, m.content) for m in msgs] == [
        ("system", "Be brief."),
        ("assistant", "out 3"),
        ("assistant", "out 4"),
        ("user", "Now go"),
    ]


async def test_memory_none_by_default_and_other_agents_are_users() -> None:
    assert [m.role for m in await remembered(None)] == ["system", "user"]
    assert [m.role for m in await remembered({"kind": "none"})] == ["system", "user"]
    msgs = await remembered({"kind": "buffer"}, other_agent_steps=True)
    assert [(m.role, m.content) for m in msgs[1:3]] == [("assistant", "out 0"), ("user", "s1 said: out 1")]
    assert len(msgs) == 7


async def test_memory_compress_history_and_builtin_summary(functions: types.ModuleType) -> None:
    msgs = await remembered({"kind": "window", "window": 3, "compress_history": f"{MODULE}:compress"})
    assert [(m.role, m.content) for m in msgs] == [
        ("system", "Be brief."),
        ("system", "5 earlier turns"),
        ("user", "Now go"),
    ]
    assert len(functions.seen[0]) == 5, "the function gets the whole history"
    assert (await remembered({"kind": "window", "window": 9, "compress_history": f"{MODULE}:compress"}))[
        1
    ].content == "out 0"
    summary = await remembered({"kind": "summary", "window": 2})
    assert summary[1].content == "Earlier turns (shortened): out 0 | out 1 | out 2"
    assert [m.content for m in summary[2:]] == ["out 3", "out 4", "Now go"]


# ---------------------------------------------------------------- events through the domain


def _rec(version: int, etype: str, data: dict[str, Any]) -> RecordedEvent:
    return RecordedEvent(
        position=version,
        tx_id=1,
        stream_id="run-r",
        version=version,
        event_id=uuid.uuid4(),
        type=etype,
        data=data,
        metadata={},
        recorded_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


async def test_decide_records_tool_calls_and_guardrails_before_the_outcome(functions: types.ModuleType) -> None:
    box = FakeBox({"web_search": (SEARCH, search), "webpage_reader": (READER, read)})
    plan = plan_of(
        {
            "model": {"provider": "dummy", "params": {"chunks": 1}},
            "tools": TOOLS,
            "guardrails": {"output": [{"id": "loud", "function": f"{MODULE}:shout"}]},
        }
    )
    state = {"run_id": "r", "status": "running", "version": 3, "input": "x", "step_outputs": {}, "transcript": []}
    outcome = await run_step(plan, box=box, state=state)
    assert isinstance(outcome, StepSucceeded)
    decision = decide("r", plan, state, 0, 1, outcome, 0.25, 0.0)
    types_ = [e.type for e in decision.events]
    assert types_ == [
        "step.tool_called",
        "step.tool_called",
        "guardrail.fired",
        "step.completed",
        "checkpoint.saved",
        "run.succeeded",
    ]
    events = [new_event(e) for e in decision.events]
    assert events[2].data["action"] == "rewritten" and events[0].data["tool"] == "web_search"
    plain = [ev for ev in events if not ev.type.startswith(("step.tool", "guardrail"))]
    folded = fold_run(None, [_rec(i + 1, e.type, e.data) for i, e in enumerate(events)])
    without = fold_run(None, [_rec(i + 1, e.type, e.data) for i, e in enumerate(plain)])
    assert folded["trace_event_count"] == 6 and without["trace_event_count"] == 3
    assert {k: v for k, v in folded.items() if k not in ("version", "trace_event_count")} == {
        k: v for k, v in without.items() if k not in ("version", "trace_event_count")
    }

    failed = StepErrored("guardrail g blocked the output: no", False, outcome.tool_calls, outcome.guardrails)
    types_ = [e.type for e in decide("r", plan, state, 0, 1, failed, 0.25, 0.0).events]
    assert types_ == ["step.tool_called", "step.tool_called", "guardrail.fired", "step.failed", "run.failed"]
    retry_plan = {**plan, "steps": [{**plan["steps"][0], "max_retries": 1}]}
    again = StepErrored("flaky", True, outcome.tool_calls[:1])
    types_ = [e.type for e in decide("r", retry_plan, state, 0, 1, again, 0.25, 0.0).events]
    assert types_ == ["step.tool_called", "step.retrying", "step.scheduled"]


# ---------------------------------------------------------------- keys, message shapes, retries


def test_api_keys_come_only_from_named_environment_variables() -> None:
    env = {"OPENAI_API_KEY": "sk-default", "MY_LLM_API_KEY": "sk-mine", "KNEO_DATABASE_URL": "postgres://x"}
    s = ProviderSettings(env=env)
    assert resolve_api_key("openai", {}, s) == "sk-default"
    assert resolve_api_key("openai", {"api_key_env": "MY_LLM_API_KEY"}, s) == "sk-mine"
    assert resolve_api_key("openai", {"base_url": "http://127.0.0.1:1/v1"}, s) == PLACEHOLDER_KEY
    assert resolve_api_key("anthropic", {}, s) == PLACEHOLDER_KEY
    for bad in ({"api_key_env": "KNEO_DATABASE_URL"}, {"api_key_env": "HOME"}, {"api_key": "sk-raw"}):
        with pytest.raises(ProviderError) as info:
            resolve_api_key("openai", bad, s)
        assert not info.value.retryable
    strict = ProviderSettings(env={}, require_secrets=True)
    with pytest.raises(ProviderError, match="ANTHROPIC_API_KEY, which is not set") as info:
        resolve_api_key("anthropic", {}, strict)
    assert not info.value.retryable


def test_message_shapes_for_each_api() -> None:
    call = ToolCallRequest("c1", "web_search", {"query": "q"})
    convo = [
        Message("system", "sys"),
        Message("assistant", "earlier answer"),
        Message("user", "ask"),
        Message("assistant", "looking", tool_calls=(call,)),
        Message("tool", "found", tool_call_id="c1", name="web_search"),
        Message("tool", "boom", tool_call_id="c2", name="web_search", is_error=True),
    ]
    system, turns = anthropic_messages(convo)
    assert system == "sys"
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant", "user"]
    assert turns[3]["content"][1] == {"type": "tool_use", "id": "c1", "name": "web_search", "input": {"query": "q"}}
    assert [b["tool_use_id"] for b in turns[4]["content"]] == ["c1", "c2"] and turns[4]["content"][1]["is_error"]
    oa = openai_messages(convo)
    assert oa[3]["tool_calls"][0]["function"] == {"name": "web_search", "arguments": '{"query": "q"}'}
    assert oa[4] == {"role": "tool", "tool_call_id": "c1", "content": "found"}


async def test_retries_happen_only_before_any_output() -> None:
    class Flaky:
        def __init__(self, fail_times: int, after_output: bool = False) -> None:
            self.fail_times, self.after_output, self.calls = fail_times, after_output, 0

        async def aclose(self) -> None:
            pass

        async def stream(self, messages: Sequence[Message], tools: Sequence[Any], ctx: TurnContext) -> Any:
            self.calls += 1
            if self.after_output:
                yield TextDelta("partial")
            if self.calls <= self.fail_times:
                raise ProviderError("HTTP 503")
            yield TextDelta("fine")
            yield TurnEnd()

    fast = ProviderSettings(retries=2, retry_backoff_seconds=0)
    flaky = Flaky(2)
    items = await collect(stream_with_retries(flaky, [], [], CTX, fast))
    assert flaky.calls == 3 and items == [TextDelta("fine"), TurnEnd()]
    with pytest.raises(ProviderError, match=r"HTTP 503 \(after 3 attempts\)") as info:
        await collect(stream_with_retries(Flaky(5), [], [], CTX, fast))
    assert info.value.retryable
    late = Flaky(1, after_output=True)
    with pytest.raises(ProviderError, match="HTTP 503"):
        await collect(stream_with_retries(late, [], [], CTX, fast))
    assert late.calls == 1, "chunks already went out: the step fails instead of repeating them"
