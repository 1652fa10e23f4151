"""Function tools of the runner (kneo_runner.tools): schemas, argument validation, timeouts, enforced permissions.

Network tests use a loopback HTTP server started here; nothing leaves the machine (a refused host is refused before
any connection is made).
"""

from __future__ import annotations

import http.server
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import anyio
import pytest
from pydantic import Field

from kneo_events.settings import Settings
from kneo_runner.engine import StepFunctionError
from kneo_runner.tools import Permissions, ToolBox, ToolConfigError, ToolContext

MOD = __name__
HERE = (MOD,)


# ------------------------------------------------------------------------------------------ tools under test


def search(query: str, limit: int = 3, tags: list[str] | None = None) -> list[str]:
    """Search for things.

    The rest of the docstring is not the description.
    """
    return [f"{query}-{i}" for i in range(limit)] + list(tags or [])


def shadowing(json: str, schema: int, model_name: str = "m") -> str:
    """Parameters named like BaseModel attributes."""
    return f"{json}|{schema}|{model_name}"


def annotated(q: Annotated[str, Field(description="what to look for", min_length=2)]) -> str:
    return q.upper()


def positional(a: int, /, b: int = 1) -> int:
    """Positional-only first parameter."""
    return a * 10 + b


async def fetch(url: str, ctx: ToolContext) -> str:
    """GET a URL through the guarded client."""
    response = await ctx.http.get(url)
    return f"{response.status_code}:{response.text}"


def fetch_sync(url: str, ctx: ToolContext) -> str:
    """GET a URL through the guarded sync client."""
    response = ctx.http_sync.get(url)
    return f"{response.status_code}:{response.text}"


def read_file(path: str, ctx: ToolContext) -> str:
    """Read a file."""
    return ctx.read_text(path)


def write_file(path: str, text: str, ctx: ToolContext) -> str:
    """Write a file."""
    ctx.write_text(path, text)
    return "written"


def append_file(path: str, text: str, ctx: ToolContext) -> str:
    """Append through open()."""
    with ctx.open(path, "a") as f:
        f.write(text)
    return "appended"


async def shell(cmd: str, ctx: ToolContext, timeout: float | None = None) -> str:
    """Run a shell command."""
    result = await ctx.run_shell(cmd, timeout=timeout)
    return f"{result.returncode}:{result.stdout.strip()}"


async def hang() -> str:
    """Never returns."""
    await anyio.Event().wait()
    return "unreachable"


RELEASE = threading.Event()


def hang_sync() -> str:
    """Blocks its thread until the test releases it."""
    RELEASE.wait(30)
    return "released"


def boom(x: int) -> int:
    """Always raises."""
    raise RuntimeError(f"kaboom {x}")


# ------------------------------------------------------------------------------------------ helpers


def settings(tmp_path: Path, **kw: Any) -> Settings:
    return Settings(spec_root=tmp_path, **kw)


def tool(name: str, fn: str, **extra: Any) -> dict[str, Any]:
    return {"id": name, "function": f"{MOD}:{fn}", **extra}


def box(tmp_path: Path, *tools: dict[str, Any], **kw: Any) -> ToolBox:
    return ToolBox.for_agent({"tools": list(tools), "mcp": []}, settings(tmp_path, **kw), HERE)


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: list[str]

    def do_GET(self) -> None:
        self.server.hits.append(self.path)  # type: ignore[attr-defined]
        if self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/redirect?to="))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"hello from loopback"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def loopback() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.hits = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def port_of(server: http.server.ThreadingHTTPServer) -> int:
    return int(server.server_address[1])


# ------------------------------------------------------------------------------------------ schema and arguments


async def test_schema_from_signature_and_docstring(tmp_path: Path) -> None:
    async with box(tmp_path, tool("search", "search"), tool("annotated", "annotated", description="Given.")) as b:
        specs = {s.name: s for s in b.specs()}
    s = specs["search"]
    assert s.description == "Search for things."
    assert s.parameters["type"] == "object"
    assert s.parameters["required"] == ["query"]
    props = s.parameters["properties"]
    assert props["query"]["type"] == "string"
    assert props["limit"]["type"] == "integer" and props["limit"]["default"] == 3
    assert set(props) == {"query", "limit", "tags"}
    assert s.parameters["additionalProperties"] is False
    a = specs["annotated"]
    assert a.description == "Given."  # the spec's description wins over the docstring
    assert a.parameters["properties"]["q"]["description"] == "what to look for"


