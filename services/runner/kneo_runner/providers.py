"""Model providers: one small protocol for streamed text, tool calls and multi-turn conversations.

A provider is built for one agent step from the agent's ``model`` block (``provider``, ``name``, ``params``) and the
runner's :class:`ProviderSettings`; the agent loop (``engine._call_agent``) calls :meth:`Provider.stream` once per
model turn with the whole conversation so far and the agent's tools. A turn yields text deltas and tool-call requests
and ends with one :class:`TurnEnd`. Implementations:

- ``dummy``: deterministic from (seed, prompt, step), offline, always available; calls the agent's tools.
- ``openai``: the official ``openai`` SDK (chat completions, streamed); any OpenAI-compatible server via
  ``params.base_url`` (vLLM, Ollama, llama.cpp) or ``OPENAI_BASE_URL``.
- ``anthropic``: the official ``anthropic`` SDK (messages, streamed); ``params.base_url`` or ``ANTHROPIC_BASE_URL``.

The SDKs are optional extras, imported only when a step uses them. Keys come only from environment variables named
by reference (``params.api_key_env`` or the provider's default); they never reach events, outputs or logs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from kneo_events.settings import Settings

JSON = dict[str, Any]

_WORDS = (
    "signal evidence market demand platform margin supply growth risk model compute data adoption partner "
    "pricing roadmap capacity customer segment trend benchmark forecast moat ecosystem software revenue"
).split()

# Params the runner reads itself; everything else in ``params`` goes to the model API as it is.
RUNNER_PARAMS = frozenset(
    {"base_url", "api_key_env", "max_turns", "latency_ms", "chunks", "fail_attempts", "fail_steps", "tool_calls"}
    | {"call_tools"}
)
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
EXTRAS = {"openai": "openai", "anthropic": "anthropic"}
PLACEHOLDER_KEY = "kneo-no-key"  # what an OpenAI-compatible local server gets when no key is configured
# A spec names the variable that holds its key; only key-like names, never the platform's own settings.
_KEY_ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]*(API_KEY|_KEY|_TOKEN)$")


class ProviderError(Exception):
    """A provider call failed; ``retryable`` says whether trying again could help."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


# ---------------------------------------------------------------- conversation shapes


@dataclass(frozen=True)
class ToolCallRequest:
    """The model asks for one tool call. ``arguments_error`` when its arguments were not a JSON object."""

    id: str
    name: str
    arguments: JSON
    arguments_error: str | None = None


@dataclass(frozen=True)
class TextDelta:
    """A piece of the model's text, in order."""

    text: str


@dataclass(frozen=True)
class TurnEnd:
    """The last item of every turn."""

    stop_reason: str | None = None
    usage: JSON = field(default_factory=dict)


StreamItem = TextDelta | ToolCallRequest | TurnEnd


@dataclass(frozen=True)
class Message:
    """One message of the conversation, provider-neutral.

    ``system`` / ``user`` / ``assistant`` carry ``content``; an assistant message may carry ``tool_calls``; a
    ``tool`` message answers the call ``tool_call_id`` (``is_error`` when the tool failed).
    """

    role: str
    content: str
    tool_calls: tuple[ToolCallRequest, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
    is_error: bool = False


class ToolDescriptor(Protocol):
    """What a provider needs to know about a tool (``kneo_runner.tools.ToolSpec`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def parameters(self) -> JSON: ...


@dataclass(frozen=True)
class TurnContext:
    """Where a turn happens: ``seed`` identifies the step's position in the run; ``turn`` counts from 1."""

    seed: str
    step_id: str
    attempt: int
    turn: int


class Provider(Protocol):
    """A model provider for one step: stream a turn, then (once the step is done) close."""

    def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolDescriptor], ctx: TurnContext
    ) -> AsyncGenerator[StreamItem, None]:
        """Yield the turn's text deltas and tool calls, then one :class:`TurnEnd`."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


@dataclass(frozen=True)
class ProviderSettings:
    """The runner's provider knobs (``KNEO_SERV_PROVIDER_*``) and where keys are looked up."""

    retries: int = 0
    retry_backoff_seconds: float = 0.25
    timeout_seconds: float | None = None
    require_secrets: bool = False
    env: Mapping[str, str] = field(default_factory=lambda: os.environ)

    @classmethod
    def from_settings(cls, settings: Settings) -> ProviderSettings:
        """The provider settings of the platform settings."""
        return cls(
            retries=max(0, settings.provider_retries),
            retry_backoff_seconds=settings.provider_retry_backoff_seconds,
            timeout_seconds=settings.provider_timeout_seconds,
            require_secrets=settings.require_provider_secrets,
        )


