"""The spec operations as response bodies: one definition for the HTTP routes (through the compiler service) and
the CLI's ``--json`` output."""

from __future__ import annotations

from typing import Any

from kneo_compiler.spec import SpecInput, SpecProblem, check, compile_spec, explain_spec, policy_report_for
from kneo_events.schemas import EnvironmentPolicyEnforcement

JSON = dict[str, Any]
OPERATIONS = ("validate", "compile", "explain", "policy_report")


def _diags(items: Any) -> list[JSON]:
    return [d.model_dump(exclude_none=True) for d in items]


def validate_body(raw: SpecInput, environment: str | None, policy: EnvironmentPolicyEnforcement | None) -> JSON:
    """``{"valid", "diagnostics", "report": {"agent_name", "workflow_name", "environment"}}``."""
    result = check(raw, environment, policy=policy)
    spec = result.spec
    return {
        "valid": result.valid,
        "diagnostics": _diags(result.diagnostics),
        "report": {
            "agent_name": spec.agent.name if spec and spec.agent else None,
            "workflow_name": spec.workflow.name if spec and spec.workflow else None,
            "environment": environment,
        },
    }


def compile_body(raw: SpecInput, environment: str | None, policy: EnvironmentPolicyEnforcement | None) -> JSON:
    """``{"valid": true, "plan", "plan_hash", "diagnostics"}`` or ``{"valid": false, "diagnostics"}``."""
    result = check(raw, environment, policy=policy)
    try:
        plan = compile_spec(raw, environment, policy=policy, runnable=False)
    except SpecProblem as exc:
        return {"valid": False, "diagnostics": _diags(exc.diagnostics)}
    return {"valid": True, "plan": plan, "plan_hash": plan["hash"], "diagnostics": _diags(result.diagnostics)}


def explain_body(raw: SpecInput, environment: str | None, policy: EnvironmentPolicyEnforcement | None) -> JSON:
    """``{"valid": true, "explanation"}`` (plain sentences) or ``{"valid": false, "diagnostics"}``."""
    try:
        return {"valid": True, "explanation": explain_spec(raw, environment, policy=policy)}
    except SpecProblem as exc:
        return {"valid": False, "diagnostics": _diags(exc.diagnostics)}


def run_operation(
    op: str, raw: SpecInput, environment: str | None, policy: EnvironmentPolicyEnforcement | None
) -> JSON:
    """Dispatch one of :data:`OPERATIONS`."""
    if op == "validate":
        return validate_body(raw, environment, policy)
    if op == "compile":
        return compile_body(raw, environment, policy)
    if op == "explain":
        return explain_body(raw, environment, policy)
    if op == "policy_report":
        return policy_report_for(raw, environment, policy=policy)
    raise ValueError(f"unknown spec operation {op!r}")
