"""Agent tools: Python functions with enforced permissions, and MCP servers through the official ``mcp`` SDK.

The agent loop (engine.py) opens one ``ToolBox`` per agent step::

    async with ToolBox.for_agent(agent, settings, allowed_packages) as box:
        specs = box.specs()                        # what the model is offered
        result = await box.call(name, arguments)   # never raises for a tool failure

What the compiled agent declares (services/compiler/kneo_compiler/compile.py ``_agent``) and how it becomes tools:

- ``tools[]`` with ``function: "pkg.module:attr"``: a Python function tool named by its ``id``. Imported only through
  the runner's allow-list (``KNEO_SERV_FUNCTION_PACKAGES``). The JSON Schema of its arguments comes from its signature;
  ``params`` are keyword arguments fixed by the spec (bound, and hidden from the model). A parameter annotated with
  ``ToolContext`` receives the context, the tool's only sanctioned way to do I/O under its ``permissions``.
- ``tools[]`` with ``mcp: "<server id>"`` or ``mcp: "<server id>:<tool>"``: the MCP tool ``<tool>`` (default: the
  entry's ``id``) of that declared server, offered to the model under the entry's ``id``.
- a shorthand tool (compiled as ``mcp_tool: true``): the tool of that name on the declared server whose ``tools``
  allow-list names it (else on a server that imports all its tools), offered under its own name.
- ``mcp[]``: every other tool of each declared server (filtered by its ``tools`` allow-list) is offered as
  ``<server id>__<tool>``: OpenAI and Anthropic accept only ``[a-zA-Z0-9_-]{1,64}`` as tool names, so no dots.

Permissions are enforced on the I/O a tool does through its ``ToolContext`` (HTTP, files, shell). Python code that
opens sockets or files directly is not sandboxed: only import tools you trust (that is what the allow-list is for).
See docs/tools.md.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import signal
import subprocess
import sys
import typing
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc
import anyio.to_thread
import httpx
import pydantic
import pydantic_core

from kneo_events.settings import Settings

log = logging.getLogger("kneo.runner.tools")

JSON = dict[str, Any]

MCP_NAME_SEPARATOR = "__"
# A hung MCP server must not hold a step for its whole timeout even when KNEO_SERV_MCP_TIMEOUT_SECONDS is unset.
DEFAULT_MCP_CONNECT_TIMEOUT = 30.0
# Bounded waits while shutting an MCP connection down (the SDK's stdio shutdown is itself bounded to a few seconds).
_MCP_CLOSE_TIMEOUT = 10.0
# Shell output kept per stream: enough for the model, bounded for memory.
SHELL_OUTPUT_LIMIT = 1_000_000
_ENV_REF = re.compile(r"^(?:\$\{(?:env:)?(?P<braced>[A-Za-z_][A-Za-z0-9_]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))$")
_TOOL_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]")


@dataclass(frozen=True)
class ToolSpec:
    """What the model is told about one tool: its name, description and the JSON Schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one tool call as the model sees it (the error text when ``ok`` is False)."""

    ok: bool
    content: str


class ToolConfigError(ValueError):
    """The agent's tools cannot be set up (unknown MCP server, bad ``params``, …): a spec problem, not a tool
    failure. Import problems surface as the engine's ``StepFunctionError`` from ``import_function``."""


class ToolPermissionError(PermissionError):
    """A tool tried I/O its ``permissions`` do not grant. The message says what was refused and what is allowed."""


class NetworkNotAllowed(ToolPermissionError):
    """An HTTP request (or a redirect) to a host outside the tool's ``network`` permission."""


class FilesystemNotAllowed(ToolPermissionError):
    """A path outside the tool's ``filesystem`` read/write roots (after resolving ``..`` and symlinks)."""


class ShellNotAllowed(ToolPermissionError):
    """A shell command from a tool without ``shell: true``."""


class ShellTimeout(TimeoutError):
    """A shell command ran past its timeout and was killed (with its whole process group)."""


# --------------------------------------------------------------------------------------------------- permissions