ProviderFactory = Callable[[JSON, ProviderSettings], Provider]


async def stream_with_retries(
    provider: Provider,
    messages: Sequence[Message],
    tools: Sequence[ToolDescriptor],
    ctx: TurnContext,
    settings: ProviderSettings,
) -> AsyncGenerator[StreamItem, None]:
    """One turn, retried (``KNEO_SERV_PROVIDER_RETRIES``, backoff × 2^n) on a retryable error before any output.

    Once a turn has yielded something (chunks already went to the client), a failure is not retried here: the step
    fails (retryably) and the step's own ``max_retries`` decides.
    """
    for n in range(settings.retries + 1):
        produced = False
        try:
            async with aclosing(provider.stream(messages, tools, ctx)) as items:
                async for item in items:
                    produced = True
                    yield item
            return
        except ProviderError as exc:
            if produced or not exc.retryable or n >= settings.retries:
                if exc.retryable and n:
                    raise ProviderError(f"{exc} (after {n + 1} attempts)", retryable=True) from None
                raise
        await asyncio.sleep(settings.retry_backoff_seconds * (2**n))


def resolve_api_key(provider: str, params: JSON, settings: ProviderSettings) -> str:
    """The provider key from the environment variable the spec names (or the provider's default one).

    A ``base_url`` without ``api_key_env`` gets no default key: a spec must not be able to send the platform's
    OpenAI key to a server of its choosing.
    """
    if "api_key" in params:
        raise ProviderError(
            "model params must not carry a key: put it in an environment variable and name it in params.api_key_env",
            retryable=False,
        )
    named = params.get("api_key_env")
    if named is not None and (not isinstance(named, str) or not _KEY_ENV_NAME.match(named) or named.startswith("KNEO")):
        raise ProviderError(
            f"params.api_key_env {named!r} must name a key variable (like MY_PROVIDER_API_KEY), not a KNEO_* setting",
            retryable=False,
        )
    env_name = named or (None if params.get("base_url") else DEFAULT_KEY_ENV.get(provider))
    value = settings.env.get(env_name) if env_name else None
    if value:
        return value
    if settings.require_secrets:
        if env_name is None:
            raise ProviderError(
                f"provider {provider!r} with a base_url needs params.api_key_env "
                "(KNEO_SERV_REQUIRE_PROVIDER_SECRETS=true)",
                retryable=False,
            )
        raise ProviderError(
            f"provider {provider!r} needs an API key in the environment variable {env_name}, which is not set "
            "(KNEO_SERV_REQUIRE_PROVIDER_SECRETS=true)",
            retryable=False,
        )
    return PLACEHOLDER_KEY


def api_params(params: JSON) -> JSON:
    """The params that go to the model API (the runner's own are left out)."""
    return {k: v for k, v in params.items() if k not in RUNNER_PARAMS}


def _parse_arguments(raw: str) -> tuple[JSON, str | None]:
    if not raw.strip():
        return {}, None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        return {}, f"the arguments were not valid JSON ({exc.msg})"
    if not isinstance(value, dict):
        return {}, "the arguments were not a JSON object"
    return value, None


def _retryable_status(status: int) -> bool:
    """429, 408 and 5xx may pass on a retry; any other 4xx will not."""
    return status in (408, 429) or status >= 500


def _missing_sdk(provider: str) -> ProviderError:
    extra = EXTRAS[provider]
    return ProviderError(
        f"provider {provider!r} needs the {extra} SDK, which is not installed: pip install 'kneo[{extra}]'",
        retryable=False,
    )


# ---------------------------------------------------------------- dummy


