"""Which step runs next, for every single-cursor workflow kind (pure: no I/O, no clock).

* ``sequential``: the steps in order.
* ``handoff``: the selector's ``sequence`` of participant ids, or ``round_robin`` over the participants for
  ``max_turns`` turns (default: one pass).
* ``group_chat``: every participant in declaration order, ``rounds`` times.
* ``graph``: from ``start``, the first edge of the finished node whose ``when`` holds on its output (edges without
  ``when`` are fallbacks, tried after the conditional ones) and whose ``max_traversals`` is not used up;
  ``max_iterations`` bounds the steps a run may execute. Every routing decision is a ``graph.edge_taken`` event.

A *turn* counts the steps a run has executed (its position in the run); command ids are per turn, so a node visited
twice (a graph loop, a second chat round) gets a fresh command.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from kneo_events.schemas import GraphEdgeTaken

JSON = dict[str, Any]
SINGLE_CURSOR_KINDS = frozenset({"sequential", "handoff", "group_chat", "graph"})


@dataclass(frozen=True)
class Route:
    """The step to run next (None: the workflow is done), the routing events, or why the run must fail."""

    next_index: int | None
    events: list[GraphEdgeTaken] = field(default_factory=list)
    error: str | None = None


def _index_of(plan: JSON) -> dict[str, int]:
    return {s["id"]: int(s["index"]) for s in plan["steps"]}


def order(plan: JSON) -> list[int] | None:
    """The fixed execution order of a non-graph workflow (step indexes), or None for a graph."""
    wf = plan["workflow"]
    kind = wf.get("kind", "sequential")
    steps = plan["steps"]
    if kind == "graph":
        return None
    if kind == "group_chat":
        return [s["index"] for _ in range(int(wf.get("rounds") or 1)) for s in steps]
    if kind == "handoff":
        selector = wf.get("selector") or {}
        ids = _index_of(plan)
        if selector.get("type") == "round_robin":
            turns = int(selector.get("max_turns") or len(steps))
            return [steps[t % len(steps)]["index"] for t in range(turns)]
        sequence = selector.get("sequence") or [s["id"] for s in steps]
        return [ids[i] for i in sequence]
    return [s["index"] for s in steps]


def first(plan: JSON) -> int:
    """The step index of turn 0."""
    fixed = order(plan)
    if fixed is not None:
        return fixed[0]
    return _index_of(plan)[plan["workflow"]["start"]]


def condition_holds(when: JSON | None, output: Any) -> bool:
    """Every test given in ``when`` holds on the output text (no ``when``: always)."""
    if not when:
        return True
    text = output if isinstance(output, str) else str(output)
    checks = {
        "contains": lambda v: v in text,
        "not_contains": lambda v: v not in text,
        "equals": lambda v: text.strip() == v,
        "matches": lambda v: re.search(v, text) is not None,
    }
    return all(checks[k](v) for k, v in when.items() if v is not None and k in checks)


def after(plan: JSON, state: JSON, step_index: int, turn: int, output: Any) -> Route:
    """Where the run goes once turn ``turn`` (step ``step_index``) finished with ``output``."""
    fixed = order(plan)
    if fixed is not None:
        return Route(fixed[turn + 1] if turn + 1 < len(fixed) else None)
    wf = plan["workflow"]
    node = plan["steps"][step_index]["id"]
    counts: JSON = state.get("edge_counts") or {}
    edges = [e for e in wf.get("edges") or [] if e["from"] == node]
    # conditional edges first, in declaration order, then the fallbacks
    for edge in [e for e in edges if e.get("when")] + [e for e in edges if not e.get("when")]:
        key = f"{edge['from']}->{edge['to']}"
        taken = int(counts.get(key, 0))
        limit = edge.get("max_traversals")
        if limit is not None and taken >= int(limit):
            continue
        if condition_holds(edge.get("when"), output):
            cap = wf.get("max_iterations")
            if cap is not None and turn + 1 >= int(cap):
                return Route(None, error=f"graph stopped: max_iterations {cap} reached at node {node!r}")
            event = GraphEdgeTaken(
                source=edge["from"], target=edge["to"], traversal=taken + 1, condition=edge.get("when"), turn=turn + 1
            )
            return Route(_index_of(plan)[edge["to"]], [event])
    return Route(None)  # no edge out: a terminal node