async def test_context_parameter_is_injected_not_offered(tmp_path: Path) -> None:
    async with box(tmp_path, tool("read", "read_file")) as b:
        (spec,) = b.specs()
        assert set(spec.parameters["properties"]) == {"path"}
        assert spec.parameters["required"] == ["path"]


async def test_valid_arguments_are_converted_and_passed(tmp_path: Path) -> None:
    async with box(tmp_path, tool("search", "search"), tool("pos", "positional")) as b:
        result = await b.call("search", {"query": "q", "limit": "2", "tags": ["x"]})
        assert result.ok, result.content
        assert result.content == '["q-0","q-1","x"]'  # non-strings are JSON for the model
        assert (await b.call("pos", {"a": 4, "b": 2})).content == "42"


async def test_parameter_names_that_shadow_basemodel_attributes(tmp_path: Path) -> None:
    async with box(tmp_path, tool("shadow", "shadowing")) as b:
        (spec,) = b.specs()
        assert set(spec.parameters["properties"]) == {"json", "schema", "model_name"}
        result = await b.call("shadow", {"json": "j", "schema": 7})
    assert result.ok and result.content == "j|7|m"


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({}, "query: Field required"),
        ({"query": "q", "limit": "many"}, "limit: Input should be a valid integer"),
        ({"query": "q", "surprise": 1}, "surprise: Extra inputs are not permitted"),
        ({"query": 5}, "query: Input should be a valid string"),
    ],
)
async def test_invalid_arguments_are_an_error_result(tmp_path: Path, arguments: dict[str, Any], expected: str) -> None:
    async with box(tmp_path, tool("search", "search")) as b:
        result = await b.call("search", arguments)
    assert not result.ok
    assert result.content.startswith("invalid arguments for tool 'search'")
    assert expected in result.content


async def test_annotated_constraints_are_validated(tmp_path: Path) -> None:
    async with box(tmp_path, tool("annotated", "annotated")) as b:
        assert (await b.call("annotated", {"q": "ab"})).content == "AB"
        short = await b.call("annotated", {"q": "a"})
    assert not short.ok and "at least 2 characters" in short.content


async def test_spec_params_are_bound_and_hidden(tmp_path: Path) -> None:
    async with box(tmp_path, tool("search", "search", params={"limit": 1})) as b:
        (spec,) = b.specs()
        assert "limit" not in spec.parameters["properties"]
        assert (await b.call("search", {"query": "q"})).content == '["q-0"]'
        overridden = await b.call("search", {"query": "q", "limit": 5})
    assert not overridden.ok and "limit: Extra inputs are not permitted" in overridden.content


def test_unknown_bound_param_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ToolConfigError, match="nope"):
        box(tmp_path, tool("search", "search", params={"nope": 1}))


def test_function_outside_the_allow_list_is_refused(tmp_path: Path) -> None:
    agent = {"tools": [{"id": "x", "function": "os:system"}], "mcp": []}
    with pytest.raises(StepFunctionError, match="KNEO_SERV_FUNCTION_PACKAGES"):
        ToolBox.for_agent(agent, settings(tmp_path), HERE)


def test_mcp_tool_of_an_undeclared_server_is_a_config_error(tmp_path: Path) -> None:
    agent = {"tools": [{"id": "x", "mcp": "ghost:x"}], "mcp": []}
    with pytest.raises(ToolConfigError, match="ghost"):
        ToolBox.for_agent(agent, settings(tmp_path), HERE)


async def test_unknown_tool_is_an_error_result(tmp_path: Path) -> None:
    async with box(tmp_path, tool("search", "search")) as b:
        result = await b.call("nothing", {})
    assert not result.ok and "unknown tool 'nothing'" in result.content and "search" in result.content


async def test_raising_tool_is_an_error_result(tmp_path: Path) -> None:
    async with box(tmp_path, tool("boom", "boom")) as b:
        result = await b.call("boom", {"x": 3})
    assert not result.ok
    assert result.content == "tool 'boom' failed: RuntimeError: kaboom 3"


async def test_async_tool_timeout(tmp_path: Path) -> None:
    async with box(tmp_path, tool("hang", "hang"), tool_timeout_seconds=0.2) as b:
        result = await b.call("hang", {})
    assert not result.ok and result.content == "tool 'hang' timed out after 0.2s"


