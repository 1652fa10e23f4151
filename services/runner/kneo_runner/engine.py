"""Step execution: render the step's prompt, call the provider, stream chunks out. I/O lives here."""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import orjson

from kneo_events.redaction import redact, redact_text
from kneo_events.schemas import GuardrailFired, StepToolCalled, dumps
from kneo_events.settings import Settings
from kneo_runner.domain import Outcome, StepErrored, StepSucceeded
from kneo_runner.providers import (
    PROVIDERS,
    DummyProvider,
    Message,
    Provider,
    ProviderError,
    ProviderFactory,
    ProviderSettings,
    TextDelta,
    ToolCallRequest,
    TurnContext,
    stream_with_retries,
)

__all__ = ["PROVIDERS", "DummyProvider", "ProviderError", "StepCancelled", "execute_step", "render_prompt"]

JSON = dict[str, Any]
ChunkSink = Callable[[str, int], Awaitable[None]]
DEFAULT_MAX_TURNS = 8
DEFAULT_MEMORY_WINDOW = 10


log = logging.getLogger("kneo.runner")


class StepCancelled(Exception):
    """The run was cancelled while this step was running: stop, record nothing (the run is terminal already)."""


class AgentError(Exception):
    """The agent loop could not finish the step (a guardrail blocked it, too many turns, a bad memory function)."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class ToolBoxLike(Protocol):
    """The tools of one agent for one step (``kneo_runner.tools.ToolBox``): specs for the model, and calls that
    never raise for a tool failure."""

    def specs(self) -> Sequence[Any]: ...

    async def call(self, name: str, arguments: JSON) -> Any: ...


ToolBoxFactory = Callable[[JSON, Settings, tuple[str, ...]], AbstractAsyncContextManager[ToolBoxLike]]


def default_toolboxes(agent: JSON, settings: Settings, allowed_packages: tuple[str, ...]) -> Any:
    """The runner's ToolBox (function tools with permissions, MCP servers), imported when an agent has tools."""
    try:
        from kneo_runner.tools import ToolBox
    except ImportError as exc:
        raise AgentError(f"agent tools are not available in this runner: {exc}") from None
    try:
        return ToolBox.for_agent(agent, settings, allowed_packages)
    except (StepFunctionError, ValueError) as exc:  # a tool outside the allow-list, a bad tool declaration
        raise AgentError(f"agent {agent.get('id')!r} tools: {exc}") from None


@dataclass
class StepTrace:
    """What happened inside one agent step besides its text: tool calls and fired guardrails (become events)."""

    step_index: int
    step_id: str
    attempt: int
    preview_chars: int = 1000
    tool_calls: list[StepToolCalled] = field(default_factory=list)
    guardrails: list[GuardrailFired] = field(default_factory=list)


@dataclass(frozen=True)
class StepEnv:
    """The runner around a step: settings, the function allow-list, providers, the ToolBox factory, tool hooks."""

    settings: Settings | None
    allowed_packages: tuple[str, ...]
    providers: Mapping[str, ProviderFactory]
    toolboxes: ToolBoxFactory
    provider_settings: ProviderSettings
    hooks: ToolHooks = field(default_factory=lambda: ToolHooks())


class ToolHooks:
    """What the runner does around each tool call besides calling it; the default does nothing.

    ``started`` / ``finished`` tell live listeners (the runner publishes them on the run's output subject, so SSE
    clients see a tool run before the step ends); ``lookup`` / ``remember`` are the smart cache of a Knap chat
    (``lookup`` returning ``(ok, content)`` means the tool is not called). A hook that fails is logged, never fatal.
    """

    async def started(self, call: ToolCallRequest) -> None:
        """A tool call is about to run."""

    async def finished(self, call: ToolCallRequest, ok: bool, content: str, cached: bool) -> None:
        """A tool call ended (``cached``: its result came from the cache)."""

    async def lookup(self, name: str, arguments: JSON) -> tuple[bool, str] | None:
        """A cached result of this call, if any."""
        return None

    async def remember(self, name: str, arguments: JSON, ok: bool, content: str) -> None:
        """Keep a result for later identical calls."""


_PLACEHOLDER = re.compile(r"\{(input|steps\.[A-Za-z0-9_\-]+)\}")


