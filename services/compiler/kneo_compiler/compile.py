"""Compilation: a valid spec → a deterministic, content-hashed executable plan (what the runner consumes).

Every plan has ``steps`` (the workflow's units in declaration order: steps, nodes or participants), ``agent`` (the
top-level agent, or the first component agent), ``agents`` (every agent by id), ``workflow`` (name, kind and the
kind's own fields), ``spec_name``, ``environment`` and ``hash``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from kneo_compiler.diagnostics import Diagnostic, diag
from kneo_compiler.models import Agent, Aggregation, Spec, Step, Tool, Workflow, canonical_kind
from kneo_compiler.structure import workflow_items

JSON = dict[str, Any]
PLAN_VERSION = 2
DEFAULT_RETRIES = 3
RUNNABLE_STEP_KINDS = {"agent", "function", "human"}


def plan_hash(plan: JSON) -> str:
    """Content hash of a plan (canonical JSON, sorted keys, without the ``hash`` key)."""
    body = {k: v for k, v in plan.items() if k != "hash"}
    return "sha256:" + hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def build_plan(spec: Spec, environment: str | None) -> JSON:
    """The plan of a spec that validated without errors."""
    assert spec.workflow is not None, "validation fills in the default workflow"
    agents = _agents(spec)
    primary = spec.agent.name if spec.agent else next(iter(spec.components.agents))
    plan: JSON = {
        "plan_version": PLAN_VERSION,
        "environment": environment,
        "spec_name": spec.name,
        "workflow": _workflow(spec.workflow),
        "agent": agents[primary],
        "agents": agents,
        "functions": {k: f.function for k, f in sorted(spec.components.functions.items())},
        "steps": [_step(i, s, primary, spec.components.functions) for i, s in enumerate(workflow_items(spec.workflow))],
    }
    plan["entry"] = _entry(plan)
    plan["hash"] = plan_hash(plan)
    return plan


def _entry(plan: JSON) -> int:
    """The index of the step a run starts with: the graph's start node, the handoff's first speaker, else step 0."""
    wf = plan["workflow"]
    index = {s["id"]: s["index"] for s in plan["steps"]}
    if wf.get("kind") == "graph" and wf.get("start") in index:
        return int(index[wf["start"]])
    if wf.get("kind") == "handoff":
        sequence = (wf.get("selector") or {}).get("sequence") or []
        if sequence and sequence[0] in index and (wf.get("selector") or {}).get("type") != "round_robin":
            return int(index[sequence[0]])
    return 0


def _agents(spec: Spec) -> JSON:
    out: JSON = {}
    if spec.agent is not None:
        out[spec.agent.name] = _agent(spec.agent.name, spec.agent, spec)
    for key, agent in sorted(spec.components.agents.items()):
        out[key] = _agent(key, agent, spec)
    return out


def _agent(agent_id: str, agent: Agent, spec: Spec) -> JSON:
    return {
        "id": agent_id,
        "name": agent.name,
        "description": agent.description,
        "instructions": agent.instructions,
        "strategy": agent.strategy,
        "model": agent.model.model_dump(),
        "tools": [_tool(t, spec) for t in agent.tools],
        "memory": agent.memory.model_dump() if agent.memory else None,
        "guardrails": agent.guardrails.model_dump() if agent.guardrails else {"input": [], "output": []},
        "mcp": [s.model_dump() for s in agent.mcp],
    }


def _tool(entry: str | Tool, spec: Spec) -> JSON:
    if isinstance(entry, Tool):
        return entry.model_dump(exclude_none=True)
    declared = spec.components.tools.get(entry)
    if declared is not None:
        return {"id": entry, **declared.model_dump(exclude_none=True)}
    return {"id": entry, "mcp_tool": True}


def _workflow(workflow: Workflow) -> JSON:
    kind = canonical_kind(workflow.kind)
    out: JSON = {"name": workflow.name, "kind": kind}
    if workflow.timeout_seconds is not None:  # only when set: plans (and their hashes) stay as they were
        out["timeout_seconds"] = workflow.timeout_seconds
    if kind == "graph":
        out.update(
            start=workflow.start,
            max_iterations=workflow.max_iterations,
            edges=[e.model_dump(by_alias=True, exclude_none=True) for e in workflow.edges],
        )
    elif kind == "concurrent":
        out["aggregation"] = (workflow.aggregation or Aggregation()).model_dump()
    elif kind == "handoff":
        selector = workflow.selector
        out["selector"] = (
            selector.model_dump()
            if selector
            else {"type": "sequence", "sequence": [p.id for p in workflow.participants], "max_turns": None}
        )
    elif kind == "group_chat":
        out["rounds"] = workflow.rounds or 1
    return out


def _step(index: int, step: Step, primary: str, functions: dict[str, Any]) -> JSON:
    out: JSON = {
        "index": index,
        "id": step.id,
        "kind": step.kind,
        "prompt": step.prompt,
        "on_error": step.on_error,
        # on_error: retry without an explicit max_retries retries up to DEFAULT_RETRIES times
        "max_retries": step.max_retries
        if step.max_retries is not None
        else (DEFAULT_RETRIES if step.on_error == "retry" else 0),
        "timeout_seconds": step.timeout_seconds,
    }
    if step.kind == "agent":
        out["agent"] = step.ref or primary
    elif step.kind == "function":
        out["function"] = functions[step.ref].function if step.ref else step.function
        out["args"] = step.args
    else:
        out.update(options=step.options, reviewers=step.reviewers, on_timeout=step.on_timeout or "fail")
    return out


def runnable_diagnostics(plan: JSON) -> list[Diagnostic]:
    """Steps the runner of this build cannot execute (only in plans from elsewhere: every kind of the language runs)."""
    out: list[Diagnostic] = []
    for step in plan.get("steps") or []:
        path = f"workflow.steps[{step.get('index')}]"
        if step.get("kind") not in RUNNABLE_STEP_KINDS:
            out.append(
                diag(
                    "E_STEP_KIND_UNSUPPORTED",
                    f"{path}.kind",
                    f"step kind {step.get('kind')!r} is valid, but the runner does not execute it yet",
                    "use agent, function or human steps",
                )
            )
    return out