class DummyProvider:
    """Deterministic, offline provider. Output depends only on (seed, prompt, tool results); params inject latency,
    failures and tool use.

    params: ``latency_ms`` (per streamed chunk and per tool-calling turn, default 0), ``chunks`` (default 6),
    ``fail_attempts`` (fail the first N attempts of every step, default 0), ``fail_steps`` (step ids that always
    fail), ``tool_calls`` (how many tool calls in all, default one per tool; each turn calls every tool once until the
    count is reached), ``call_tools: false`` (never call tools).
    """

    def __init__(self, model: JSON | None = None, settings: ProviderSettings | None = None) -> None:
        self.params: JSON = dict((model or {}).get("params") or {})

    async def aclose(self) -> None:
        """Nothing to release."""

    async def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolDescriptor], ctx: TurnContext
    ) -> AsyncGenerator[StreamItem, None]:
        params = self.params
        if ctx.turn == 1 and ctx.attempt <= int(params.get("fail_attempts", 0)):
            raise ProviderError(f"injected failure on attempt {ctx.attempt}")
        if ctx.step_id in (params.get("fail_steps") or []):
            raise ProviderError(f"injected failure of step {ctx.step_id}")
        latency = float(params.get("latency_ms", 0)) / 1000.0
        user_at = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
        prompt = messages[user_at].content if user_at >= 0 else ""
        since = messages[user_at + 1 :]
        made = sum(len(m.tool_calls) for m in since if m.role == "assistant")
        wanted = 0 if params.get("call_tools") is False or not tools else int(params.get("tool_calls", len(tools)))
        if made < wanted:
            if latency:
                await asyncio.sleep(latency)
            for i in range(made, min(wanted, made + len(tools))):
                tool = tools[i % len(tools)]
                yield ToolCallRequest(f"call_{ctx.turn}_{i}", tool.name, _dummy_arguments(tool.parameters, prompt))
            yield TurnEnd("tool_calls")
            return
        results = [m for m in since if m.role == "tool"]
        for piece in _dummy_pieces(ctx.seed, prompt, int(params.get("chunks", 6)), results):
            if latency:
                await asyncio.sleep(latency)
            yield TextDelta(piece)
        yield TurnEnd("stop")


def _head(prompt: str) -> str:
    return prompt.strip().splitlines()[0][:80] if prompt.strip() else "the task"


def _dummy_pieces(seed: str, prompt: str, chunks: int, results: Sequence[Message]) -> list[str]:
    n_chunks = max(1, chunks)
    digest = b""
    block = f"{seed}\x00{prompt}".encode()
    while len(digest) < n_chunks * 2:
        block = hashlib.sha256(block).digest()
        digest += block
    words = [_WORDS[b % len(_WORDS)] for b in digest[: n_chunks * 2]]
    pieces = [f"On {_head(prompt)}: "] + [
        f"{words[2 * i]} {words[2 * i + 1]}" + (", " if i < n_chunks - 1 else ".") for i in range(n_chunks)
    ]
    if results:  # the answer uses what the tools said
        seen = "; ".join(
            f"{m.name}{' failed' if m.is_error else ''}: {' '.join(m.content.split())[:120]}" for m in results
        )
        pieces.append(f" From {len(results)} tool result{'s' if len(results) != 1 else ''}: {seen}.")
    return pieces


def _dummy_arguments(schema: JSON, prompt: str) -> JSON:
    """Arguments that fit the tool's JSON schema, derived from the prompt: the required properties (when the schema
    lists none, those without a default); optional ones keep their defaults, as a careful model would leave them."""
    props: JSON = schema.get("properties") or {}
    if "required" in schema:
        names = list(schema["required"] or [])
    else:
        names = [n for n in props if "default" not in (props.get(n) or {})]
    head = _head(prompt)
    out: JSON = {}
    for name in names:
        kind = (props.get(name) or {}).get("type", "string")
        if kind == "integer":
            out[name] = 1
        elif kind == "number":
            out[name] = 1.0
        elif kind == "boolean":
            out[name] = True
        elif kind == "array":
            out[name] = [head]
        elif kind == "object":
            out[name] = {}
        elif "url" in name.lower() or (props.get(name) or {}).get("format") == "uri":
            slug = "_".join(re.findall(r"[A-Za-z0-9]+", head)[:6]) or "Main_Page"
            out[name] = f"https://en.wikipedia.org/wiki/{slug}"
        else:
            out[name] = head
    return out