def render_prompt(template: str | None, run_input: Any, outputs: JSON, step_id: str) -> str:
    """Fill ``{input}`` and ``{steps.<id>}`` in a step prompt (unknown placeholders stay as written)."""
    if not template:
        previous = list(outputs.values())
        return str(previous[-1]) if previous else str(run_input if run_input is not None else step_id)

    def sub(m: re.Match[str]) -> str:
        key = m.group(1)
        if key == "input":
            return str(run_input if run_input is not None else "")
        return str(outputs.get(key.removeprefix("steps."), m.group(0)))

    return _PLACEHOLDER.sub(sub, template)


def import_function(target: str, allowed_packages: tuple[str, ...]) -> Any:
    """Import ``module:attr``, only from the allowed packages (``KNEO_SERV_FUNCTION_PACKAGES``).

    A spec is data a caller sends; without the allow-list, ``function: "asyncio.subprocess:create_subprocess_shell"``
    would run a shell command on the runner.
    """
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise StepFunctionError(f"function {target!r} must look like package.module:function")
    if not any(module_name == p or module_name.startswith(p + ".") for p in allowed_packages):
        raise StepFunctionError(
            f"function module {module_name!r} is not in KNEO_SERV_FUNCTION_PACKAGES ({', '.join(allowed_packages)})"
        )
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise StepFunctionError(f"cannot import function {target!r}: {exc}") from None


async def execute_step(
    plan: JSON,
    state: JSON,
    step_index: int,
    attempt: int,
    sink: ChunkSink,
    default_timeout: float | None,
    allowed_packages: tuple[str, ...] = ("examples",),
    *,
    settings: Settings | None = None,
    providers: Mapping[str, ProviderFactory] | None = None,
    toolboxes: ToolBoxFactory | None = None,
    hooks: ToolHooks | None = None,
) -> Outcome:
    """Run one step and return its outcome (never raises for a step failure).

    ``settings`` supply the provider knobs (``KNEO_SERV_PROVIDER_*``) and go to the ToolBox; ``providers`` and
    ``toolboxes`` replace the built-in ones (tests).
    """
    step = plan["steps"][step_index]
    timeout = step.get("timeout_seconds") or default_timeout
    env = StepEnv(
        settings=settings,
        allowed_packages=allowed_packages,
        providers=PROVIDERS if providers is None else providers,
        toolboxes=default_toolboxes if toolboxes is None else toolboxes,
        provider_settings=ProviderSettings.from_settings(settings) if settings is not None else ProviderSettings(),
        hooks=hooks if hooks is not None else ToolHooks(),
    )
    preview = settings.tool_result_preview_chars if settings is not None else 1000
    trace = StepTrace(step_index, step["id"], attempt, preview)
    started = time.perf_counter()
    error: str | None = None
    retryable = True
    try:
        async with asyncio.timeout(timeout):
            if step.get("kind") == "function":
                output: Any = await _call_function(plan, step, state, allowed_packages)
                chunks = 0
            else:
                output, chunks = await _call_agent(plan, step, state, attempt, sink, env, trace)
    except TimeoutError:
        error = f"step timed out after {timeout}s"
    except (ProviderError, AgentError) as exc:
        error, retryable = str(exc), exc.retryable
    except StepFunctionError as exc:
        error = str(exc)
    if error is not None:
        return StepErrored(redact_text(error), retryable, tuple(trace.tool_calls), tuple(trace.guardrails))
    return StepSucceeded(
        output, chunks, (time.perf_counter() - started) * 1000, tuple(trace.tool_calls), tuple(trace.guardrails)
    )


def _step_agent(plan: JSON, step: JSON) -> JSON:
    agents: JSON = plan.get("agents") or {}
    agent: JSON = agents.get(step.get("agent") or "") or plan["agent"]
    return agent


def _default_prompt(state: JSON, step_id: str) -> str:
    """A step without a prompt answers the latest turn (a chat participant), or the run's input."""
    transcript = state.get("transcript") or []
    if transcript:
        last = transcript[-1]
        return f"{last['step_id']} said: {last['output']}"
    return str(state.get("input") if state.get("input") is not None else step_id)