@dataclass(frozen=True)
class Permissions:
    """A tool's permissions, parsed from the compiled spec, with paths resolved.

    ``network``: ``None`` = any host (``network: true``, or a mapping without ``allowed_domains``, which the compiler
    reports as unrestricted); a tuple of domains = those and their subdomains (an empty list allows none).
    """

    network: tuple[str, ...] | None = ()
    read_roots: tuple[Path, ...] = ()
    write_roots: tuple[Path, ...] = ()
    shell: bool = False

    @classmethod
    def from_spec(cls, raw: JSON | None, base_dir: Path) -> Permissions:
        """Parse ``permissions`` of a tool entry; relative roots are relative to ``base_dir`` (the spec root)."""
        raw = raw or {}
        net = raw.get("network", False)
        network: tuple[str, ...] | None
        if net is True:
            network = None
        elif isinstance(net, dict):
            domains = net.get("allowed_domains")
            network = None if domains is None else tuple(_normalize_domain(d) for d in domains)
        else:
            network = ()
        fs = raw.get("filesystem") or {}
        return cls(
            network=network,
            read_roots=tuple(_resolve_root(p, base_dir) for p in fs.get("read") or []),
            write_roots=tuple(_resolve_root(p, base_dir) for p in fs.get("write") or []),
            shell=bool(raw.get("shell", False)),
        )

    def host_allowed(self, host: str) -> bool:
        """Whether ``host`` is one of the allowed domains or a subdomain of one."""
        if self.network is None:
            return True
        host = _normalize_domain(host)
        return any(host == d or host.endswith("." + d) for d in self.network if d)


def _normalize_domain(domain: str) -> str:
    domain = domain.strip().lower().rstrip(".")
    domain = domain.removeprefix("*.").lstrip(".")
    if domain.startswith("[") and domain.endswith("]"):  # an IPv6 literal as written in a URL
        domain = domain[1:-1]
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def _resolve_root(path: str, base_dir: Path) -> Path:
    p = Path(path).expanduser()
    return Path(os.path.realpath(p if p.is_absolute() else base_dir / p))


# --------------------------------------------------------------------------------------------------- ToolContext


class GuardedAsyncClient(httpx.AsyncClient):
    """``httpx.AsyncClient`` that checks every request, redirects included, against the tool's network permission.

    The check is a request event hook, which httpx runs for each hop of a redirect chain; assigning
    ``event_hooks`` keeps it first.
    """

    def __init__(self, *, tool: str, permissions: Permissions, **kwargs: Any) -> None:
        self._guard = functools.partial(_check_request, tool, permissions)
        super().__init__(**kwargs)
        self.event_hooks = kwargs.get("event_hooks") or {}

    @property
    def event_hooks(self) -> dict[str, list[Callable[..., Any]]]:
        return self._event_hooks

    @event_hooks.setter
    def event_hooks(self, event_hooks: dict[str, list[Callable[..., Any]]]) -> None:
        guard = self._guard

        async def check(request: httpx.Request) -> None:
            guard(request)

        self._event_hooks = {
            "request": [check, *event_hooks.get("request", [])],
            "response": list(event_hooks.get("response", [])),
        }


class GuardedClient(httpx.Client):
    """The synchronous twin of ``GuardedAsyncClient``, for sync tools (they run in a worker thread)."""

    def __init__(self, *, tool: str, permissions: Permissions, **kwargs: Any) -> None:
        self._guard = functools.partial(_check_request, tool, permissions)
        super().__init__(**kwargs)
        self.event_hooks = kwargs.get("event_hooks") or {}

    @property
    def event_hooks(self) -> dict[str, list[Callable[..., Any]]]:
        return self._event_hooks

    @event_hooks.setter
    def event_hooks(self, event_hooks: dict[str, list[Callable[..., Any]]]) -> None:
        self._event_hooks = {
            "request": [self._guard, *event_hooks.get("request", [])],
            "response": list(event_hooks.get("response", [])),
        }


def _check_request(tool: str, permissions: Permissions, request: httpx.Request) -> None:
    url = request.url
    if url.scheme not in ("http", "https"):
        raise NetworkNotAllowed(f"tool {tool!r} may only use http and https, not {url.scheme!r}")
    host = url.raw_host.decode("ascii", "replace")
    if not permissions.host_allowed(host):
        allowed = "none" if not permissions.network else ", ".join(permissions.network)
        raise NetworkNotAllowed(
            f"network access to {host!r} is not allowed for tool {tool!r} (allowed domains: {allowed})"
        )


@dataclass(frozen=True)
class ShellResult:
    """What a shell command did: exit code and its (decoded, bounded) output."""

    returncode: int
    stdout: str
    stderr: str