# ---------------------------------------------------------------- openai (and OpenAI-compatible servers)


class OpenAIProvider:
    """Chat completions through the official ``openai`` SDK, streamed, with function tools."""

    def __init__(self, model: JSON, settings: ProviderSettings) -> None:
        try:
            import openai
        except ImportError:
            raise _missing_sdk("openai") from None
        self._sdk = openai
        params: JSON = dict(model.get("params") or {})
        key = resolve_api_key("openai", params, settings)
        self.model_name = str(model.get("name") or "")
        self.timeout = settings.timeout_seconds
        self.extra_body = api_params(params)
        options: JSON = {} if settings.timeout_seconds is None else {"timeout": settings.timeout_seconds}
        self.client = openai.AsyncOpenAI(
            api_key=key,
            base_url=params.get("base_url") or None,
            max_retries=0,  # the runner retries (KNEO_SERV_PROVIDER_RETRIES), only before any output
            **options,
        )

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self.client.close()

    async def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolDescriptor], ctx: TurnContext
    ) -> AsyncGenerator[StreamItem, None]:
        sdk = self._sdk
        request: JSON = {"model": self.model_name, "messages": openai_messages(messages), "stream": True}
        if tools:
            request["tools"] = [
                {
                    "type": "function",
                    "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
                }
                for t in tools
            ]
        if self.extra_body:
            request["extra_body"] = self.extra_body
        calls: dict[int, JSON] = {}
        stop: str | None = None
        usage: JSON = {}
        try:
            response = cast(Any, await self.client.chat.completions.create(**request))
            async with response as chunks:
                async for chunk in chunks:
                    if chunk.usage is not None:
                        usage = {
                            "input_tokens": chunk.usage.prompt_tokens,
                            "output_tokens": chunk.usage.completion_tokens,
                        }
                    if not chunk.choices:
                        continue
                    choice = chunk.choices[0]
                    delta = choice.delta
                    if delta is not None and delta.content:
                        yield TextDelta(delta.content)
                    for tc in (delta.tool_calls if delta is not None else None) or []:
                        slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                        if tc.id:
                            slot["id"] = tc.id
                        if tc.function is not None:
                            if tc.function.name and not slot["name"]:
                                slot["name"] = tc.function.name
                            if tc.function.arguments:
                                slot["arguments"] += tc.function.arguments
                    if choice.finish_reason:
                        stop = choice.finish_reason
        except sdk.APIStatusError as exc:
            raise ProviderError(
                f"openai: HTTP {exc.status_code}: {exc.message}", retryable=_retryable_status(exc.status_code)
            ) from None
        except sdk.APITimeoutError:
            raise ProviderError(f"openai: request timed out (timeout {self.timeout}s)", retryable=True) from None
        except sdk.APIConnectionError as exc:
            raise ProviderError(f"openai: connection failed: {exc.message}", retryable=True) from None
        except sdk.APIError as exc:
            raise ProviderError(f"openai: {exc.message}", retryable=True) from None
        for index in sorted(calls):
            slot = calls[index]
            arguments, error = _parse_arguments(slot["arguments"])
            yield ToolCallRequest(slot["id"] or f"call_{ctx.turn}_{index}", slot["name"], arguments, error)
        yield TurnEnd(stop, usage)


def openai_messages(messages: Sequence[Message]) -> list[JSON]:
    """Our conversation as chat-completions messages."""
    out: list[JSON] = []
    for m in messages:
        if m.role == "tool":
            out.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content})
        elif m.role == "assistant" and m.tool_calls:
            out.append(
                {
                    "role": "assistant",
                    "content": m.content or None,
                    "tool_calls": [
                        {
                            "id": c.id,
                            "type": "function",
                            "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
                        }
                        for c in m.tool_calls
                    ],
                }
            )
        else:
            out.append({"role": m.role, "content": m.content})
    return out


# ---------------------------------------------------------------- anthropic


