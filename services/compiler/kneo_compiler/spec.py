"""Spec loading and compilation (pure: no I/O beyond parsing the text you pass in).

This is the first slice of the spec language: version v1 specs with one agent and a sequential workflow of agent
steps, environment overlays, and diagnostics with stable codes. The full language is its own issue.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

JSON = dict[str, Any]
DEFAULT_RETRIES = 3


class Diagnostic(BaseModel):
    """One finding about a spec: a stable code, a severity, where, what, and what to do."""

    model_config = ConfigDict(frozen=True)
    code: str
    severity: Literal["error", "warning", "info"] = "error"
    path: str = ""
    message: str
    suggestion: str | None = None
    line: int | None = None
    column: int | None = None


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: str = "dummy"
    name: str = "dummy"
    params: JSON = Field(default_factory=dict)


class Agent(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    model: ModelRef = Field(default_factory=ModelRef)
    instructions: str | None = None
    strategy: str | None = None
    tools: list[Any] = Field(default_factory=list)
    memory: JSON | None = None


class Step(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    kind: Literal["agent", "function", "human"] = "agent"
    prompt: str | None = None
    agent: str | None = None
    on_error: Literal["fail", "retry", "continue"] = "fail"
    max_retries: int | None = Field(default=None, ge=0, le=20)
    timeout_seconds: float | None = Field(default=None, gt=0)


class Workflow(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    kind: str = "sequential"
    steps: list[Step] = Field(default_factory=list)


class Spec(BaseModel):
    model_config = ConfigDict(extra="allow")
    version: Literal["v1"] = "v1"
    name: str | None = None
    agent: Agent
    workflow: Workflow | None = None
    environments: dict[str, JSON] = Field(default_factory=dict)


class SpecProblem(Exception):
    """The spec can't be used; ``diagnostics`` says why."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        super().__init__("; ".join(f"{d.code} {d.path}: {d.message}" for d in diagnostics))
        self.diagnostics = diagnostics


class _SafeLoader(yaml.SafeLoader):
    """Safe loading only; aliases are refused (no alias bombs)."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "YAML aliases are not allowed in specs", event.start_mark
            )
        return super().compose_node(parent, index)


def parse_yaml(text: str | bytes) -> JSON:
    """Parse spec text into a mapping or raise :class:`SpecProblem` with a located diagnostic."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SpecProblem([Diagnostic(code="E_SPEC_ENCODING", message=f"spec is not UTF-8 text: {exc}")]) from exc
    try:
        data = yaml.load(text, Loader=_SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise SpecProblem(
            [
                Diagnostic(
                    code="E_YAML_PARSE",
                    message=str(exc.problem or exc),
                    line=mark.line + 1 if mark else None,
                    column=mark.column + 1 if mark else None,
                    suggestion="fix the YAML syntax at the given line",
                )
            ]
        ) from exc
    except yaml.YAMLError as exc:
        raise SpecProblem([Diagnostic(code="E_YAML_PARSE", message=str(exc))]) from exc
    if not isinstance(data, dict):
        raise SpecProblem(
            [
                Diagnostic(
                    code="E_SPEC_SHAPE",
                    message="a spec must be a YAML mapping",
                    suggestion="start with `version: v1`",
                )
            ]
        )
    return data


def deep_merge(base: JSON, overlay: JSON) -> JSON:
    """Overlay ``overlay`` onto ``base``: mappings merge recursively, everything else replaces."""
    out = dict(base)
    for k, v in overlay.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve(raw: JSON, environment: str | None) -> JSON:
    """Apply the spec's own overlay for ``environment`` (if any) and drop the overlays."""
    envs = raw.get("environments") or {}
    base = {k: v for k, v in raw.items() if k != "environments"}
    if environment and isinstance(envs, dict) and isinstance(envs.get(environment), dict):
        base = deep_merge(base, envs[environment])
    return base


def validate(raw: JSON, environment: str | None = None) -> tuple[Spec | None, list[Diagnostic]]:
    """Validate a parsed spec; returns the model (or None) and diagnostics."""
    try:
        spec = Spec.model_validate(resolve(raw, environment))
    except ValidationError as exc:
        diags = [
            Diagnostic(
                code="E_SCHEMA",
                path=".".join(str(p) for p in err["loc"]),
                message=err["msg"],
                suggestion="see docs/spec_reference.md for the field",
            )
            for err in exc.errors()
        ]
        return None, diags
    diags: list[Diagnostic] = []
    if spec.workflow is None:
        spec.workflow = Workflow(name=spec.name or spec.agent.name, steps=[Step(id="respond")])
    if spec.workflow.kind != "sequential":
        diags.append(
            Diagnostic(
                code="E_WORKFLOW_KIND_UNSUPPORTED",
                path="workflow.kind",
                message=f"workflow kind {spec.workflow.kind!r} is not supported by this runner yet",
                suggestion="use kind: sequential",
            )
        )
    if not spec.workflow.steps:
        diags.append(Diagnostic(code="E_NO_STEPS", path="workflow.steps", message="a sequential workflow needs steps"))
    seen: set[str] = set()
    for i, step in enumerate(spec.workflow.steps):
        if step.id in seen:
            diags.append(
                Diagnostic(
                    code="E_DUPLICATE_ID",
                    path=f"workflow.steps[{i}].id",
                    message=f"duplicate step id {step.id!r}",
                )
            )
        seen.add(step.id)
        if step.kind != "agent":
            diags.append(
                Diagnostic(
                    code="E_STEP_KIND_UNSUPPORTED",
                    path=f"workflow.steps[{i}].kind",
                    message=f"step kind {step.kind!r} is not supported by this runner yet",
                )
            )
    if spec.agent.model.provider != "dummy":
        diags.append(
            Diagnostic(
                code="E_PROVIDER_UNAVAILABLE",
                path="agent.model.provider",
                message=f"provider {spec.agent.model.provider!r} is not available in this build",
                suggestion="use provider: dummy",
            )
        )
    return spec, diags


def plan_hash(plan: JSON) -> str:
    """Content hash of a plan (canonical JSON, sorted keys)."""
    return "sha256:" + hashlib.sha256(orjson.dumps(plan, option=orjson.OPT_SORT_KEYS)).hexdigest()


def compile_spec(raw: JSON, environment: str | None = None) -> JSON:
    """Compile a parsed spec into a deterministic executable plan, or raise :class:`SpecProblem`."""
    spec, diags = validate(raw, environment)
    errors = [d for d in diags if d.severity == "error"]
    if spec is None or errors:
        raise SpecProblem(errors or diags)
    assert spec.workflow is not None
    plan: JSON = {
        "plan_version": 1,
        "environment": environment,
        "spec_name": spec.name,
        "workflow": {"name": spec.workflow.name, "kind": spec.workflow.kind},
        "agent": {
            "name": spec.agent.name,
            "instructions": spec.agent.instructions,
            "model": spec.agent.model.model_dump(),
        },
        "steps": [
            {
                "index": i,
                "id": s.id,
                "kind": s.kind,
                "prompt": s.prompt,
                "on_error": s.on_error,
                # on_error: retry without an explicit max_retries retries up to DEFAULT_RETRIES times
                "max_retries": s.max_retries
                if s.max_retries is not None
                else (DEFAULT_RETRIES if s.on_error == "retry" else 0),
                "timeout_seconds": s.timeout_seconds,
            }
            for i, s in enumerate(spec.workflow.steps)
        ],
    }
    plan["hash"] = plan_hash(plan)
    return plan