class ToolContext:
    """What a tool may use for I/O, each operation checked against the tool's ``permissions``.

    Declare a parameter annotated ``ToolContext`` to receive it (it is not part of the arguments the model sees):

    - ``http`` (async tools) / ``http_sync`` (sync tools): HTTP clients that refuse hosts outside
      ``network.allowed_domains`` on every request, redirects included.
    - ``open`` / ``read_text`` / ``read_bytes`` / ``write_text`` / ``resolve``: paths relative to the spec root,
      resolved (``..`` and symlinks) before the check; reads under ``filesystem.read`` or ``filesystem.write`` roots,
      writes under ``filesystem.write`` roots only. These are blocking calls: fine in sync tools (they run in a
      thread); async tools should wrap large reads in ``anyio.to_thread.run_sync``.
    - ``run_shell``: only with ``shell: true``; killed (whole process group) at its timeout.
    """

    def __init__(self, tool: str, permissions: Permissions, base_dir: Path, timeout: float) -> None:
        self.tool = tool
        self.permissions = permissions
        self.base_dir = base_dir
        self.timeout = timeout
        self._http: GuardedAsyncClient | None = None
        self._http_sync: GuardedClient | None = None

    @property
    def http(self) -> GuardedAsyncClient:
        """An async HTTP client bound by the tool's network permission (created on first use)."""
        if self._http is None:
            self._http = GuardedAsyncClient(
                tool=self.tool, permissions=self.permissions, timeout=self.timeout, follow_redirects=True
            )
        return self._http

    @property
    def http_sync(self) -> GuardedClient:
        """A synchronous HTTP client bound by the tool's network permission (for sync tools)."""
        if self._http_sync is None:
            self._http_sync = GuardedClient(
                tool=self.tool, permissions=self.permissions, timeout=self.timeout, follow_redirects=True
            )
        return self._http_sync

    def resolve(self, path: str | os.PathLike[str], *, write: bool = False) -> Path:
        """The real path of ``path`` if the tool may read it (or write it, with ``write=True``); else raise."""
        p = Path(path).expanduser()
        real = Path(os.path.realpath(p if p.is_absolute() else self.base_dir / p))
        roots = self.permissions.write_roots if write else self.permissions.read_roots + self.permissions.write_roots
        if not any(real == root or real.is_relative_to(root) for root in roots):
            what = "write" if write else "read"
            listed = ", ".join(str(r) for r in roots) or "none"
            raise FilesystemNotAllowed(f"tool {self.tool!r} may not {what} {str(path)!r} ({what} roots: {listed})")
        return real

    def open(self, path: str | os.PathLike[str], mode: str = "r", **kwargs: Any) -> IO[Any]:
        """``open()`` after the permission check (any of ``w``, ``a``, ``x``, ``+`` in ``mode`` needs write)."""
        write = any(c in mode for c in "wax+")
        return open(self.resolve(path, write=write), mode, **kwargs)

    def read_text(self, path: str | os.PathLike[str], encoding: str = "utf-8") -> str:
        """Read a text file under the read (or write) roots."""
        return self.resolve(path).read_text(encoding=encoding)

    def read_bytes(self, path: str | os.PathLike[str]) -> bytes:
        """Read a file under the read (or write) roots."""
        return self.resolve(path).read_bytes()

    def write_text(self, path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> int:
        """Write a text file under the write roots; returns the number of characters written."""
        return self.resolve(path, write=True).write_text(text, encoding=encoding)

    async def run_shell(
        self, cmd: str | Sequence[str], *, timeout: float | None = None, cwd: str | os.PathLike[str] | None = None
    ) -> ShellResult:
        """Run a command (a string goes to ``/bin/sh -c``; a list is executed as is) if ``shell: true``.

        Bounded by ``timeout`` (at most the tool timeout); on timeout the whole process group is killed and
        ``ShellTimeout`` is raised. ``cwd`` defaults to the spec root.
        """
        if not self.permissions.shell:
            raise ShellNotAllowed(f"tool {self.tool!r} may not run shell commands (permissions.shell is false)")
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else [str(c) for c in cmd]
        limit = self.timeout if timeout is None else min(timeout, self.timeout)
        return await _run_process(argv, Path(cwd) if cwd is not None else self.base_dir, limit)

    async def aclose(self) -> None:
        """Close the HTTP clients the tool used."""
        if self._http is not None:
            await self._http.aclose()
        if self._http_sync is not None:
            self._http_sync.close()


async def _run_process(argv: list[str], cwd: Path, timeout: float) -> ShellResult:
    process = await anyio.open_process(
        argv,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        start_new_session=True,  # its own process group: a timeout kills all of it
    )
    out, err = bytearray(), bytearray()

    async def drain(stream: anyio.abc.ByteReceiveStream | None, buf: bytearray) -> None:
        if stream is None:
            return
        with suppress(anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            async for chunk in stream:
                if len(buf) < SHELL_OUTPUT_LIMIT:
                    buf += chunk[: SHELL_OUTPUT_LIMIT - len(buf)]

    try:
        with anyio.move_on_after(timeout) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(drain, process.stdout, out)
                tg.start_soon(drain, process.stderr, err)
            await process.wait()
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                with suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                with anyio.move_on_after(_MCP_CLOSE_TIMEOUT):
                    await process.wait()
            await process.aclose()
    if scope.cancelled_caught:
        raise ShellTimeout(f"shell command timed out after {timeout}s and was killed")
    return ShellResult(
        returncode=process.returncode if process.returncode is not None else -1,
        stdout=out.decode("utf-8", "replace"),
        stderr=err.decode("utf-8", "replace"),
    )


# --------------------------------------------------------------------------------------------------- function tools


@dataclass
class _FunctionTool:
    name: str
    target: str
    fn: Callable[..., Any]
    description: str
    model: type[pydantic.BaseModel]
    schema: JSON
    bound: JSON
    context_param: str | None
    positional_only: tuple[str, ...]
    var_keyword: bool
    context: ToolContext

    @classmethod
    def build(cls, entry: JSON, fn: Callable[..., Any], base_dir: Path, timeout: float) -> _FunctionTool:
        name = str(entry["id"])
        target = str(entry.get("function"))
        if not callable(fn):
            raise ToolConfigError(f"tool {name!r}: {target!r} is not callable")
        signature = inspect.signature(fn)
        try:
            hints = typing.get_type_hints(fn, include_extras=True)
        except Exception:  # unresolvable forward references: fall back to the raw annotations
            hints = {}
        bound = dict(entry.get("params") or {})
        fields: dict[str, Any] = {}
        context_param: str | None = None
        positional_only: list[str] = []
        var_keyword = False
        for pname, param in signature.parameters.items():
            annotation = hints.get(pname, param.annotation)
            if _is_context(annotation):
                context_param = pname
                continue
            if param.kind is inspect.Parameter.VAR_POSITIONAL:
                continue
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                var_keyword = True
                continue
            if param.kind is inspect.Parameter.POSITIONAL_ONLY:
                positional_only.append(pname)
            if pname in bound:
                continue
            if annotation is inspect.Parameter.empty:
                annotation = Any
            default = ... if param.default is inspect.Parameter.empty else param.default
            # Internal field names with the parameter as alias: a parameter may be called `json`, `schema` or
            # `model_name` without shadowing BaseModel attributes.
            fields[f"p{len(fields)}"] = (annotation, pydantic.Field(default, alias=pname))
        unknown = [k for k in bound if k not in signature.parameters or k == context_param]
        if unknown and not var_keyword:
            raise ToolConfigError(f"tool {name!r}: params {unknown} are not parameters of {target}")
        config = pydantic.ConfigDict(
            extra="allow" if var_keyword else "forbid", arbitrary_types_allowed=True, populate_by_name=False
        )
        try:
            model = pydantic.create_model(f"{name}_arguments", __config__=config, **fields)
            schema = model.model_json_schema()
        except (pydantic.PydanticSchemaGenerationError, pydantic.PydanticUserError, TypeError) as exc:
            raise ToolConfigError(f"tool {name!r}: cannot describe the arguments of {target}: {exc}") from None
        schema.pop("title", None)
        schema.setdefault("properties", {})
        doc = inspect.getdoc(fn) or ""
        description = str(entry.get("description") or (doc.strip().splitlines()[0] if doc.strip() else name))
        permissions = Permissions.from_spec(entry.get("permissions"), base_dir)
        return cls(
            name=name,
            target=target,
            fn=fn,
            description=description,
            model=model,
            schema=schema,
            bound=bound,
            context_param=context_param,
            positional_only=tuple(positional_only),
            var_keyword=var_keyword,
            context=ToolContext(name, permissions, base_dir, timeout),
        )

    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description, self.schema)

    async def call(self, arguments: dict[str, Any], timeout: float) -> ToolResult:
        if not isinstance(arguments, dict):
            return ToolResult(False, f"invalid arguments for tool {self.name!r}: expected a JSON object")
        try:
            parsed = self.model.model_validate(arguments)
        except pydantic.ValidationError as exc:
            return ToolResult(False, f"invalid arguments for tool {self.name!r}: {_validation_text(exc)}")
        kwargs: dict[str, Any] = {f.alias or k: getattr(parsed, k) for k, f in type(parsed).model_fields.items()}
        kwargs.update(parsed.model_extra or {})
        kwargs.update(self.bound)
        if self.context_param is not None:
            kwargs[self.context_param] = self.context
        args = [kwargs.pop(p) for p in self.positional_only if p in kwargs]
        call = functools.partial(self.fn, *args, **kwargs)
        try:
            with anyio.move_on_after(timeout) as scope:
                if inspect.iscoroutinefunction(self.fn):
                    result = await call()
                else:
                    # abandon_on_cancel: a sync tool past its timeout keeps its thread until it returns; we stop
                    # waiting and drop its result.
                    result = await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
                    if inspect.isawaitable(result):
                        result = await result
        except Exception as exc:
            log.info("tool %s failed: %s", self.name, type(exc).__name__)
            return ToolResult(False, f"tool {self.name!r} failed: {type(exc).__name__}: {exc}")
        if scope.cancelled_caught:
            return ToolResult(False, f"tool {self.name!r} timed out after {timeout}s")
        return ToolResult(True, _as_text(result))


def _is_context(annotation: Any) -> bool:
    if annotation is ToolContext:
        return True
    if typing.get_origin(annotation) is typing.Annotated:
        return _is_context(typing.get_args(annotation)[0])
    if isinstance(annotation, str):  # an unresolved forward reference
        return annotation.rsplit(".", 1)[-1] == "ToolContext"
    return False


def _validation_text(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(x) for x in err["loc"]) or "(arguments)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def _as_text(result: Any) -> str:
    if isinstance(result, str):
        return result
    if result is None:
        return ""
    return pydantic_core.to_json(result, fallback=str).decode()


# --------------------------------------------------------------------------------------------------- MCP servers


@dataclass
class _McpToolRef:
    """A tool entry that names an MCP tool (``mcp: server[:tool]`` or a shorthand)."""

    name: str
    server: str | None  # None: a shorthand resolved after the servers list their tools
    remote: str
    description: str | None
    bound: JSON


@dataclass
class _Connection:
    """One live ``mcp.Client`` owned by its own task (so any task may call it, and it closes where it opened)."""

    ready: anyio.Event = field(default_factory=anyio.Event)
    stop: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    client: Any = None
    tools: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class McpServer:
    """A declared MCP server: connects through the official SDK (stdio or streamable HTTP), lists its tools (allow-list
    applied), calls them with the KNEO_SERV_MCP_* timeout and retries, and reconnects a dead connection on retry."""

    def __init__(self, raw: JSON, settings: Settings, base_dir: Path) -> None:
        self.id = str(raw["id"])
        self.transport = str(raw.get("transport") or "stdio")
        self.command = raw.get("command")
        self.args = [str(a) for a in raw.get("args") or []]
        self.url = raw.get("url")
        self.env_refs: dict[str, str] = {str(k): str(v) for k, v in (raw.get("env") or {}).items()}
        allow = raw.get("tools")
        self.allowed: frozenset[str] | None = None if allow is None else frozenset(str(t) for t in allow)
        self.base_dir = base_dir
        self.timeout = settings.mcp_timeout_seconds
        self.retries = settings.mcp_retries
        self.backoff = settings.mcp_retry_backoff_seconds
        self._conn: _Connection | None = None
        self._lock = anyio.Lock()
        self._tg: anyio.abc.TaskGroup | None = None
        self.last_error: str | None = None
        if self.transport == "stdio" and not self.command:
            raise ToolConfigError(f"MCP server {self.id!r}: a stdio server needs `command`")
        if self.transport == "http" and not (
            isinstance(self.url, str) and self.url.startswith(("http://", "https://"))
        ):
            raise ToolConfigError(f"MCP server {self.id!r}: an http server needs an http(s) `url`")
        if self.transport not in ("stdio", "http"):
            raise ToolConfigError(f"MCP server {self.id!r}: unknown transport {self.transport!r}")

    # -- what the server offers

    @property
    def connected(self) -> bool:
        """Whether a live session is open (as far as we know: a dead server is noticed on the next call)."""
        return self._conn is not None and self._conn.client is not None and not self._conn.done.is_set()

    @property
    def tools(self) -> dict[str, Any]:
        """The listed tools (``mcp.types.Tool`` by name) that pass the allow-list; empty while unreachable."""
        return self._conn.tools if self._conn is not None else {}

    def allows(self, tool: str) -> bool:
        """Whether the server's ``tools`` allow-list admits ``tool``."""
        return self.allowed is None or tool in self.allowed

    # -- lifecycle

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        """Connect (with retries); a failure is remembered in ``last_error``, never raised."""
        self._tg = tg
        async with self._lock:
            await self._connect_with_retries()

    async def close(self) -> None:
        """Close the session (stdio: the server process is stopped by the SDK)."""
        async with self._lock:
            await self._disconnect()

    async def _connect_with_retries(self) -> bool:
        for attempt in range(self.retries + 1):
            if attempt:
                await anyio.sleep(self.backoff * 2 ** (attempt - 1))
            if await self._connect_once():
                return True
        return False

    async def _connect_once(self) -> bool:
        assert self._tg is not None
        await self._disconnect()
        conn = _Connection()
        self._conn = conn
        self._tg.start_soon(self._serve, conn)
        limit = self.timeout if self.timeout is not None else DEFAULT_MCP_CONNECT_TIMEOUT
        with anyio.move_on_after(limit) as waited:
            await conn.ready.wait()
        if waited.cancelled_caught:
            conn.error = f"timed out connecting after {limit}s"
        if conn.client is None or conn.error is not None:
            self.last_error = conn.error or "the connection closed"
            log.warning("MCP server %s: cannot connect: %s", self.id, self.last_error)
            await self._disconnect()
            return False
        self.last_error = None
        return True

    async def _disconnect(self) -> None:
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        conn.stop.set()
        if not conn.ready.is_set():
            conn.scope.cancel()
        with anyio.move_on_after(_MCP_CLOSE_TIMEOUT) as waited:
            await conn.done.wait()
        if waited.cancelled_caught:
            conn.scope.cancel()

    async def _serve(self, conn: _Connection) -> None:
        from mcp import Client  # the SDK is imported only by runners that use MCP

        try:
            with conn.scope:
                async with Client(self._target(), read_timeout_seconds=self.timeout) as client:
                    listed: dict[str, Any] = {}
                    cursor: str | None = None
                    for _ in range(100):  # pages; a paginator that never ends cannot hang the step
                        page = await client.list_tools(cursor=cursor)
                        listed.update({t.name: t for t in page.tools if self.allows(t.name)})
                        cursor = page.next_cursor
                        if cursor is None:
                            break
                    conn.tools = listed
                    conn.client = client
                    conn.ready.set()
                    await conn.stop.wait()
                    conn.client = None
        except Exception as exc:  # includes ExceptionGroups from the SDK's task groups
            conn.error = _error_text(exc)
            if not conn.ready.is_set() and "Connection closed" in conn.error:
                conn.error = "the server closed the connection during the MCP handshake (did it exit? see its stderr)"
            if conn.ready.is_set():
                log.warning("MCP server %s: session ended with an error: %s", self.id, conn.error)
        finally:
            conn.client = None
            conn.ready.set()
            conn.done.set()

    def _target(self) -> Any:
        from mcp import StdioServerParameters

        if self.transport == "http":
            return str(self.url)
        command = str(self.command)
        if command in ("python", "python3"):
            command = sys.executable  # the runner's interpreter, so servers see the same installed packages
        elif "/" in command and not os.path.isabs(command):
            command = str(self.base_dir / command)
        return StdioServerParameters(command=command, args=self.args, env=self._env(), cwd=str(self.base_dir))

    def _env(self) -> dict[str, str]:
        """Server variables from env-var *names* (``NAME``, ``${NAME}`` or ``${env:NAME}``); values never logged."""
        env: dict[str, str] = {}
        for var, ref in self.env_refs.items():
            m = _ENV_REF.match(ref.strip())
            if m is None:
                raise ToolConfigError(
                    f"MCP server {self.id!r}: env {var} must name an environment variable (NAME or ${{env:NAME}}), "
                    "not hold a value"
                )
            name = m.group("braced") or m.group("bare")
            value = os.environ.get(name)
            if value is None:
                raise ToolConfigError(f"MCP server {self.id!r}: environment variable {name} (for {var}) is not set")
            env[var] = value
        return env

    # -- calls

    async def call(self, exposed: str, tool: str, arguments: JSON) -> ToolResult:
        """Call ``tool``; timeouts and dead connections are retried (``KNEO_SERV_MCP_RETRIES``), tool errors not."""
        from mcp.shared.exceptions import MCPError
        from mcp_types import CONNECTION_CLOSED, REQUEST_TIMEOUT

        attempts = self.retries + 1
        problem = ""
        for attempt in range(attempts):
            if attempt:
                log.warning(
                    "MCP tool %s (server %s): attempt %d/%d failed: %s; retrying",
                    tool,
                    self.id,
                    attempt,
                    attempts,
                    problem,
                )
                await anyio.sleep(self.backoff * 2 ** (attempt - 1))
            conn = self._conn
            if conn is None or conn.client is None or conn.done.is_set():
                async with self._lock:
                    if not self.connected and not await self._connect_once():
                        problem = f"MCP server {self.id!r} is unavailable: {self.last_error}"
                        continue
                conn = self._conn
                assert conn is not None
            if tool not in conn.tools:
                return ToolResult(False, f"MCP server {self.id!r} does not offer tool {tool!r}")
            try:
                result = await self._call_bounded(conn.client, tool, arguments)
            except MCPError as exc:
                if exc.code == REQUEST_TIMEOUT or isinstance(exc.__cause__, TimeoutError):
                    problem = f"MCP tool {tool!r} timed out after {self.timeout}s"
                    continue
                if exc.code == CONNECTION_CLOSED:
                    problem = f"MCP server {self.id!r} closed the connection"
                    await self._mark_dead(conn)
                    continue
                return ToolResult(False, f"MCP tool {tool!r} failed: {exc}")
            except TimeoutError:
                problem = f"MCP tool {tool!r} timed out after {self.timeout}s"
                continue
            except Exception as exc:  # transport failures (a dead HTTP server, broken pipes, …)
                problem = f"MCP server {self.id!r} failed: {_error_text(exc)}"
                await self._mark_dead(conn)
                continue
            text = _mcp_content_text(result)
            if result.is_error:
                return ToolResult(False, text or f"MCP tool {tool!r} reported an error")
            return ToolResult(True, text)
        suffix = f" (after {attempts} attempts)" if attempts > 1 else ""
        log.warning("MCP tool %s (server %s) failed%s: %s", tool, self.id, suffix, problem)
        return ToolResult(False, problem + suffix)

    async def _call_bounded(self, client: Any, tool: str, arguments: JSON) -> Any:
        if self.timeout is None:
            return await client.call_tool(tool, arguments)
        # The SDK's read timeout answers REQUEST_TIMEOUT (and cancels the request on the server); the outer bound
        # also covers a transport that hangs before the request is written.
        with anyio.fail_after(self.timeout + 1.0):
            return await client.call_tool(tool, arguments, read_timeout_seconds=self.timeout)

    async def _mark_dead(self, conn: _Connection) -> None:
        async with self._lock:
            if self._conn is conn:
                await self._disconnect()


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        leaves = [_error_text(e) for e in exc.exceptions]
        return "; ".join(dict.fromkeys(leaves))
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _mcp_content_text(result: Any) -> str:
    parts: list[str] = []
    for block in result.content or []:
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(block.text)
        elif kind == "resource":
            inner = block.resource
            text = getattr(inner, "text", None)
            parts.append(text if text is not None else f"[resource {inner.uri} ({inner.mime_type or 'binary'})]")
        elif kind == "resource_link":
            parts.append(f"[resource link {block.uri}]")
        else:
            parts.append(f"[{kind} content ({getattr(block, 'mime_type', None) or 'unknown type'})]")
    if not parts and result.structured_content is not None:
        return pydantic_core.to_json(result.structured_content).decode()
    return "\n".join(parts)


def _mcp_exposed_name(server: str, tool: str) -> str:
    return _TOOL_NAME_UNSAFE.sub("_", f"{server}{MCP_NAME_SEPARATOR}{tool}")[:64]


def _without_bound(schema: JSON, bound: JSON) -> JSON:
    if not bound:
        return schema
    out = dict(schema)
    out["properties"] = {k: v for k, v in (schema.get("properties") or {}).items() if k not in bound}
    if "required" in schema:
        out["required"] = [r for r in schema["required"] if r not in bound]
    return out


# --------------------------------------------------------------------------------------------------- ToolBox


class ToolBox:
    """The tools of one agent for one step; an async context manager (MCP sessions live inside it)."""

    def __init__(
        self,
        functions: list[_FunctionTool],
        mcp_refs: list[_McpToolRef],
        servers: list[McpServer],
        settings: Settings,
    ) -> None:
        self._functions = {f.name: f for f in functions}
        self._refs = mcp_refs
        self._servers = {s.id: s for s in servers}
        self._settings = settings
        self._tg: anyio.abc.TaskGroup | None = None
        # exposed name → (server id, remote tool name, bound params, description override); filled on enter
        self._routes: dict[str, tuple[str, str, JSON, str | None]] = {}

    @classmethod
    def for_agent(cls, agent: dict[str, Any], settings: Settings, allowed_packages: tuple[str, ...]) -> ToolBox:
        """The tools the compiled ``agent`` declares (``tools`` and ``mcp``).

        Raises the engine's ``StepFunctionError`` for a function outside ``KNEO_SERV_FUNCTION_PACKAGES`` or one that
        cannot be imported, and ``ToolConfigError`` for other spec problems (an unknown MCP server, bad ``params``).
        """
        # Imported here, not at the top: engine.py imports this module (the agent loop), so a top-level import
        # would be circular. One allow-list, one place.
        from kneo_runner.engine import import_function

        base_dir = Path(os.path.realpath(settings.spec_root or Path.cwd()))
        servers = [McpServer(raw, settings, base_dir) for raw in agent.get("mcp") or []]
        server_ids = {s.id for s in servers}
        functions: list[_FunctionTool] = []
        refs: list[_McpToolRef] = []
        for entry in agent.get("tools") or []:
            name = str(entry["id"])
            if entry.get("function"):
                fn = import_function(str(entry["function"]), allowed_packages)
                functions.append(_FunctionTool.build(entry, fn, base_dir, settings.tool_timeout_seconds))
            elif entry.get("mcp"):
                server, _, remote = str(entry["mcp"]).partition(":")
                if server not in server_ids:
                    raise ToolConfigError(
                        f"tool {name!r} names MCP server {server!r}, which the agent does not declare under `mcp` "
                        f"(declared: {', '.join(sorted(server_ids)) or 'none'})"
                    )
                refs.append(
                    _McpToolRef(name, server, remote or name, entry.get("description"), entry.get("params") or {})
                )
            elif entry.get("mcp_tool"):
                refs.append(_McpToolRef(name, None, name, entry.get("description"), entry.get("params") or {}))
            else:
                raise ToolConfigError(f"tool {name!r} needs `function` or `mcp`")
        return cls(functions, refs, servers, settings)

    async def __aenter__(self) -> ToolBox:
        if self._servers:
            self._tg = anyio.create_task_group()
            await self._tg.__aenter__()
            try:
                async with anyio.create_task_group() as starting:
                    for server in self._servers.values():
                        starting.start_soon(server.start, self._tg)
            except BaseException:
                await self.__aexit__(*sys.exc_info())
                raise
        self._route()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self._tg is not None:
                with anyio.CancelScope(shield=True):
                    for server in self._servers.values():
                        await server.close()
                tg, self._tg = self._tg, None
                await tg.__aexit__(*exc)  # type: ignore[arg-type]
        finally:
            with anyio.CancelScope(shield=True):
                for tool in self._functions.values():
                    await tool.context.aclose()

    def _route(self) -> None:
        """Decide which MCP tool every exposed name reaches (entries first, then each server's remaining tools)."""
        routes: dict[str, tuple[str, str, JSON, str | None]] = {}
        claimed: set[tuple[str, str]] = set()
        for ref in self._refs:
            server_id = ref.server or self._find_server(ref.remote)
            if server_id is None:
                log.warning("tool %s: no declared MCP server offers it; not offered to the model", ref.name)
                continue
            if not self._servers[server_id].allows(ref.remote):
                log.warning(
                    "tool %s: %s is not in MCP server %s's `tools` allow-list; not offered",
                    ref.name,
                    ref.remote,
                    server_id,
                )
                continue
            server = self._servers[server_id]
            if server.connected and ref.remote not in server.tools:
                log.warning("tool %s: MCP server %s does not offer %s; not offered", ref.name, server_id, ref.remote)
                continue
            routes[ref.name] = (server_id, ref.remote, ref.bound, ref.description)
            claimed.add((server_id, ref.remote))
        for server in self._servers.values():
            names = set(server.tools) | (set(server.allowed or ()) if not server.connected else set())
            for tool in sorted(names):
                if (server.id, tool) in claimed:
                    continue
                exposed = _mcp_exposed_name(server.id, tool)
                if exposed in routes or exposed in self._functions:
                    log.warning("MCP tool %s of %s: the name %s is taken; not offered", tool, server.id, exposed)
                    continue
                routes[exposed] = (server.id, tool, {}, None)
        self._routes = routes

    def _find_server(self, tool: str) -> str | None:
        for server in self._servers.values():  # an explicit allow-list names it
            if server.allowed is not None and tool in server.allowed:
                return server.id
        for server in self._servers.values():  # else a server that imports everything and lists it
            if server.allowed is None and tool in server.tools:
                return server.id
        return None

    def specs(self) -> list[ToolSpec]:
        """The tools offered to the model: function tools, then MCP tools (see the module docstring for names)."""
        out = [f.spec() for f in self._functions.values()]
        for exposed, (server_id, tool, bound, description) in self._routes.items():
            server = self._servers[server_id]
            listed = server.tools.get(tool)
            if listed is not None:
                schema = _without_bound(dict(listed.input_schema or {"type": "object"}), bound)
                text = description or listed.description or tool
            else:
                schema = {"type": "object", "properties": {}, "additionalProperties": True}
                reason = server.last_error or "not connected"
                text = f"{description or tool} (MCP server {server_id!r} is unavailable: {reason})"
            out.append(ToolSpec(exposed, text, schema))
        return out

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolResult:
        """Call one tool; never raises for a tool failure (bad arguments, a raise, a timeout, a dead server)."""
        function = self._functions.get(name)
        if function is not None:
            return await function.call(arguments, self._settings.tool_timeout_seconds)
        route = self._routes.get(name)
        if route is None:
            offered = ", ".join(s.name for s in self.specs()) or "none"
            return ToolResult(False, f"unknown tool {name!r} (offered: {offered})")
        server_id, tool, bound, _ = route
        if not isinstance(arguments, dict):
            return ToolResult(False, f"invalid arguments for tool {name!r}: expected a JSON object")
        try:
            return await self._servers[server_id].call(name, tool, {**arguments, **bound})
        except Exception as exc:  # the contract: a tool failure is a result, never a crash of the step
            log.exception("MCP tool %s failed unexpectedly", name)
            return ToolResult(False, f"MCP tool {name!r} failed: {_error_text(exc)}")