class AnthropicProvider:
    """Messages through the official ``anthropic`` SDK, streamed, with ``tool_use`` blocks mapped to our tools."""

    def __init__(self, model: JSON, settings: ProviderSettings) -> None:
        try:
            import anthropic
        except ImportError:
            raise _missing_sdk("anthropic") from None
        self._sdk = anthropic
        params: JSON = dict(model.get("params") or {})
        key = resolve_api_key("anthropic", params, settings)
        self.model_name = str(model.get("name") or "")
        self.timeout = settings.timeout_seconds
        extra = api_params(params)
        self.max_tokens = int(extra.pop("max_tokens", 1024))
        self.extra_body = extra
        options: JSON = {} if settings.timeout_seconds is None else {"timeout": settings.timeout_seconds}
        self.client = anthropic.AsyncAnthropic(
            api_key=key,
            base_url=params.get("base_url") or None,
            max_retries=0,  # the runner retries (KNEO_SERV_PROVIDER_RETRIES), only before any output
            **options,
        )

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self.client.close()

    async def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolDescriptor], ctx: TurnContext
    ) -> AsyncGenerator[StreamItem, None]:
        sdk = self._sdk
        system, turns = anthropic_messages(messages)
        request: JSON = {"model": self.model_name, "max_tokens": self.max_tokens, "messages": turns, "stream": True}
        if system:
            request["system"] = system
        if tools:
            request["tools"] = [
                {"name": t.name, "description": t.description, "input_schema": t.parameters} for t in tools
            ]
        if self.extra_body:
            request["extra_body"] = self.extra_body
        calls: dict[int, JSON] = {}
        stop: str | None = None
        usage: JSON = {}
        try:
            response = cast(Any, await self.client.messages.create(**request))
            async with response as events:
                async for event in events:
                    if event.type == "content_block_start" and event.content_block.type == "tool_use":
                        block = event.content_block
                        calls[event.index] = {"id": block.id, "name": block.name, "json": ""}
                    elif event.type == "content_block_delta":
                        if event.delta.type == "text_delta":
                            if event.delta.text:
                                yield TextDelta(event.delta.text)
                        elif event.delta.type == "input_json_delta" and event.index in calls:
                            calls[event.index]["json"] += event.delta.partial_json
                    elif event.type == "message_delta":
                        stop = event.delta.stop_reason
                        usage = {"output_tokens": event.usage.output_tokens}
        except sdk.APIStatusError as exc:
            raise ProviderError(
                f"anthropic: HTTP {exc.status_code}: {exc.message}", retryable=_retryable_status(exc.status_code)
            ) from None
        except sdk.APITimeoutError:
            raise ProviderError(f"anthropic: request timed out (timeout {self.timeout}s)", retryable=True) from None
        except sdk.APIConnectionError as exc:
            raise ProviderError(f"anthropic: connection failed: {exc.message}", retryable=True) from None
        except sdk.APIError as exc:
            raise ProviderError(f"anthropic: {exc.message}", retryable=True) from None
        for index in sorted(calls):
            slot = calls[index]
            arguments, error = _parse_arguments(slot["json"])
            yield ToolCallRequest(slot["id"], slot["name"], arguments, error)
        yield TurnEnd(stop, usage)


def anthropic_messages(messages: Sequence[Message]) -> tuple[str, list[JSON]]:
    """Our conversation as (system prompt, messages): system messages join the system prompt, tool results are
    ``tool_result`` blocks of a user turn, consecutive turns of one role merge, and the first turn is a user's."""
    system: list[str] = []
    turns: list[JSON] = []
    for m in messages:
        if m.role == "system":
            system.append(m.content)
            continue
        if m.role == "tool":
            role = "user"
            blocks: list[JSON] = [
                {"type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content, "is_error": m.is_error}
            ]
        else:
            role = "assistant" if m.role == "assistant" else "user"
            blocks = [{"type": "text", "text": m.content}] if m.content else []
            blocks += [{"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments} for c in m.tool_calls]
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if turns and turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": [{"type": "text", "text": "(the conversation so far follows)"}]})
    return "\n\n".join(system), turns


PROVIDERS: Mapping[str, ProviderFactory] = {
    "dummy": DummyProvider,
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
}
