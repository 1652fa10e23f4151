"""Structural checks of a schema-valid spec: ids, references, workflow shapes, graphs, selectors, providers."""

from __future__ import annotations

import re
from collections.abc import Iterator

from kneo_compiler.diagnostics import Diagnostic, diag
from kneo_compiler.models import KIND_FIELDS, Agent, Spec, Step, Workflow, canonical_kind

KNOWN_PROVIDERS = ("dummy", "openai", "anthropic")
IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*)?$")
STEP_REF = re.compile(r"\{steps\.([A-Za-z0-9_\-]+)\}")
ITEMS_FIELD = {"sequential": "steps", "graph": "nodes", "concurrent": "participants", "handoff": "participants"}


def items_field(kind: str) -> str:
    """Which list holds a workflow's units of work: ``steps``, ``nodes`` or ``participants``."""
    return ITEMS_FIELD.get(canonical_kind(kind), "participants")


def workflow_items(workflow: Workflow) -> list[Step]:
    """The steps, nodes or participants of a workflow, by its kind."""
    items: list[Step] = getattr(workflow, items_field(workflow.kind))
    return items


def agents_of(spec: Spec) -> Iterator[tuple[str, Agent]]:
    """Every agent with its path: the top-level agent, then the component agents."""
    if spec.agent is not None:
        yield "agent", spec.agent
    for key, agent in spec.components.agents.items():
        yield f"components.agents.{key}", agent


def check_structure(spec: Spec) -> list[Diagnostic]:
    """All structural diagnostics of a spec whose fields already have the right types."""
    out = _check_providers(spec)
    workflow = spec.workflow
    if workflow is None:
        return out
    kind = canonical_kind(workflow.kind)
    out += _check_kind_fields(workflow, kind)
    field = items_field(kind)
    items = workflow_items(workflow)
    if not items:
        out.append(diag("E_NO_STEPS", f"workflow.{field}", f"a {kind} workflow needs {field}", f"add `{field}:`"))
    out += _check_ids(items, field)
    for i, step in enumerate(items):
        out += _check_step(spec, step, f"workflow.{field}[{i}]")
    out += _check_prompt_refs(items, field, ordered=kind == "sequential")
    if kind == "graph":
        out += check_graph(workflow)
    elif kind == "handoff":
        out += _check_selector(workflow)
    elif kind == "group_chat" and workflow.rounds is not None and workflow.rounds < 1:
        out.append(
            diag("E_GROUP_CHAT_ROUNDS", "workflow.rounds", f"rounds is {workflow.rounds}; it must be at least 1")
        )
    elif kind == "concurrent" and workflow.aggregation and workflow.aggregation.kind == "function":
        if not workflow.aggregation.function:
            out.append(
                diag("E_STEP_FIELD_MISSING", "workflow.aggregation", "aggregation kind function needs `function`")
            )
    return out


def _check_providers(spec: Spec) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    for path, agent in agents_of(spec):
        if agent.model.provider not in KNOWN_PROVIDERS:
            out.append(
                diag(
                    "E_PROVIDER_UNAVAILABLE",
                    f"{path}.model.provider",
                    f"provider {agent.model.provider!r} is not available in this build",
                    f"use one of: {', '.join(KNOWN_PROVIDERS)}",
                )
            )
    return out


def _check_kind_fields(workflow: Workflow, kind: str) -> list[Diagnostic]:
    allowed = KIND_FIELDS.get(kind, set())
    foreign = set().union(*KIND_FIELDS.values()) - allowed
    return [
        diag(
            "E_UNKNOWN_FIELD",
            f"workflow.{name}",
            f"`{name}` is not used by a {kind} workflow",
            f"a {kind} workflow uses: {', '.join(sorted(allowed))}",
        )
        for name in sorted(foreign & workflow.model_fields_set)
    ]


def _check_ids(items: list[Step], field: str) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    seen: set[str] = set()
    for i, step in enumerate(items):
        if step.id in seen:
            out.append(diag("E_DUPLICATE_ID", f"workflow.{field}[{i}].id", f"duplicate id {step.id!r}", "rename it"))
        seen.add(step.id)
    return out


def _check_step(spec: Spec, step: Step, path: str) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    if step.kind == "agent":
        names = set(spec.components.agents) | ({spec.agent.name} if spec.agent else set())
        if step.ref is not None and step.ref not in names:
            out.append(
                diag(
                    "E_UNKNOWN_COMPONENT",
                    f"{path}.ref",
                    f"agent {step.ref!r} is not declared",
                    f"declare it under components.agents, or use one of: {', '.join(sorted(names)) or '(none)'}",
                )
            )
        elif step.ref is None and spec.agent is None:
            out.append(
                diag("E_STEP_FIELD_MISSING", f"{path}.ref", "an agent step needs `ref` when there is no `agent`")
            )
    elif step.kind == "function":
        if step.ref is not None and step.ref not in spec.components.functions:
            out.append(diag("E_UNKNOWN_COMPONENT", f"{path}.ref", f"function {step.ref!r} is not declared"))
        elif step.ref is None and not step.function:
            out.append(diag("E_STEP_FIELD_MISSING", path, "a function step needs `function` or `ref`"))
    elif not step.prompt:
        out.append(diag("E_STEP_FIELD_MISSING", f"{path}.prompt", "a human step needs a `prompt` for the reviewer"))
    if step.function is not None and not IMPORT_PATH.match(step.function):
        out.append(invalid_import(f"{path}.function", step.function))
    return out