async def _call_agent(
    plan: JSON, step: JSON, state: JSON, attempt: int, sink: ChunkSink, env: StepEnv, trace: StepTrace
) -> tuple[str, int]:
    """The agent loop: guard the prompt, build the conversation (instructions, memory, prompt), then model turns
    (text streamed to ``sink``, tool calls run through the agent's ToolBox and answered) until the model answers
    without calling a tool; guard the answer."""
    agent = _step_agent(plan, step)
    model = agent["model"]
    factory = env.providers.get(model.get("provider", "dummy"))
    if factory is None:
        raise ProviderError(f"provider {model.get('provider')!r} is not available in this runner", retryable=False)
    params: JSON = model.get("params") or {}
    outputs = state.get("step_outputs", {})
    prompt = (
        render_prompt(step["prompt"], state.get("input"), outputs, step["id"])
        if step.get("prompt")
        else _default_prompt(state, step["id"])
    )
    guardrails: JSON = agent.get("guardrails") or {}
    if guardrails.get("input"):
        prompt = await _guard("input", guardrails["input"], prompt, env, trace)
    messages: list[Message] = []
    if agent.get("instructions"):
        messages.append(Message("system", str(agent["instructions"])))
    if agent.get("memory"):
        messages += await _memory(plan, agent, state, env)
    messages.append(Message("user", prompt))
    seed = f"{plan.get('spec_name')}:{step['id']}:{len(state.get('transcript') or [])}"
    max_turns = int(params.get("max_turns") or agent.get("max_turns") or DEFAULT_MAX_TURNS)
    provider = factory(model, env.provider_settings)
    try:
        if agent.get("tools") or agent.get("mcp"):
            settings = env.settings if env.settings is not None else Settings()
            async with env.toolboxes(agent, settings, env.allowed_packages) as box:
                text, chunks = await _turns(provider, messages, box, max_turns, seed, attempt, sink, env, trace)
        else:
            text, chunks = await _turns(provider, messages, None, max_turns, seed, attempt, sink, env, trace)
    finally:
        await provider.aclose()
    if guardrails.get("output"):
        text = await _guard("output", guardrails["output"], text, env, trace)
    return text, chunks


async def _turns(
    provider: Provider,
    messages: list[Message],
    box: ToolBoxLike | None,
    max_turns: int,
    seed: str,
    attempt: int,
    sink: ChunkSink,
    env: StepEnv,
    trace: StepTrace,
) -> tuple[str, int]:
    """Model turns until one answers without tool calls (its text is the step's output), at most ``max_turns``."""
    specs = list(box.specs()) if box is not None else []
    seq = 0
    for turn in range(1, max_turns + 1):
        parts: list[str] = []
        calls: list[ToolCallRequest] = []
        ctx = TurnContext(seed, trace.step_id, attempt, turn)
        async with aclosing(stream_with_retries(provider, messages, specs, ctx, env.provider_settings)) as items:
            async for item in items:
                if isinstance(item, TextDelta):
                    await sink(item.text, seq)
                    seq += 1
                    parts.append(item.text)
                elif isinstance(item, ToolCallRequest):
                    calls.append(item)
        text = "".join(parts)
        if not calls:
            return text, seq
        messages.append(Message("assistant", text, tool_calls=tuple(calls)))
        for call in calls:
            ok, content = await _run_tool(box, call, turn, trace, env.hooks)
            messages.append(Message("tool", content, tool_call_id=call.id, name=call.name, is_error=not ok))
    raise AgentError(f"the model was still calling tools after max_turns={max_turns} turns")


async def _hook(what: str, coro: Awaitable[Any]) -> Any:
    try:
        return await coro
    except StepCancelled:
        raise
    except Exception:
        log.exception("tool hook %s failed; the step goes on", what)
        return None


