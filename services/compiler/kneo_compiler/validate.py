"""The validator pipeline: migrate → overlays and defaults → schema → structure → governance → environment policy.

Every stage returns diagnostics; nothing here raises for a bad spec.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from kneo_compiler import models
from kneo_compiler.diagnostics import Diagnostic, diag, join_path
from kneo_compiler.governance import check_governance
from kneo_compiler.loader import SourceMap
from kneo_compiler.migrate import deprecation_diagnostics, migrate
from kneo_compiler.models import Spec
from kneo_compiler.overlays import resolve
from kneo_compiler.policy import EnvironmentPolicyEnforcement, enforce
from kneo_compiler.project import ProjectConfig
from kneo_compiler.structure import check_structure

JSON = dict[str, Any]
SECRET_KEY = re.compile(r"(?i)^(.*[_-])?(api[_-]?key|token|secret|password|passwd|private[_-]?key)$")
ENV_REF = re.compile(r"^\$\{env:[A-Za-z_][A-Za-z0-9_]*\}$")
UNION_TAGS = {"str", "bool", "Tool", "NetworkPermission"}


def _field_names() -> list[str]:
    names: set[str] = set()
    for value in vars(models).values():
        if isinstance(value, type) and issubclass(value, BaseModel):
            names |= {f.alias or n for n, f in value.model_fields.items()}
    return sorted(names)


FIELD_NAMES = _field_names()


@dataclass
class Validation:
    """The outcome of validating a spec: the model (None if the schema failed), diagnostics, and context."""

    spec: Spec | None
    diagnostics: list[Diagnostic]
    resolved: JSON = field(default_factory=dict)
    environment: str | None = None
    policy: EnvironmentPolicyEnforcement | None = None

    @property
    def valid(self) -> bool:
        """No error-severity diagnostics."""
        return not any(d.severity == "error" for d in self.diagnostics)


def run_validation(
    raw: Any,
    environment: str | None = None,
    *,
    project: ProjectConfig | None = None,
    policy: EnvironmentPolicyEnforcement | None = None,
    source: SourceMap | None = None,
) -> Validation:
    """Validate a parsed spec for ``environment``; ``policy`` (e.g. a service policy) overrides the project's."""
    effective = policy if policy is not None else (project.policy_for(environment) if project else None)
    if not isinstance(raw, dict):
        return Validation(None, [diag("E_SPEC_SHAPE", "", "a spec must be a mapping", "start with `version: v1`")])
    migration = migrate(raw)
    diags = deprecation_diagnostics(migration)
    if migration.diagnostics:
        return Validation(None, _locate(diags, source, environment), raw, environment, effective)
    resolved, overlay_diags = resolve(migration.spec, environment, project)
    diags += overlay_diags
    diags += check_secrets(resolved, "")
    try:
        spec = Spec.model_validate(resolved)
    except ValidationError as exc:
        diags += schema_diagnostics(exc)
        return Validation(None, _locate(diags, source, environment), resolved, environment, effective)
    diags += _check_presence(spec)
    if spec.workflow is None and spec.agent is not None:
        spec.workflow = models.Workflow(name=spec.name or spec.agent.name, steps=[models.Step(id="respond")])
        diags.append(diag("I_DEFAULT_WORKFLOW", "workflow", "no workflow: one agent step `respond` is used"))
    diags += check_structure(spec)
    diags += check_governance(spec)
    diags += enforce(spec, diags, effective, environment)
    return Validation(spec, _locate(_dedupe(diags), source, environment), resolved, environment, effective)


def _check_presence(spec: Spec) -> list[Diagnostic]:
    if spec.agent is None and not spec.components.agents:
        return [diag("E_SCHEMA", "agent", "a spec needs `agent` or `components.agents`", "add an `agent:` block")]
    if spec.workflow is None and spec.agent is None:
        return [diag("E_SCHEMA", "workflow", "a spec without `agent` needs a `workflow`")]
    return []


def schema_diagnostics(exc: ValidationError) -> list[Diagnostic]:
    """Pydantic errors → ``E_UNKNOWN_FIELD`` / ``E_SCHEMA`` with paths like ``agent.tools[0]``."""
    errors = exc.errors()
    out: list[Diagnostic] = []
    prefixes = {_strip(e["loc"])[:-1] for e in errors if e["type"] not in ("string_type", "bool_type")}
    for err in errors:
        loc = _strip(err["loc"])
        branch_miss = err["type"] in ("string_type", "bool_type") and err["loc"] and err["loc"][-1] in UNION_TAGS
        if branch_miss and any(p[: len(loc)] == loc for p in prefixes):
            continue  # the other branch of a union explains this better
        path = join_path(*loc)
        if err["type"] == "extra_forbidden":
            name = str(loc[-1]) if loc else ""
            close = difflib.get_close_matches(name, FIELD_NAMES, n=1)
            hint = f"did you mean `{close[0]}`?" if close else "remove it; see docs/spec_reference.md"
            out.append(diag("E_UNKNOWN_FIELD", path, f"unknown field {name!r}", hint))
        else:
            out.append(diag("E_SCHEMA", path, err["msg"], "see docs/spec_reference.md for the field"))
    return _dedupe(out)


def _strip(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    kept = [p for i, p in enumerate(loc) if not (isinstance(p, str) and p in UNION_TAGS and i > 0)]
    return tuple(kept)


def check_secrets(value: Any, path: str) -> list[Diagnostic]:
    """Secret-looking keys must hold ``${env:NAME}`` references, never literal values."""
    out: list[Diagnostic] = []
    if isinstance(value, dict):
        for raw_key, item in value.items():
            key = str(raw_key)  # YAML allows numbers (and more) as keys
            child = join_path(path, key) if path else key
            if key == "env" or key.endswith("_env"):
                continue  # env-var names, not values
            if SECRET_KEY.match(key) and isinstance(item, str) and item and not ENV_REF.match(item):
                out.append(
                    diag(
                        "E_INLINE_SECRET",
                        child,
                        f"{key!r} holds a literal value; secrets may only be env-var references",
                        f"write `{key}: ${{env:YOUR_VAR}}` and set YOUR_VAR in the environment",
                    )
                )
            else:
                out += check_secrets(item, child)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += check_secrets(item, f"{path}[{i}]")
    return out


def _dedupe(diags: list[Diagnostic]) -> list[Diagnostic]:
    seen: set[tuple[str, str, str]] = set()
    out: list[Diagnostic] = []
    for d in diags:
        key = (d.code, d.path, d.message)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def _locate(diags: list[Diagnostic], source: SourceMap | None, environment: str | None) -> list[Diagnostic]:
    if source is None:
        return diags
    out: list[Diagnostic] = []
    for d in diags:
        mark = source.find(d.path, environment) if d.line is None else None
        out.append(d.model_copy(update={"line": mark[0], "column": mark[1]}) if mark else d)
    return out