async def test_sync_tool_timeout(tmp_path: Path) -> None:
    RELEASE.clear()
    try:
        async with box(tmp_path, tool("hang", "hang_sync"), tool_timeout_seconds=0.2) as b:
            result = await b.call("hang", {})
    finally:
        RELEASE.set()  # let the abandoned worker thread finish
    assert not result.ok and result.content == "tool 'hang' timed out after 0.2s"


# ------------------------------------------------------------------------------------------ network


def test_domain_matching() -> None:
    p = Permissions(network=("example.org", "127.0.0.1"))
    assert p.host_allowed("example.org")
    assert p.host_allowed("docs.Example.ORG.")
    assert p.host_allowed("127.0.0.1")
    assert not p.host_allowed("badexample.org")
    assert not p.host_allowed("example.org.evil.test")
    assert not p.host_allowed("127.0.0.2")
    assert Permissions(network=None).host_allowed("anything.test")
    assert not Permissions(network=()).host_allowed("example.org")


def test_permissions_from_spec(tmp_path: Path) -> None:
    assert Permissions.from_spec(None, tmp_path).network == ()
    assert Permissions.from_spec({"network": False}, tmp_path).network == ()
    assert Permissions.from_spec({"network": True}, tmp_path).network is None
    assert Permissions.from_spec({"network": {"allowed_domains": ["*.Example.org"]}}, tmp_path).network == (
        "example.org",
    )
    assert Permissions.from_spec({"network": {"allowed_domains": []}}, tmp_path).network == ()
    fs = Permissions.from_spec({"filesystem": {"read": ["data"], "write": ["/abs/out"]}}, tmp_path)
    assert fs.read_roots == (Path(os.path.realpath(tmp_path / "data")),)
    assert fs.write_roots == (Path("/abs/out"),)


@pytest.mark.parametrize("fn", ["fetch", "fetch_sync"])
async def test_network_allow_list_direct_calls(
    tmp_path: Path, loopback: http.server.ThreadingHTTPServer, fn: str
) -> None:
    port = port_of(loopback)
    allowed = tool("get", fn, permissions={"network": {"allowed_domains": ["127.0.0.1"]}})
    async with box(tmp_path, allowed) as b:
        ok = await b.call("get", {"url": f"http://127.0.0.1:{port}/ok"})
        refused = await b.call("get", {"url": f"http://localhost:{port}/ok"})
    assert ok.ok and ok.content == "200:hello from loopback"
    assert not refused.ok
    assert "NetworkNotAllowed" in refused.content
    assert "'localhost' is not allowed for tool 'get' (allowed domains: 127.0.0.1)" in refused.content
    assert loopback.hits == ["/ok"]  # type: ignore[attr-defined]  # the refused request never left


@pytest.mark.parametrize("fn", ["fetch", "fetch_sync"])
async def test_redirect_to_a_disallowed_host_is_refused(
    tmp_path: Path, loopback: http.server.ThreadingHTTPServer, fn: str
) -> None:
    port = port_of(loopback)
    allowed = tool("get", fn, permissions={"network": {"allowed_domains": ["127.0.0.1"]}})
    async with box(tmp_path, allowed) as b:
        followed = await b.call("get", {"url": f"http://127.0.0.1:{port}/redirect?to=http://127.0.0.1:{port}/ok"})
        refused = await b.call("get", {"url": f"http://127.0.0.1:{port}/redirect?to=http://localhost:{port}/secret"})
    assert followed.ok and followed.content == "200:hello from loopback"
    assert not refused.ok and "'localhost' is not allowed" in refused.content
    assert "/secret" not in loopback.hits  # type: ignore[attr-defined]


@pytest.mark.parametrize(("network", "allowed"), [(False, False), (None, False), (True, True)])
async def test_network_false_absent_and_true(
    tmp_path: Path, loopback: http.server.ThreadingHTTPServer, network: bool | None, allowed: bool
) -> None:
    permissions = {} if network is None else {"network": network}
    async with box(tmp_path, tool("get", "fetch", permissions=permissions)) as b:
        result = await b.call("get", {"url": f"http://127.0.0.1:{port_of(loopback)}/ok"})
    assert result.ok is allowed
    if not allowed:
        assert "(allowed domains: none)" in result.content


