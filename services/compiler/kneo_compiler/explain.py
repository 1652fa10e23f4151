"""A readable account of what a compiled plan will do, step by step."""

from __future__ import annotations

from typing import Any

JSON = dict[str, Any]


def explain(plan: JSON) -> str:
    """Describe a plan in plain sentences (one line each)."""
    workflow = plan["workflow"]
    lines = [
        f"Spec {plan.get('spec_name') or '(unnamed)'} for environment {plan.get('environment') or '(base)'}, "
        f"plan {plan['hash']}.",
        f"Workflow {workflow['name']!r} is {_kind_sentence(workflow, len(plan['steps']))}",
    ]
    for agent in plan["agents"].values():
        lines.append(_agent_sentence(agent))
    for step in plan["steps"]:
        lines.append(f"  {step['index'] + 1}. {_step_sentence(step)}")
    if workflow["kind"] == "graph":
        lines += [f"  edge {_edge_sentence(e)}" for e in workflow["edges"]]
    return "\n".join(lines)


def _kind_sentence(workflow: JSON, count: int) -> str:
    kind = workflow["kind"]
    if kind == "sequential":
        return f"sequential: {count} steps run one after another, each seeing the outputs before it."
    if kind == "graph":
        bound = workflow.get("max_iterations")
        limit = f", at most {bound} node visits" if bound else ""
        return f"a graph of {count} nodes starting at {workflow['start']!r}{limit}; edges pick the next node."
    if kind == "concurrent":
        return f"concurrent: {count} participants get the same input at once; outputs are combined by " + (
            f"{workflow['aggregation']['kind']}."
        )
    if kind == "handoff":
        selector = workflow["selector"]
        order = " → ".join(selector["sequence"]) or "participants in order"
        return f"a handoff between {count} participants, selected by {selector['type']} ({order})."
    return f"a group chat of {count} participants over {workflow['rounds']} round(s), in declaration order."


def _agent_sentence(agent: JSON) -> str:
    model = agent["model"]
    tools = ", ".join(t["id"] for t in agent["tools"]) or "no tools"
    guards = agent["guardrails"]
    guard_text = f"guardrails in:{len(guards['input'])} out:{len(guards['output'])}"
    memory = agent["memory"]["kind"] if agent["memory"] else "default memory"
    return f"Agent {agent['id']!r} uses {model['provider']}/{model['name']} with {tools}; {memory}; {guard_text}."


def _step_sentence(step: JSON) -> str:
    retry = {
        "fail": "a failure fails the run",
        "continue": "a failure is recorded and the run continues",
        "retry": f"a failure is retried up to {step['max_retries']} times",
    }[step["on_error"]]
    timeout = f", timeout {step['timeout_seconds']}s" if step.get("timeout_seconds") else ""
    if step["kind"] == "agent":
        what = (
            f"{step['id']}: agent {step['agent']!r} answers {step['prompt']!r}"
            if step["prompt"]
            else (f"{step['id']}: agent {step['agent']!r} answers the previous output")
        )
    elif step["kind"] == "function":
        what = f"{step['id']}: calls {step['function']}"
    else:
        reviewers = ", ".join(step["reviewers"]) or "any reviewer"
        return (
            f"{step['id']}: pauses for a human ({reviewers}) on {step['prompt']!r}{timeout}; "
            f"on timeout: {step['on_timeout']}."
        )
    return f"{what}{timeout}; {retry}."


def _edge_sentence(edge: JSON) -> str:
    when = edge.get("when")
    cond = " if " + ", ".join(f"output {k} {v!r}" for k, v in when.items()) if when else " otherwise"
    bound = f" (at most {edge['max_traversals']} times)" if edge.get("max_traversals") else ""
    return f"{edge['from']} → {edge['to']}{cond}{bound}"