async def _run_tool(
    box: ToolBoxLike | None, call: ToolCallRequest, turn: int, trace: StepTrace, hooks: ToolHooks | None = None
) -> tuple[bool, str]:
    """Call one tool; whatever goes wrong becomes a result the model sees (and an event), never a crash."""
    hooks = hooks if hooks is not None else ToolHooks()
    started = time.perf_counter()
    await _hook("started", hooks.started(call))
    cached = False
    if call.arguments_error is not None:
        ok, content = False, f"tool {call.name!r} was not called: {call.arguments_error}"
    elif box is None:
        ok, content = False, f"tool {call.name!r} is not available: this agent has no tools"
    elif (hit := await _hook("lookup", hooks.lookup(call.name, call.arguments))) is not None:
        (ok, content), cached = hit, True
    else:
        try:
            result = await box.call(call.name, call.arguments)
            ok, content = bool(result.ok), str(result.content)
        except Exception as exc:  # a ToolBox should not raise; if it does, the model still gets an answer
            ok, content = False, f"tool {call.name!r} failed: {type(exc).__name__}: {exc}"
        if ok:
            await _hook("remember", hooks.remember(call.name, call.arguments, ok, content))
    await _hook("finished", hooks.finished(call, ok, content, cached))
    limit = trace.preview_chars
    arguments: JSON = redact(call.arguments)
    shown = dumps(arguments).decode()
    if len(shown) > limit:
        arguments = {"_preview": shown[:limit], "_chars": len(shown)}
    trace.tool_calls.append(
        StepToolCalled(
            step_index=trace.step_index,
            step_id=trace.step_id,
            attempt=trace.attempt,
            turn=turn,
            call_id=call.id,
            tool=call.name,
            arguments=arguments,
            ok=ok,
            result_preview=redact_text(content[:limit]),
            result_chars=len(content),
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
            cached=cached,
        )
    )
    return ok, content


