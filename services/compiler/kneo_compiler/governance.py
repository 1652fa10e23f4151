"""Governance rules: what tools may do, which imports are unsafe, and whether privileged surfaces get human approval.

``tool_inventory`` resolves every tool an agent uses into facts; the rules and the policy report read those facts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kneo_compiler.diagnostics import Diagnostic, diag
from kneo_compiler.models import Agent, Spec, ToolDef, ToolPermissions
from kneo_compiler.structure import IMPORT_PATH, agents_of, invalid_import, workflow_items

UNSAFE_MODULES = frozenset(
    {"os", "subprocess", "shutil", "socket", "importlib", "builtins", "posix", "nt", "pty", "ctypes", "runpy"}
)
UNSAFE_BUILTINS = frozenset({"eval", "exec", "compile", "__import__", "open", "globals", "getattr", "setattr"})


@dataclass
class ToolFacts:
    """One tool as an agent uses it, resolved from shorthand, components or an MCP import."""

    agent: str
    path: str
    id: str
    source: str  # "function", "mcp", "shorthand" (a shorthand that resolved to a component keeps "component")
    function: str | None = None
    mcp: str | None = None
    permissions: ToolPermissions | None = None
    shorthand: bool = False
    known: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def network(self) -> str:
        """``none``, ``restricted`` (allowed_domains) or ``unrestricted``."""
        net = self.permissions.network if self.permissions else False
        if net is False:
            return "none"
        if net is True or not net.allowed_domains:
            return "unrestricted"
        return "restricted"

    @property
    def shell(self) -> bool:
        """Whether the tool may run shell commands."""
        return bool(self.permissions and self.permissions.shell)

    @property
    def filesystem_write(self) -> list[str]:
        """Path prefixes the tool may write."""
        fs = self.permissions.filesystem if self.permissions else None
        return list(fs.write) if fs else []

    @property
    def privileged(self) -> bool:
        """Shell, filesystem write, or unrestricted network: needs human approval."""
        return self.shell or bool(self.filesystem_write) or self.network == "unrestricted"


def unsafe_import(path: str) -> bool:
    """Whether a function path points into a dangerous primitive (os, subprocess, builtins.eval, …)."""
    module = path.split(":", 1)[0]
    root = module.split(".", 1)[0]
    return root in UNSAFE_MODULES or module in UNSAFE_BUILTINS


def tool_inventory(spec: Spec) -> list[ToolFacts]:
    """Every tool of every agent, resolved."""
    facts: list[ToolFacts] = []
    for agent_path, agent in agents_of(spec):
        mcp_tools = {t: s.id for s in agent.mcp for t in (s.tools or [])}
        for i, entry in enumerate(agent.tools):
            path = f"{agent_path}.tools[{i}]"
            if isinstance(entry, str):
                facts.append(_shorthand(spec, agent, agent_path, path, entry, mcp_tools))
            else:
                facts.append(_declared(agent_path, path, entry.id, entry))
    return facts


def _declared(agent: str, path: str, tool_id: str, tool: ToolDef) -> ToolFacts:
    return ToolFacts(
        agent=agent,
        path=path,
        id=tool_id,
        source="mcp" if tool.mcp else "function",
        function=tool.function,
        mcp=tool.mcp,
        permissions=tool.permissions,
    )


def _shorthand(spec: Spec, agent: Agent, agent_path: str, path: str, name: str, mcp_tools: dict[str, str]) -> ToolFacts:
    if name in spec.components.tools:
        facts = _declared(agent_path, path, name, spec.components.tools[name])
    elif name in mcp_tools:
        facts = ToolFacts(agent=agent_path, path=path, id=name, source="mcp", mcp=mcp_tools[name])
    else:
        facts = ToolFacts(agent=agent_path, path=path, id=name, source="unknown", known=False)
    facts.shorthand = True
    return facts


def check_governance(spec: Spec) -> list[Diagnostic]:
    """Tool references and permissions, unsafe imports, and the human approval rule."""
    facts = tool_inventory(spec)
    out: list[Diagnostic] = []
    for tool in facts:
        out += _check_tool(spec, tool)
    out += _check_tool_ids(spec)
    unsafe = _check_function_imports(spec)
    out += unsafe
    privileged = [t for t in facts if t.privileged] + [t for t in facts if t.function and unsafe_import(t.function)]
    if (privileged or unsafe) and not has_human_approval(spec):
        what = sorted({t.id for t in privileged}) or ["unsafe imports"]
        out.append(
            diag(
                "W_HUMAN_APPROVAL_MISSING",
                "workflow",
                f"privileged surfaces ({', '.join(what)}) run with no human approval step",
                "add a `kind: human` approval step before the privileged work",
            )
        )
    return out


def has_human_approval(spec: Spec) -> bool:
    """Whether the workflow has a human step."""
    return spec.workflow is not None and any(s.kind == "human" for s in workflow_items(spec.workflow))


def _check_tool(spec: Spec, tool: ToolFacts) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    if not tool.known:
        declared = sorted(spec.components.tools)
        return [
            diag(
                "E_UNKNOWN_TOOL",
                tool.path,
                f"Tool {tool.id!r} is not registered.",
                f"declare it under components.tools or inline with `id` and `function` (declared: "
                f"{', '.join(declared) or 'none'})",
            )
        ]
    if tool.function is not None and not IMPORT_PATH.match(tool.function):
        out.append(invalid_import(f"{tool.path}.function", tool.function))
    elif tool.function and unsafe_import(tool.function):
        out.append(
            diag(
                "E_UNSAFE_TOOL_IMPORT",
                tool.path,
                f"tool {tool.id!r} is implemented by {tool.function!r}, a dangerous primitive",
                "wrap the capability in your own function with narrow inputs and declare its permissions",
            )
        )
    if tool.source == "function" and tool.function is None and tool.mcp is None:
        out.append(diag("E_STEP_FIELD_MISSING", tool.path, f"tool {tool.id!r} needs `function` or `mcp`"))
    if tool.shorthand or (tool.permissions is None and tool.source != "mcp"):
        why = "is selected by shorthand" if tool.shorthand else "declares no permissions"
        out.append(
            diag(
                "W_TOOL_POLICY_UNRESTRICTED",
                tool.path,
                f"tool {tool.id!r} {why}; its permission policy is implicit",
                "declare the tool with `id`, `function` and `permissions` (network, filesystem, shell)",
            )
        )
    out += _check_permissions(tool)
    return out


def _check_permissions(tool: ToolFacts) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    if tool.network == "unrestricted":
        out.append(
            diag(
                "W_NETWORK_UNRESTRICTED",
                f"{tool.path}.permissions.network",
                f"tool {tool.id!r} may reach any domain",
                "list the domains under permissions.network.allowed_domains",
            )
        )
    if tool.shell:
        out.append(
            diag(
                "W_SHELL_TOOL",
                f"{tool.path}.permissions.shell",
                f"tool {tool.id!r} may run shell commands",
                "avoid shell tools, or gate them behind a human approval step",
            )
        )
    if tool.filesystem_write:
        out.append(
            diag(
                "W_FILESYSTEM_WRITE",
                f"{tool.path}.permissions.filesystem.write",
                f"tool {tool.id!r} may write under {', '.join(tool.filesystem_write)}",
                "prefer read-only access, or gate writes behind a human approval step",
            )
        )
    return out


def _check_tool_ids(spec: Spec) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    for agent_path, agent in agents_of(spec):
        seen: set[str] = set()
        for i, entry in enumerate(agent.tools):
            name = entry if isinstance(entry, str) else entry.id
            if name in seen:
                out.append(diag("E_DUPLICATE_ID", f"{agent_path}.tools[{i}]", f"tool {name!r} is listed twice"))
            seen.add(name)
        for stage in ("input", "output"):
            seen = set()
            for i, guard in enumerate(getattr(agent.guardrails, stage) if agent.guardrails else []):
                if guard.id in seen:
                    out.append(
                        diag("E_DUPLICATE_ID", f"{agent_path}.guardrails.{stage}[{i}].id", f"{guard.id!r} twice")
                    )
                seen.add(guard.id)
    return out


def function_paths(spec: Spec) -> list[tuple[str, str]]:
    """Every (path, import path) of a non-tool function: steps, components, memory, guardrails, aggregation."""
    found: list[tuple[str, str]] = []
    for agent_path, agent in agents_of(spec):
        if agent.memory and agent.memory.compress_history:
            found.append((f"{agent_path}.memory.compress_history", agent.memory.compress_history))
        for stage in ("input", "output"):
            for i, guard in enumerate(getattr(agent.guardrails, stage) if agent.guardrails else []):
                found.append((f"{agent_path}.guardrails.{stage}[{i}].function", guard.function))
    for key, fn in spec.components.functions.items():
        found.append((f"components.functions.{key}.function", fn.function))
    workflow = spec.workflow
    if workflow is not None:
        for list_key in ("steps", "nodes", "participants"):
            for i, step in enumerate(getattr(workflow, list_key)):
                if step.function:
                    found.append((f"workflow.{list_key}[{i}].function", step.function))
        if workflow.aggregation and workflow.aggregation.function:
            found.append(("workflow.aggregation.function", workflow.aggregation.function))
    return found


def _check_function_imports(spec: Spec) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    for path, value in function_paths(spec):
        if not IMPORT_PATH.match(value):
            if not path.startswith("workflow."):  # step function paths are checked with the step
                out.append(invalid_import(path, value))
        elif unsafe_import(value):
            out.append(
                diag(
                    "E_UNSAFE_FUNCTION_IMPORT",
                    path,
                    f"{value!r} is a dangerous primitive",
                    "call your own function that does one narrow thing",
                )
            )
    return out
