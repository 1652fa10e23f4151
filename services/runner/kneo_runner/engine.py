"""Step execution: render the step's prompt, call the provider, stream chunks out. I/O lives here."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from kneo_runner.domain import Outcome, StepErrored, StepSucceeded

JSON = dict[str, Any]
ChunkSink = Callable[[str, int], Awaitable[None]]

_WORDS = (
    "signal evidence market demand platform margin supply growth risk model compute data adoption partner "
    "pricing roadmap capacity customer segment trend benchmark forecast moat ecosystem software revenue"
).split()


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


async def execute_step(
    plan: JSON, state: JSON, step_index: int, attempt: int, sink: ChunkSink, default_timeout: float | None
) -> Outcome:
    """Run one step and return its outcome (never raises for a step failure)."""
    step = plan["steps"][step_index]
    agent = plan["agent"]
    model = agent["model"]
    provider = PROVIDERS.get(model.get("provider", "dummy"))
    if provider is None:
        return StepErrored(f"unknown provider {model.get('provider')!r}", retryable=False)
    prompt = render_prompt(step.get("prompt"), state.get("input"), state.get("step_outputs", {}), step["id"])
    timeout = step.get("timeout_seconds") or default_timeout
    started = time.perf_counter()
    parts: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            async for piece in provider.stream(
                instructions=agent.get("instructions"),
                prompt=prompt,
                params=model.get("params") or {},
                seed=f"{plan.get('spec_name')}:{step['id']}",
                attempt=attempt,
            ):
                await sink(piece, len(parts))
                parts.append(piece)
    except TimeoutError:
        return StepErrored(f"step timed out after {timeout}s", retryable=True)
    except ProviderError as exc:
        return StepErrored(str(exc), retryable=exc.retryable)
    return StepSucceeded("".join(parts), len(parts), (time.perf_counter() - started) * 1000)