def invalid_import(path: str, value: str) -> Diagnostic:
    """``E_INVALID_IMPORT_PATH`` for a malformed function path."""
    return diag(
        "E_INVALID_IMPORT_PATH",
        path,
        f"{value!r} is not an import path",
        "write `package.module:function`, e.g. examples.app_functions:web_search",
    )


def _check_prompt_refs(items: list[Step], field: str, ordered: bool) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    every = {s.id for s in items}
    earlier: set[str] = set()
    for i, step in enumerate(items):
        known = earlier if ordered else every - {step.id}
        for ref in STEP_REF.findall(step.prompt or ""):
            if ref not in known:
                out.append(
                    diag(
                        "W_PROMPT_UNKNOWN_REF",
                        f"workflow.{field}[{i}].prompt",
                        f"`{{steps.{ref}}}` names no {'earlier ' if ordered else ''}step; it stays as written",
                        f"use one of: {', '.join(sorted(known)) or '(none)'}",
                    )
                )
        earlier.add(step.id)
    return out


def _check_selector(workflow: Workflow) -> list[Diagnostic]:
    ids = {p.id for p in workflow.participants}
    selector = workflow.selector
    if selector is None:
        return []
    return [
        diag(
            "E_SELECTOR_UNKNOWN_PARTICIPANT",
            f"workflow.selector.sequence[{i}]",
            f"selector entry {entry!r} is not a participant id",
            f"use one of: {', '.join(sorted(ids))}",
        )
        for i, entry in enumerate(selector.sequence)
        if entry not in ids
    ]


def check_graph(workflow: Workflow) -> list[Diagnostic]:
    """Start node, edge ends, reachability, and loops (each needs an exit and a bound)."""
    nodes = [n.id for n in workflow.nodes]
    ids = set(nodes)
    out: list[Diagnostic] = []
    if not workflow.start:
        out.append(diag("E_GRAPH_START_MISSING", "workflow.start", "a graph workflow needs `start`", "name a node"))
    elif workflow.start not in ids:
        out.append(diag("E_GRAPH_START_UNKNOWN", "workflow.start", f"start node {workflow.start!r} is not a node"))
    adjacency: dict[str, list[str]] = {n: [] for n in ids}
    for i, edge in enumerate(workflow.edges):
        for end, name in (("from", edge.from_), ("to", edge.to)):
            if name not in ids:
                out.append(diag("E_GRAPH_EDGE_UNKNOWN_NODE", f"workflow.edges[{i}].{end}", f"no node {name!r}"))
        if edge.from_ in ids and edge.to in ids:
            adjacency[edge.from_].append(edge.to)
    if workflow.start in ids:
        reached = _reachable(adjacency, str(workflow.start))
        for i, node in enumerate(nodes):
            if node not in reached:
                out.append(
                    diag(
                        "E_GRAPH_UNREACHABLE_NODE",
                        f"workflow.nodes[{i}]",
                        f"node {node!r} cannot be reached from {workflow.start!r}",
                        "add an edge to it or remove it",
                    )
                )
    out += _check_loops(workflow, adjacency)
    return out


def _reachable(adjacency: dict[str, list[str]], start: str) -> set[str]:
    seen = {start}
    todo = [start]
    while todo:
        for nxt in adjacency[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def loops(adjacency: dict[str, list[str]]) -> list[set[str]]:
    """The strongly connected components that contain a cycle (a self-edge counts)."""
    reach = {n: _reachable(adjacency, n) for n in adjacency}
    found: list[set[str]] = []
    placed: set[str] = set()
    for node in sorted(adjacency):
        if node in placed:
            continue
        component = {m for m in reach[node] if node in reach[m]}
        placed |= component
        if len(component) > 1 or node in adjacency[node]:
            found.append(component)
    return found


def _check_loops(workflow: Workflow, adjacency: dict[str, list[str]]) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    for component in loops(adjacency):
        inner = [
            i
            for i, e in enumerate(workflow.edges)
            if e.from_ in component and e.to in component and e.from_ in adjacency
        ]
        path = f"workflow.edges[{inner[0]}]" if inner else "workflow.edges"
        names = ", ".join(sorted(component))
        if not any(e.from_ in component and e.to not in component for e in workflow.edges):
            out.append(
                diag(
                    "E_GRAPH_LOOP_NO_EXIT",
                    path,
                    f"the loop through {names} has no edge that leaves it",
                    "add a conditional edge out of the loop",
                )
            )
        bounded = workflow.max_iterations is not None or any(workflow.edges[i].max_traversals for i in inner)
        if not bounded:
            out.append(
                diag(
                    "E_GRAPH_LOOP_UNBOUNDED",
                    path,
                    f"the loop through {names} has no bound",
                    "set workflow.max_iterations or max_traversals on an edge of the loop",
                )
            )
    return out
