"""Step execution: render the step's prompt, call the provider, stream chunks out. I/O lives here."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib
import inspect
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import anyio
import orjson

from kneo_runner.domain import Outcome, StepErrored, StepSucceeded

JSON = dict[str, Any]
ChunkSink = Callable[[str, int], Awaitable[None]]

_WORDS = (
    "signal evidence market demand platform margin supply growth risk model compute data adoption partner "
    "pricing roadmap capacity customer segment trend benchmark forecast moat ecosystem software revenue"
).split()


class StepCancelled(Exception):
    """The run was cancelled while this step was running: stop, record nothing (the run is terminal already)."""


class ProviderError(Exception):
    """A provider call failed; ``retryable`` says whether trying again could help."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class Provider(Protocol):
    """What the runner needs from a model provider: a stream of text chunks for a prompt."""

    def stream(
        self, *, instructions: str | None, prompt: str, params: JSON, seed: str, attempt: int
    ) -> AsyncIterator[str]:
        """Yield the response in chunks."""
        ...


class DummyProvider:
    """Deterministic, offline provider. Output depends only on (seed, prompt); params inject latency and failures.

    params: ``latency_ms`` (per chunk, default 0), ``chunks`` (default 6), ``fail_attempts`` (fail the first N
    attempts of every step, default 0), ``fail_steps`` (list of step ids that always fail).
    """

    async def stream(
        self, *, instructions: str | None, prompt: str, params: JSON, seed: str, attempt: int
    ) -> AsyncIterator[str]:
        if attempt <= int(params.get("fail_attempts", 0)):
            raise ProviderError(f"injected failure on attempt {attempt}")
        n_chunks = max(1, int(params.get("chunks", 6)))
        digest = b""
        block = f"{seed}\x00{prompt}".encode()
        while len(digest) < n_chunks * 2:
            block = hashlib.sha256(block).digest()
            digest += block
        latency = float(params.get("latency_ms", 0)) / 1000.0
        words = [_WORDS[b % len(_WORDS)] for b in digest[: n_chunks * 2]]
        head = prompt.strip().splitlines()[0][:80] if prompt.strip() else "the task"
        pieces = [f"On {head}: "] + [
            f"{words[2 * i]} {words[2 * i + 1]}" + (", " if i < n_chunks - 1 else ".") for i in range(n_chunks)
        ]
        for piece in pieces:
            if latency:
                await asyncio.sleep(latency)
            yield piece


PROVIDERS: dict[str, Provider] = {"dummy": DummyProvider()}

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
) -> Outcome:
    """Run one step and return its outcome (never raises for a step failure)."""
    step = plan["steps"][step_index]
    timeout = step.get("timeout_seconds") or default_timeout
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            if step.get("kind") == "function":
                output: Any = await _call_function(plan, step, state, allowed_packages)
                chunks = 0
            else:
                output, chunks = await _call_agent(plan, step, state, attempt, sink)
    except TimeoutError:
        return StepErrored(f"step timed out after {timeout}s", retryable=True)
    except ProviderError as exc:
        return StepErrored(str(exc), retryable=exc.retryable)
    except StepFunctionError as exc:
        return StepErrored(str(exc), retryable=True)
    return StepSucceeded(output, chunks, (time.perf_counter() - started) * 1000)


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


async def _call_agent(plan: JSON, step: JSON, state: JSON, attempt: int, sink: ChunkSink) -> tuple[str, int]:
    agent = _step_agent(plan, step)
    model = agent["model"]
    provider = PROVIDERS.get(model.get("provider", "dummy"))
    if provider is None:
        raise ProviderError(f"provider {model.get('provider')!r} is not available in this runner", retryable=False)
    outputs = state.get("step_outputs", {})
    prompt = (
        render_prompt(step["prompt"], state.get("input"), outputs, step["id"])
        if step.get("prompt")
        else _default_prompt(state, step["id"])
    )
    parts: list[str] = []
    async for piece in provider.stream(
        instructions=agent.get("instructions"),
        prompt=prompt,
        params=model.get("params") or {},
        seed=f"{plan.get('spec_name')}:{step['id']}:{len(state.get('transcript') or [])}",
        attempt=attempt,
    ):
        await sink(piece, len(parts))
        parts.append(piece)
    return "".join(parts), len(parts)


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
