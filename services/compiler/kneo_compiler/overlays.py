"""Overlays and defaults: spec → project defaults → the spec's environment overlay → the project's overlay.

Mappings merge recursively; lists and scalars replace. The result has no ``environments`` key.
"""

from __future__ import annotations

import copy
from typing import Any

from kneo_compiler.diagnostics import Diagnostic, diag
from kneo_compiler.project import ProjectConfig

JSON = dict[str, Any]


def deep_merge(base: JSON, overlay: JSON) -> JSON:
    """Overlay ``overlay`` onto ``base``: mappings merge recursively, everything else replaces."""
    out = dict(base)
    for k, v in overlay.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve(raw: JSON, environment: str | None, project: ProjectConfig | None = None) -> tuple[JSON, list[Diagnostic]]:
    """Apply overlays and defaults for ``environment``; return the resolved spec and diagnostics about overlays."""
    out: list[Diagnostic] = []
    envs = raw.get("environments")
    spec = {k: copy.deepcopy(v) for k, v in raw.items() if k != "environments"}
    if envs is not None and not isinstance(envs, dict):
        out.append(diag("E_SCHEMA", "environments", "environments must be a mapping of name → overlay"))
        envs = {}
    envs = envs or {}
    for name, overlay in envs.items():
        if not isinstance(overlay, dict):
            out.append(diag("E_SCHEMA", f"environments.{name}", "an environment overlay must be a mapping"))
        elif {"version", "environments"} & set(overlay):
            out.append(
                diag("E_UNKNOWN_FIELD", f"environments.{name}", "an overlay may not set version or environments")
            )
    if project is not None:
        spec = _apply_model_defaults(spec, project.defaults.model)
    overlaid = False
    if environment:
        own = envs.get(environment)
        if isinstance(own, dict):
            spec = deep_merge(spec, {k: v for k, v in own.items() if k not in ("version", "environments")})
            overlaid = True
        project_env = project.environments.get(environment) if project else None
        if project_env is not None and project_env.overlay:
            spec = deep_merge(spec, project_env.overlay)
            overlaid = True
        if not overlaid:
            out.append(
                diag(
                    "I_ENVIRONMENT_NO_OVERLAY",
                    "environments",
                    f"environment {environment!r} has no overlay; the base spec is used",
                )
            )
    spec = normalize(spec)
    if project is not None:
        _apply_runtime_defaults(spec, project)
    return spec, out


def _apply_model_defaults(spec: JSON, model: JSON) -> JSON:
    if not model:
        return spec
    agents = [spec.get("agent")]
    components = spec.get("components")
    if isinstance(components, dict) and isinstance(components.get("agents"), dict):
        agents += list(components["agents"].values())
    for agent in agents:
        if isinstance(agent, dict):
            own = agent.get("model")
            agent["model"] = deep_merge(model, own) if isinstance(own, dict) else (own or copy.deepcopy(model))
    return spec


def _apply_runtime_defaults(spec: JSON, project: ProjectConfig) -> None:
    defaults = project.defaults.runtime.model_dump(exclude_none=True)
    workflow = spec.get("workflow")
    if not defaults or not isinstance(workflow, dict):
        return
    for key in ("steps", "nodes", "participants"):
        for step in workflow.get(key) or []:
            if isinstance(step, dict) and step.get("kind", "agent") != "human":
                for name, value in defaults.items():
                    step.setdefault(name, value)


def normalize(spec: JSON) -> JSON:
    """Accepted spellings → canonical ones: ``workflow.type`` → ``kind``; graph ``nodes`` as a mapping → a list."""
    workflow = spec.get("workflow")
    if not isinstance(workflow, dict):
        return spec
    workflow = dict(workflow)
    if "type" in workflow and "kind" not in workflow:
        workflow["kind"] = workflow.pop("type")
    nodes = workflow.get("nodes")
    if isinstance(nodes, dict):
        workflow["nodes"] = [{"id": k, **v} if isinstance(v, dict) else v for k, v in nodes.items()]
    spec["workflow"] = workflow
    return spec