async def _call_user_function(fn: Any, *args: Any) -> Any:
    """Call a spec's function: awaited if async, in a worker thread if not (it may block)."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    return await anyio.to_thread.run_sync(functools.partial(fn, *args))


async def _guard(stage: str, guards: list[JSON], text: str, env: StepEnv, trace: StepTrace) -> str:
    """Run a stage's guardrails in order on ``text``; returns the text (rewritten if a guardrail rewrote it).

    A guardrail returns True/None (pass), False (fail), a str (the replacement text), or
    ``{"allowed": bool, "text": str?, "reason": str?}``. A guardrail that raises has failed. ``on_fail: block``
    fails the step (not retryable); ``warn`` records the failure and goes on.
    """
    for guard in guards:
        gid = str(guard.get("id") or guard.get("function"))
        try:
            fn = import_function(str(guard.get("function") or ""), env.allowed_packages)
        except StepFunctionError as exc:
            raise AgentError(f"guardrail {gid}: {exc}") from None
        allowed, reason, replacement = True, None, None
        try:
            verdict = await _call_user_function(fn, text)
        except Exception as exc:
            allowed, reason = False, f"the guardrail raised {type(exc).__name__}: {exc}"
        else:
            if isinstance(verdict, str):
                replacement = verdict
            elif isinstance(verdict, dict):
                allowed = bool(verdict.get("allowed", True))
                reason = str(verdict["reason"]) if verdict.get("reason") is not None else None
                replacement = verdict.get("text") if isinstance(verdict.get("text"), str) else None
            elif verdict is not None:
                allowed = bool(verdict)
        block = not allowed and guard.get("on_fail", "block") == "block"
        if not allowed:
            action = "blocked" if block else "warned"
            reason = reason or f"the {stage} did not pass {gid}"
        elif replacement is not None and replacement != text:
            action = "rewritten"
        else:
            continue
        trace.guardrails.append(
            GuardrailFired(
                step_index=trace.step_index,
                step_id=trace.step_id,
                attempt=trace.attempt,
                stage=stage,
                guardrail_id=gid,
                action=action,
                reason=redact_text(reason) if reason else None,
            )
        )
        if block:
            raise AgentError(f"guardrail {gid} blocked the {stage}: {reason}")
        if replacement is not None:
            text = replacement
    return text


def _is_message(m: Any) -> bool:
    roles = ("system", "user", "assistant")
    return isinstance(m, dict) and m.get("role") in roles and isinstance(m.get("content"), str)


async def _memory(plan: JSON, agent: JSON, state: JSON, env: StepEnv) -> list[Message]:
    """Earlier turns of the run as conversation history, per the agent's ``memory``.

    ``none``: nothing. ``buffer``: every earlier turn. ``window``: the last ``window`` turns (default 10).
    ``summary``: like window, with the turns that fall out folded into one shortened note. A turn this agent
    produced is an assistant message; another step's is a user message "<step> said: …". ``compress_history``
    (module:attr) gets the whole history as ``[{"role", "content"}]`` when it is longer than the window (always
    for ``buffer``) and returns the history to use instead.
    """
    memory: JSON = agent["memory"]
    kind = memory.get("kind") or "buffer"
    transcript = state.get("transcript") or []
    if kind == "none" or not transcript:
        return []
    by_id = {s["id"]: s for s in plan["steps"]}
    history: list[JSON] = []
    for entry in transcript:
        sid, output = entry.get("step_id"), entry.get("output")
        text = output if isinstance(output, str) else dumps(output).decode()
        owner = by_id.get(sid)
        if owner is not None and _step_agent(plan, owner).get("id") == agent.get("id"):
            history.append({"role": "assistant", "content": text})
        else:
            history.append({"role": "user", "content": f"{sid} said: {text}"})
    window = int(memory.get("window") or DEFAULT_MEMORY_WINDOW) if kind in ("window", "summary") else None
    fn_name = memory.get("compress_history")
    if fn_name and (window is None or len(history) > window):
        try:
            fn = import_function(str(fn_name), env.allowed_packages)
        except StepFunctionError as exc:
            raise AgentError(f"memory.compress_history: {exc}") from None
        try:
            compressed = await _call_user_function(fn, [dict(m) for m in history])
        except Exception as exc:
            raise AgentError(f"memory.compress_history {fn_name} raised {type(exc).__name__}: {exc}", True) from None
        if not isinstance(compressed, list) or not all(_is_message(m) for m in compressed):
            raise AgentError(f"memory.compress_history {fn_name} must return a list of {{role, content}} messages")
        history = compressed
    elif window is not None and len(history) > window:
        older, history = history[:-window], history[-window:]
        if kind == "summary":
            note = " | ".join(" ".join(str(m["content"]).split())[:200] for m in older)
            history = [{"role": "system", "content": f"Earlier turns (shortened): {note}"}, *history]
    return [Message(str(m["role"]), str(m["content"])) for m in history]


class StepFunctionError(Exception):
    """A function step could not be imported or raised."""


async def _call_function(plan: JSON, step: JSON, state: JSON, allowed_packages: tuple[str, ...]) -> Any:
    """Call the step's function (``module:attr``, or a component by name) with its ``args`` (placeholders
    rendered); sync functions run in a thread."""
    target = str(step.get("function") or "")
    target = str((plan.get("functions") or {}).get(target, target))
    fn = import_function(target, allowed_packages)
    outputs = state.get("step_outputs", {})
    args = {
        k: render_prompt(v, state.get("input"), outputs, step["id"]) if isinstance(v, str) else v
        for k, v in (step.get("args") or {}).items()
    }
    try:
        if inspect.iscoroutinefunction(fn):
            result = await fn(**args)
        else:
            result = await anyio.to_thread.run_sync(functools.partial(fn, **args))
    except Exception as exc:
        raise StepFunctionError(f"{target} raised {type(exc).__name__}: {exc}") from None
    try:
        orjson.dumps(result)
    except TypeError:
        result = str(result)  # keep the step's output storable
    return result


async def aggregate_outputs(
    plan: JSON,
    state: JSON,
    step_index: int,
    outcome: Outcome,
    allowed_packages: tuple[str, ...] = ("examples",),
    timeout: float = 60.0,
) -> Any:
    """Combine a concurrent run's branch outputs (this last branch included), per the plan's ``aggregation``.

    ``concat`` (default): ``## <branch>`` sections joined by the separator; ``json``: an object of branch → output;
    ``function``: ``module:attr`` called with that object. Failed branches (``on_error: continue``) are left out.
    """
    outputs: JSON = {}
    done = {**(state.get("step_outputs") or {})}
    if isinstance(outcome, StepSucceeded):
        done[plan["steps"][step_index]["id"]] = outcome.output
    for step in plan["steps"]:  # declaration order, whatever order the branches finished in
        if step["id"] in done:
            outputs[step["id"]] = done[step["id"]]
    agg = plan["workflow"].get("aggregation") or {}
    kind = agg.get("kind", "concat")
    if kind == "json":
        return orjson.dumps(outputs).decode()
    if kind == "function" and agg.get("function"):
        try:
            fn = import_function(str(agg["function"]), allowed_packages)
            async with asyncio.timeout(timeout):
                return await anyio.to_thread.run_sync(fn, outputs, abandon_on_cancel=True)
        except Exception as exc:  # the run still ends, with the error visible in its output
            return f"aggregation {agg['function']} failed: {type(exc).__name__}: {exc}"
    separator = agg.get("separator", "\n\n")
    return separator.join(f"## {name}\n{text}" for name, text in outputs.items())
