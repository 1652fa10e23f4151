"""Spec schema v1 as pydantic models. docs/spec_reference.md documents every field with an example.

Models are strict (unknown fields are diagnostics) and carry no behaviour: checks live in ``structure`` and
``governance``, compilation in ``compile``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JSON = dict[str, Any]
WorkflowKind = Literal["sequential", "graph", "concurrent", "handoff", "group-chat", "group_chat"]
StepKind = Literal["agent", "function", "human"]


class Strict(BaseModel):
    """Base of every spec model: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelRef(Strict):
    """Which model an agent talks to. ``params`` go to the provider as they are."""

    provider: str = "dummy"
    name: str = "dummy"
    params: JSON = Field(default_factory=dict)


class NetworkPermission(Strict):
    """Network access of a tool: only the listed domains (and their subdomains)."""

    allowed_domains: list[str] | None = None


class FilesystemPermission(Strict):
    """Filesystem access of a tool: path prefixes it may read and write."""

    read: list[str] = Field(default_factory=list)
    write: list[str] = Field(default_factory=list)


class ToolPermissions(Strict):
    """What a tool may do. ``network: true`` means any domain; ``shell: true`` means it may run commands."""

    network: NetworkPermission | bool = False
    filesystem: FilesystemPermission | None = None
    shell: bool = False


class ToolDef(Strict):
    """A tool implemented by a Python function (``package.module:attr``) or taken from a declared MCP server."""

    function: str | None = None
    mcp: str | None = None
    description: str | None = None
    permissions: ToolPermissions | None = None
    params: JSON = Field(default_factory=dict)


class Tool(ToolDef):
    """A tool declared inline on an agent."""

    id: str


class Memory(Strict):
    """Conversation memory: ``window`` turns kept; ``compress_history`` summarizes what falls out."""

    kind: Literal["none", "buffer", "window", "summary"] = "buffer"
    window: int | None = Field(default=None, ge=1)
    compress_history: str | None = None


class Guardrail(Strict):
    """A check function run on the agent's input or output; ``on_fail: block`` stops the step."""

    id: str
    function: str
    on_fail: Literal["block", "warn"] = "block"


class Guardrails(Strict):
    """Guardrails by stage."""

    input: list[Guardrail] = Field(default_factory=list)
    output: list[Guardrail] = Field(default_factory=list)


class McpServer(Strict):
    """A declared MCP import. Secrets only as env-var names in ``env`` (variable in the server → variable here)."""

    id: str
    transport: Literal["stdio", "http"] = "stdio"
    command: str | None = None
    args: list[str] = Field(default_factory=list)
    url: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    tools: list[str] | None = None


class Agent(Strict):
    """An agent: a model, instructions, a strategy, tools, memory, guardrails and MCP imports."""

    name: str
    description: str | None = None
    model: ModelRef = Field(default_factory=ModelRef)
    instructions: str | None = None
    strategy: str | None = None
    tools: list[str | Tool] = Field(default_factory=list)
    memory: Memory | None = None
    guardrails: Guardrails | None = None
    mcp: list[McpServer] = Field(default_factory=list)


class FunctionComponent(Strict):
    """A reusable Python function referenced by id from function steps."""

    function: str
    description: str | None = None


class Components(Strict):
    """Reusable parts referenced by id from workflows (``ref``) and agents (tool shorthand)."""

    agents: dict[str, Agent] = Field(default_factory=dict)
    tools: dict[str, ToolDef] = Field(default_factory=dict)
    functions: dict[str, FunctionComponent] = Field(default_factory=dict)


class Step(Strict):
    """A unit of work: an agent turn, a function call, or a human task. Also the shape of nodes and participants."""

    id: str
    kind: StepKind = "agent"
    ref: str | None = None
    prompt: str | None = None
    function: str | None = None
    args: JSON = Field(default_factory=dict)
    on_error: Literal["fail", "retry", "continue"] = "fail"
    max_retries: int | None = Field(default=None, ge=0, le=20)
    timeout_seconds: float | None = Field(default=None, gt=0)
    options: list[str] = Field(default_factory=list)
    reviewers: list[str] = Field(default_factory=list)
    on_timeout: Literal["fail", "continue", "escalate"] | None = None


class EdgeCondition(Strict):
    """When an edge is taken, tested on the source node's output. All given tests must hold."""

    contains: str | None = None
    not_contains: str | None = None
    equals: str | None = None
    matches: str | None = None


class Edge(Strict):
    """A graph edge. Without ``when`` it is the fallback taken when no conditional edge of its source matched."""

    from_: str = Field(alias="from")
    to: str
    when: EdgeCondition | None = None
    max_traversals: int | None = Field(default=None, ge=1)


class Selector(Strict):
    """Who speaks next in a handoff: a fixed ``sequence`` of participant ids, or ``round_robin``."""

    type: Literal["sequence", "round_robin"] = "sequence"
    sequence: list[str] = Field(default_factory=list)
    max_turns: int | None = Field(default=None, ge=1)


class Aggregation(Strict):
    """How a concurrent workflow combines its participants' outputs."""

    kind: Literal["concat", "json", "function"] = "concat"
    function: str | None = None
    separator: str = "\n\n"


class Workflow(Strict):
    """A workflow of one kind; each kind uses its own fields (others are reported as unknown for that kind)."""

    name: str
    kind: WorkflowKind = "sequential"
    description: str | None = None
    steps: list[Step] = Field(default_factory=list)
    nodes: list[Step] = Field(default_factory=list)
    start: str | None = None
    edges: list[Edge] = Field(default_factory=list)
    max_iterations: int | None = Field(default=None, ge=1)
    participants: list[Step] = Field(default_factory=list)
    aggregation: Aggregation | None = None
    selector: Selector | None = None
    rounds: int | None = None
    # run-level deadline: past it the run is force-cancelled as timed_out (a request's timeout_seconds wins)
    timeout_seconds: float | None = Field(default=None, gt=0)


class Spec(Strict):
    """A v1 spec: an agent and/or components, a workflow, and environment overlays."""

    version: Literal["v1"] = "v1"
    name: str | None = None
    description: str | None = None
    agent: Agent | None = None
    components: Components = Field(default_factory=Components)
    workflow: Workflow | None = None
    environments: dict[str, JSON] = Field(default_factory=dict)
    metadata: JSON = Field(default_factory=dict)


KIND_FIELDS: dict[str, set[str]] = {
    "sequential": {"steps"},
    "graph": {"nodes", "start", "edges", "max_iterations"},
    "concurrent": {"participants", "aggregation"},
    "handoff": {"participants", "selector"},
    "group_chat": {"participants", "rounds"},
}


def canonical_kind(kind: str) -> str:
    """``group-chat`` and ``group_chat`` are one kind; plans use ``group_chat``."""
    return "group_chat" if kind == "group-chat" else kind


def spec_json_schema() -> JSON:
    """JSON Schema of spec v1, for editors (``kneo spec schema``)."""
    schema = Spec.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Kneo spec v1"
    return schema
