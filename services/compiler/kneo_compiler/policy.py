"""Environment policy enforcement (applied after overlays and defaults) and the governance policy report."""

from __future__ import annotations

from typing import Any

from kneo_compiler.diagnostics import Diagnostic, diag
from kneo_compiler.governance import ToolFacts, function_paths, has_human_approval, tool_inventory, unsafe_import
from kneo_compiler.models import Spec, canonical_kind
from kneo_compiler.structure import agents_of, workflow_items
from kneo_events.schemas import EnvironmentPolicyEnforcement

JSON = dict[str, Any]
__all__ = ["EnvironmentPolicyEnforcement", "enforce", "policy_report"]
UNRESTRICTED_CODES = {"W_NETWORK_UNRESTRICTED", "W_SHELL_TOOL"}


def enforce(
    spec: Spec, diagnostics: list[Diagnostic], policy: EnvironmentPolicyEnforcement | None, environment: str | None
) -> list[Diagnostic]:
    """Policy errors for ``diagnostics`` of ``spec`` under ``policy`` (none when the policy is off or absent)."""
    if policy is None or not policy.enabled:
        return []
    env = environment or "default"
    out: list[Diagnostic] = []
    blocked = set(policy.blocked_diagnostic_codes)
    gates = [
        (policy.require_tool_permissions, {"W_TOOL_POLICY_UNRESTRICTED"}, "E_POLICY_TOOL_PERMISSIONS"),
        (policy.deny_unrestricted_tools, UNRESTRICTED_CODES, "E_POLICY_UNRESTRICTED_TOOL"),
        (policy.require_human_review, {"W_HUMAN_APPROVAL_MISSING"}, "E_POLICY_HUMAN_REVIEW"),
    ]
    for d in diagnostics:
        if d.code in blocked:
            out.append(
                diag("E_POLICY_BLOCKED_CODE", d.path, f"environment {env!r} blocks {d.code}: {d.message}", d.suggestion)
            )
        for on, codes, code in gates:
            if on and d.code in codes:
                out.append(diag(code, d.path, f"environment {env!r} does not allow this: {d.message}", d.suggestion))
    if policy.require_guardrails:
        out += _missing_guardrails(spec, env)
    warnings = [d for d in diagnostics if d.severity == "warning"]
    if policy.fail_on_warnings and warnings:
        out.append(
            diag(
                "E_POLICY_WARNINGS",
                "",
                f"environment {env!r} fails on warnings; the spec has {len(warnings)}",
                "fix the warnings listed with this diagnostic",
            )
        )
    return out


def _missing_guardrails(spec: Spec, env: str) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    for path, agent in agents_of(spec):
        guards = agent.guardrails
        missing = [s for s in ("input", "output") if not (guards and getattr(guards, s))]
        if missing:
            out.append(
                diag(
                    "E_POLICY_GUARDRAILS",
                    f"{path}.guardrails",
                    f"environment {env!r} requires {' and '.join(missing)} guardrails on agent {agent.name!r}",
                    "declare guardrails.input and guardrails.output with a function each",
                )
            )
    return out


def _tool_entry(tool: ToolFacts) -> JSON:
    perms = tool.permissions
    network = perms.network if perms else False
    fs = perms.filesystem if perms else None
    return {
        "agent": tool.agent,
        "id": tool.id,
        "path": tool.path,
        "source": tool.source,
        "function": tool.function,
        "mcp": tool.mcp,
        "shorthand": tool.shorthand,
        "explicit_permissions": perms is not None,
        "network": tool.network,
        "allowed_domains": list(network.allowed_domains or []) if not isinstance(network, bool) else [],
        "filesystem_read": list(fs.read) if fs else [],
        "filesystem_write": tool.filesystem_write,
        "shell": tool.shell,
        "privileged": tool.privileged,
        "unsafe_import": bool(tool.function and unsafe_import(tool.function)),
    }


def policy_report(
    spec: Spec | None,
    diagnostics: list[Diagnostic],
    environment: str | None = None,
    policy: EnvironmentPolicyEnforcement | None = None,
) -> JSON:
    """The governance report: memory, tool permissions, MCP imports, guardrails, human review, and diagnostics."""
    counts = {s: sum(1 for d in diagnostics if d.severity == s) for s in ("error", "warning", "info")}
    report: JSON = {
        "environment": environment,
        "policy": policy.model_dump() if policy else None,
        "diagnostics": [d.model_dump(exclude_none=True) for d in diagnostics],
        "summary": {"errors": counts["error"], "warnings": counts["warning"], "infos": counts["info"]},
    }
    if spec is None:
        return report
    tools = tool_inventory(spec)
    humans = [s for s in workflow_items(spec.workflow)] if spec.workflow else []
    humans = [s for s in humans if s.kind == "human"]
    privileged = sorted({t.id for t in tools if t.privileged})
    unsafe = [p for p, f in function_paths(spec) if unsafe_import(f)] + [t.path for t in tools if _unsafe(t)]
    report.update(
        spec_name=spec.name,
        agent_name=spec.agent.name if spec.agent else None,
        workflow_name=spec.workflow.name if spec.workflow else None,
        workflow_kind=canonical_kind(spec.workflow.kind) if spec.workflow else None,
        memory={path: agent.memory.model_dump() if agent.memory else None for path, agent in agents_of(spec)},
        tools=[_tool_entry(t) for t in tools],
        mcp_imports=[
            {
                "agent": path,
                "id": s.id,
                "transport": s.transport,
                "target": s.command or s.url,
                "tools": s.tools,
                "env_refs": sorted(s.env.values()),
            }
            for path, agent in agents_of(spec)
            for s in agent.mcp
        ],
        guardrails={
            path: {
                "input": [g.id for g in agent.guardrails.input] if agent.guardrails else [],
                "output": [g.id for g in agent.guardrails.output] if agent.guardrails else [],
            }
            for path, agent in agents_of(spec)
        },
        human_review={
            "steps": [
                {
                    "id": s.id,
                    "reviewers": s.reviewers,
                    "options": s.options,
                    "timeout_seconds": s.timeout_seconds,
                    "on_timeout": s.on_timeout or "fail",
                }
                for s in humans
            ],
            "reviewers": sorted({r for s in humans for r in s.reviewers}),
            "approval_required": bool(privileged or unsafe),
            "approval_present": has_human_approval(spec),
            "privileged_tools": privileged,
            "unsafe_imports": unsafe,
        },
    )
    return report


def _unsafe(tool: ToolFacts) -> bool:
    return bool(tool.function and unsafe_import(tool.function))
