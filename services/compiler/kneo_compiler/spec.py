"""The spec language's stable facade: what the compiler service, the gateway and the CLI import.

Each operation takes a spec as a parsed mapping or as YAML text/bytes (text gives diagnostics line and column),
an optional environment, an optional project config (``.kneo/config.yaml``) and an optional environment policy
(a service-managed policy overrides the project's). Bad input never raises anything but :class:`SpecProblem`.
"""

from __future__ import annotations

from typing import Any

from kneo_compiler.compile import DEFAULT_RETRIES, build_plan, plan_hash, runnable_diagnostics
from kneo_compiler.diagnostics import CODES, Diagnostic, SpecProblem, errors_of, lint_view
from kneo_compiler.explain import explain
from kneo_compiler.loader import MAX_SPEC_BYTES, SourceMap, load, parse_yaml
from kneo_compiler.migrate import Migration, dump_yaml, migrate
from kneo_compiler.models import Spec, Step, Workflow, spec_json_schema
from kneo_compiler.overlays import deep_merge
from kneo_compiler.overlays import resolve as resolve_with_diagnostics
from kneo_compiler.policy import EnvironmentPolicyEnforcement, policy_report
from kneo_compiler.project import ProjectConfig
from kneo_compiler.validate import Validation, run_validation

JSON = dict[str, Any]
SpecInput = JSON | str | bytes

__all__ = [
    "CODES",
    "DEFAULT_RETRIES",
    "Diagnostic",
    "EnvironmentPolicyEnforcement",
    "Migration",
    "ProjectConfig",
    "Spec",
    "SpecInput",
    "SpecProblem",
    "Step",
    "Validation",
    "Workflow",
    "check",
    "compile_spec",
    "deep_merge",
    "dump_yaml",
    "explain_spec",
    "lint",
    "migrate",
    "parse_yaml",
    "plan_hash",
    "policy_report_for",
    "render_spec",
    "resolve",
    "runnable_diagnostics",
    "spec_json_schema",
    "validate",
]


def _parsed(raw: SpecInput, max_bytes: int) -> tuple[JSON, SourceMap | None]:
    if isinstance(raw, str | bytes):
        return load(raw, max_bytes)
    return raw, None


def check(
    raw: SpecInput,
    environment: str | None = None,
    *,
    project: ProjectConfig | None = None,
    policy: EnvironmentPolicyEnforcement | None = None,
    max_bytes: int = MAX_SPEC_BYTES,
) -> Validation:
    """Run the whole validator pipeline; parse problems come back as diagnostics too (never raises)."""
    try:
        data, source = _parsed(raw, max_bytes)
    except SpecProblem as exc:
        return Validation(None, exc.diagnostics, environment=environment)
    return run_validation(data, environment, project=project, policy=policy, source=source)


def validate(
    raw: SpecInput,
    environment: str | None = None,
    *,
    project: ProjectConfig | None = None,
    policy: EnvironmentPolicyEnforcement | None = None,
) -> tuple[Spec | None, list[Diagnostic]]:
    """Validate a spec; returns the model (None if it could not be built) and every diagnostic."""
    result = check(raw, environment, project=project, policy=policy)
    return result.spec, result.diagnostics


def lint(
    raw: SpecInput,
    environment: str | None = None,
    *,
    project: ProjectConfig | None = None,
    policy: EnvironmentPolicyEnforcement | None = None,
) -> JSON:
    """The lint envelope ``{clean, warning_count, error_count, diagnostics}`` (warnings and errors only)."""
    return lint_view(check(raw, environment, project=project, policy=policy).diagnostics)


def compile_spec(
    raw: SpecInput,
    environment: str | None = None,
    *,
    project: ProjectConfig | None = None,
    policy: EnvironmentPolicyEnforcement | None = None,
    runnable: bool = True,
) -> JSON:
    """Compile a spec into a deterministic executable plan, or raise :class:`SpecProblem` with the errors.

    With ``runnable`` (the default, what the compiler service needs) a plan the runner of this build cannot execute
    is an error too (``E_STEP_KIND_UNSUPPORTED``); ``runnable=False`` skips that check
    every valid workflow kind (``kneo spec compile``).
    """
    result = check(raw, environment, project=project, policy=policy)
    errors = errors_of(result.diagnostics)
    if result.spec is None or errors:
        raise SpecProblem(errors or result.diagnostics)
    plan = build_plan(result.spec, environment)
    if runnable:
        blockers = runnable_diagnostics(plan)
        if blockers:
            raise SpecProblem(blockers)
    return plan


def policy_report_for(
    raw: SpecInput,
    environment: str | None = None,
    *,
    project: ProjectConfig | None = None,
    policy: EnvironmentPolicyEnforcement | None = None,
) -> JSON:
    """``{"valid": bool, "report": {...}}``: the governance report with the validation diagnostics."""
    result = check(raw, environment, project=project, policy=policy)
    return {
        "valid": result.valid,
        "report": policy_report(result.spec, result.diagnostics, environment, result.policy),
    }


def explain_spec(
    raw: SpecInput,
    environment: str | None = None,
    *,
    project: ProjectConfig | None = None,
    policy: EnvironmentPolicyEnforcement | None = None,
) -> str:
    """A readable account of the plan, or raise :class:`SpecProblem`."""
    return explain(compile_spec(raw, environment, project=project, policy=policy, runnable=False))


def resolve(raw: JSON, environment: str | None, project: ProjectConfig | None = None) -> JSON:
    """The spec with overlays and defaults for ``environment`` applied (no ``environments`` key)."""
    return resolve_with_diagnostics(raw, environment, project)[0]


def render_spec(raw: SpecInput, environment: str | None = None, *, project: ProjectConfig | None = None) -> str:
    """Overlays + defaults → one v1 YAML document, or raise :class:`SpecProblem` when the spec has errors."""
    result = check(raw, environment, project=project)
    errors = errors_of(result.diagnostics)
    if errors:
        raise SpecProblem(errors)
    return dump_yaml(result.resolved)