async def test_non_http_schemes_are_refused(tmp_path: Path) -> None:
    async with box(tmp_path, tool("get", "fetch", permissions={"network": True})) as b:
        result = await b.call("get", {"url": "ftp://127.0.0.1/file"})
    assert not result.ok  # httpx refuses it, or our guard does: either way no transfer


# ------------------------------------------------------------------------------------------ filesystem


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "data" / "note.txt").write_text("readable")
    (tmp_path / "out" / "draft.txt").write_text("draft")
    (tmp_path / "secret.txt").write_text("top secret")
    (tmp_path / "data" / "link.txt").symlink_to(tmp_path / "secret.txt")
    (tmp_path / "out" / "escape").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    return tmp_path


FS = {"filesystem": {"read": ["data"], "write": ["out"]}}


async def test_reads_only_under_read_and_write_roots(tree: Path) -> None:
    async with box(tree, tool("read", "read_file", permissions=FS)) as b:
        assert (await b.call("read", {"path": "data/note.txt"})).content == "readable"
        assert (await b.call("read", {"path": "out/draft.txt"})).content == "draft"  # write roots are readable
        assert (await b.call("read", {"path": str(tree / "data" / "note.txt")})).content == "readable"
        refused = {
            p: await b.call("read", {"path": p})
            for p in ["secret.txt", "data/../secret.txt", "data/link.txt", str(tree / "secret.txt"), "/etc/hostname"]
        }
    for path, result in refused.items():
        assert not result.ok, path
        assert "FilesystemNotAllowed" in result.content and "may not read" in result.content, result.content
        assert "top secret" not in result.content


async def test_writes_only_under_write_roots(tree: Path) -> None:
    tools = (tool("write", "write_file", permissions=FS), tool("append", "append_file", permissions=FS))
    async with box(tree, *tools) as b:
        assert (await b.call("write", {"path": "out/new.txt", "text": "fresh"})).ok
        assert (await b.call("append", {"path": "out/draft.txt", "text": "+more"})).ok
        into_read_root = await b.call("write", {"path": "data/note.txt", "text": "clobber"})
        dotdot = await b.call("write", {"path": "out/../secret.txt", "text": "clobber"})
        via_symlink_dir = await b.call("write", {"path": "out/escape/planted.txt", "text": "x"})
        append_outside = await b.call("append", {"path": "data/note.txt", "text": "x"})
    assert (tree / "out" / "new.txt").read_text() == "fresh"
    assert (tree / "out" / "draft.txt").read_text() == "draft+more"
    for result in (into_read_root, dotdot, via_symlink_dir, append_outside):
        assert not result.ok and "may not write" in result.content, result.content
    assert (tree / "data" / "note.txt").read_text() == "readable"
    assert (tree / "secret.txt").read_text() == "top secret"
    assert not (tree / "elsewhere" / "planted.txt").exists()


async def test_no_filesystem_permission_means_no_files(tree: Path) -> None:
    async with box(tree, tool("read", "read_file")) as b:
        result = await b.call("read", {"path": "data/note.txt"})
    assert not result.ok and "(read roots: none)" in result.content


# ------------------------------------------------------------------------------------------ shell


async def test_shell_refused_unless_granted(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    async with box(tmp_path, tool("sh", "shell", permissions={"shell": False})) as b:
        result = await b.call("sh", {"cmd": f"touch {marker}"})
    assert not result.ok and "ShellNotAllowed" in result.content
    assert not marker.exists()


async def test_shell_runs_when_granted_in_the_spec_root(tmp_path: Path) -> None:
    async with box(tmp_path, tool("sh", "shell", permissions={"shell": True})) as b:
        result = await b.call("sh", {"cmd": "echo hi; pwd; exit 3"})
    assert result.ok
    code, _, out = result.content.partition(":")
    assert code == "3"
    assert out.splitlines() == ["hi", _real(tmp_path)]


def _real(path: Path) -> str:
    return os.path.realpath(path)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, whoever reaps it


async def test_shell_timeout_kills_the_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    cmd = f"sleep 60 & echo $! > {pidfile}; wait"
    async with box(tmp_path, tool("sh", "shell", permissions={"shell": True})) as b:
        result = await b.call("sh", {"cmd": cmd, "timeout": 0.5})
    assert not result.ok and "ShellTimeout" in result.content and "timed out after 0.5s" in result.content
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, "the shell's child survived the timeout"
        await anyio.sleep(0.02)
