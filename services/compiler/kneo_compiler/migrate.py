"""Migration of older specs to v1: unversioned and v0 specs are rewritten; v1 specs lose deprecated fields.

A future (or unknown) version fails fast: guessing its meaning would be worse than refusing it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import yaml

from kneo_compiler.diagnostics import Diagnostic, diag

JSON = dict[str, Any]
CURRENT = "v1"
LEGACY_VERSIONS = {None, "v0", "0", 0}
_FLAT_AGENT_KEYS = ("agent_name", "llm", "model", "system_prompt", "instructions", "tools", "memory", "strategy")
_LLM_KEYS = {"provider", "name", "params"}


@dataclass
class Migration:
    """The outcome of a migration: the v1 spec, where it came from, and what changed (as human-readable notes)."""

    spec: JSON
    from_version: str
    changes: list[tuple[str, str]] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """Whether the spec had to be rewritten."""
        return bool(self.changes)


def migrate(raw: JSON) -> Migration:
    """Rewrite ``raw`` to v1. An unsupported version yields ``E_SPEC_VERSION_UNSUPPORTED`` and the spec unchanged."""
    version = raw.get("version")
    if version == CURRENT:
        spec = copy.deepcopy(raw)
        return Migration(spec, CURRENT, _rewrite_deprecated(spec))
    if not _is_legacy(version):
        problem = diag(
            "E_SPEC_VERSION_UNSUPPORTED",
            "version",
            f"spec version {version!r} is not supported; this compiler knows unversioned, v0 and v1",
            "use `version: v1`, or upgrade Kneo if the spec was written for a newer release",
        )
        return Migration(raw, str(version), diagnostics=[problem])
    spec = copy.deepcopy(raw)
    changes = _rewrite_legacy(spec)
    changes += _rewrite_deprecated(spec)
    spec["version"] = CURRENT
    changes.insert(0, ("version", f"version {version or 'unversioned'!s} → v1"))
    return Migration(_ordered(spec), "unversioned" if version is None else "v0", changes)


def _ordered(spec: JSON) -> JSON:
    """Keys in the order the reference documents them, so a migrated file reads naturally."""
    order = ("version", "name", "description", "agent", "components", "workflow", "environments", "metadata")
    out: JSON = {k: spec[k] for k in order if k in spec}
    out.update({k: v for k, v in spec.items() if k not in out})
    workflow = out.get("workflow")
    if isinstance(workflow, dict):
        head = {k: workflow[k] for k in ("name", "kind") if k in workflow}
        out["workflow"] = {**head, **{k: v for k, v in workflow.items() if k not in head}}
    return out


def _is_legacy(version: Any) -> bool:
    if version is None:
        return True
    return isinstance(version, str | int | float) and not isinstance(version, bool) and version in LEGACY_VERSIONS


def _rewrite_legacy(spec: JSON) -> list[tuple[str, str]]:
    """v0-only shapes: a flat agent at the top, ``workflow.type``, steps with ``name`` and ``input``/``task``."""
    changes: list[tuple[str, str]] = []
    if "agent" not in spec and any(k in spec for k in _FLAT_AGENT_KEYS):
        agent: JSON = {}
        for key in _FLAT_AGENT_KEYS:
            if key in spec:
                agent["name" if key == "agent_name" else key] = spec.pop(key)
        agent.setdefault("name", spec.get("name") or "agent")
        spec["agent"] = agent
        changes.append(("agent", "top-level agent fields moved under `agent`"))
    workflow = spec.get("workflow")
    if isinstance(workflow, dict):
        if "type" in workflow and "kind" not in workflow:
            workflow["kind"] = workflow.pop("type")
            changes.append(("workflow.type", "`workflow.type` renamed to `workflow.kind`"))
        workflow.setdefault("name", spec.get("name") or "workflow")
        for list_key in ("steps", "nodes", "participants"):
            for i, step in enumerate(workflow.get(list_key) or []):
                if isinstance(step, dict):
                    changes += _rewrite_legacy_step(step, f"workflow.{list_key}[{i}]")
    return changes


def _rewrite_legacy_step(step: JSON, path: str) -> list[tuple[str, str]]:
    changes: list[tuple[str, str]] = []
    if "name" in step and "id" not in step:
        step["id"] = step.pop("name")
        changes.append((f"{path}.name", "step `name` renamed to `id`"))
    for old in ("input", "task"):
        if old in step and "prompt" not in step:
            step["prompt"] = step.pop(old)
            changes.append((f"{path}.{old}", f"step `{old}` renamed to `prompt`"))
    return changes


def _agents(spec: JSON) -> list[tuple[str, JSON]]:
    found: list[tuple[str, JSON]] = []
    if isinstance(spec.get("agent"), dict):
        found.append(("agent", spec["agent"]))
    components = spec.get("components")
    if isinstance(components, dict) and isinstance(components.get("agents"), dict):
        for key, agent in components["agents"].items():
            if isinstance(agent, dict):
                found.append((f"components.agents.{key}", agent))
    return found


def _steps(spec: JSON) -> list[tuple[str, JSON]]:
    workflow = spec.get("workflow")
    if not isinstance(workflow, dict):
        return []
    found: list[tuple[str, JSON]] = []
    for list_key in ("steps", "nodes", "participants"):
        items = workflow.get(list_key)
        if isinstance(items, list):
            found += [(f"workflow.{list_key}[{i}]", s) for i, s in enumerate(items) if isinstance(s, dict)]
    return found


def _rewrite_deprecated(spec: JSON) -> list[tuple[str, str]]:
    """Fields still accepted in v1 but deprecated: ``llm``, ``system_prompt``, step ``retries`` and ``timeout``."""
    changes: list[tuple[str, str]] = []
    for path, agent in _agents(spec):
        if "llm" in agent:
            llm = agent.pop("llm")
            if "model" not in agent:
                agent["model"] = _model_from_llm(llm)
            changes.append((f"{path}.llm", "`llm` is deprecated; use `model` {provider, name, params}"))
        if "system_prompt" in agent:
            prompt = agent.pop("system_prompt")
            agent.setdefault("instructions", prompt)
            changes.append((f"{path}.system_prompt", "`system_prompt` is deprecated; use `instructions`"))
    for path, step in _steps(spec):
        if "retries" in step:
            retries = step.pop("retries")
            step.setdefault("max_retries", retries)
            step.setdefault("on_error", "retry")
            changes.append((f"{path}.retries", "`retries` is deprecated; use `on_error: retry` and `max_retries`"))
        if "timeout" in step:
            timeout = step.pop("timeout")
            step.setdefault("timeout_seconds", timeout)
            changes.append((f"{path}.timeout", "`timeout` is deprecated; use `timeout_seconds`"))
    return changes


def _model_from_llm(llm: Any) -> Any:
    if isinstance(llm, str):
        provider, _, name = llm.partition(":")
        return {"provider": provider, "name": name or provider}
    if not isinstance(llm, dict):
        return llm
    model: JSON = {k: llm[k] for k in ("provider", "name", "params") if k in llm}
    if "model" in llm and "name" not in model:
        model["name"] = llm["model"]
    extra = {k: v for k, v in llm.items() if k not in _LLM_KEYS | {"model"}}
    if extra:
        model["params"] = {**extra, **(model.get("params") or {})}
    return model


def deprecation_diagnostics(migration: Migration) -> list[Diagnostic]:
    """What validate reports about a migration done in memory."""
    if migration.diagnostics:
        return list(migration.diagnostics)
    if migration.from_version != CURRENT:
        return [
            diag(
                "W_SPEC_MIGRATION_NEEDED",
                "version",
                f"the spec is {migration.from_version}; it was migrated to v1 in memory ({len(migration.changes)} "
                "changes)",
                "run `kneo spec migrate <spec> --output <spec>` to rewrite it",
            )
        ]
    return [
        diag("W_DEPRECATED_FIELD", path, message, "run `kneo spec migrate` to rewrite it")
        for path, message in migration.changes
    ]


def dump_yaml(spec: JSON) -> str:
    """Serialize a spec as block YAML in the order its keys were written."""
    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, default_flow_style=False, width=120)
