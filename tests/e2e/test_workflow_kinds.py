"""Every single-cursor workflow kind runs end to end through the real bus and store: graph (conditional edges,
bounded loops, max_iterations), handoff, group chat, and function steps."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx


async def _run(platform: Any, **body: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    async with httpx.AsyncClient(base_url=platform.url, timeout=60) as http:
        resp = await http.post("/v1/runs", json={"input": "the auth middleware", **body})
        assert resp.status_code == 200, resp.text
        run = (await http.get(f"/v1/runs/{resp.json()['run_id']}")).json()
        events = (await http.get(f"/v1/runs/{run['run_id']}/events")).json()["events"]
    return run, events


def _edges(events: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    return [
        (e["data"]["source"], e["data"]["target"], e["data"]["traversal"])
        for e in events
        if e["type"] == "graph.edge_taken"
    ]


async def test_graph_example_routes_on_output(platform: Any) -> None:
    run, events = await _run(platform, spec_path="examples/graph_review_workflow.yaml")
    assert run["status"] == "succeeded" and run["workflow_kind"] == "graph"
    # the dummy reviewer never writes REVISE, so review falls back to finalize
    assert run["visited_steps"] == ["retrieve", "analyze", "review", "finalize"]
    assert _edges(events) == [("retrieve", "analyze", 1), ("analyze", "review", 1), ("review", "finalize", 1)]


LOOP = """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 1}}}
workflow:
  name: loop
  kind: graph
  start: draft
  max_iterations: %(cap)s
  nodes:
    - {id: draft, kind: agent, prompt: "Draft about {input}"}
    - {id: done, kind: agent, prompt: "Finish {steps.draft}"}
  edges:
    - {from: draft, to: draft, when: {contains: "On "}%(bound)s}
    - {from: draft, to: done, when: {contains: "ZZZ-never"}}
    - {from: draft, to: done}
"""


async def test_graph_loop_is_bounded_by_max_traversals(platform: Any) -> None:
    run, events = await _run(platform, spec=LOOP % {"cap": 20, "bound": ", max_traversals: 2"})
    assert run["status"] == "succeeded"
    assert run["visited_steps"] == ["draft", "draft", "draft", "done"]
    assert _edges(events) == [("draft", "draft", 1), ("draft", "draft", 2), ("draft", "done", 1)]
    commands = {e["data"]["command_id"] for e in events if e["type"] == "step.scheduled"}
    assert len(commands) == 4, "each visit of a node is its own command"


async def test_graph_max_iterations_stops_a_run(platform: Any) -> None:
    run, _ = await _run(platform, spec=LOOP % {"cap": 3, "bound": ""})
    assert run["status"] == "failed" and "max_iterations 3" in run["error"]
    assert run["visited_steps"] == ["draft", "draft", "draft"]


async def test_group_chat_example_runs_every_round(platform: Any) -> None:
    run, events = await _run(platform, spec_path="examples/group_chat_workflow.yaml")
    assert run["status"] == "succeeded"
    assert run["visited_steps"] == ["proponent", "skeptic", "pragmatist"] * 2
    outputs = [e["data"]["output"] for e in events if e["type"] == "step.completed"]
    assert len(set(outputs)) == 6, "each turn answers the previous one"
    assert outputs[1].startswith("On proponent said")


HANDOFF = """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 1}}}
workflow:
  name: pass-it-on
  kind: handoff
  participants:
    - {id: writer, kind: agent, prompt: "Write about {input}"}
    - {id: editor, kind: agent, prompt: "Edit {steps.writer}"}
  selector: {type: %s}
"""


async def test_handoff_follows_its_selector(platform: Any) -> None:
    seq, _ = await _run(platform, spec=HANDOFF % "sequence, sequence: [editor, writer]")
    assert seq["status"] == "succeeded" and seq["visited_steps"] == ["editor", "writer"]
    rr, _ = await _run(platform, spec=HANDOFF % "round_robin, max_turns: 3")
    assert rr["status"] == "succeeded" and rr["visited_steps"] == ["writer", "editor", "writer"]


FUNCTIONS = """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 1}}}
components:
  functions:
    shorten: {function: "examples.app_functions:summarize"}
workflow:
  name: fn
  kind: sequential
  steps:
    - {id: short, kind: function, function: shorten, args: {text: "{input}", max_words: 2}}
    - {id: broken, kind: function, function: "examples.app_functions:no_such_function", on_error: continue}
    - {id: say, kind: agent, prompt: "Say {steps.short}"}
"""


async def test_function_steps_call_python_and_failures_follow_on_error(platform: Any) -> None:
    run, events = await _run(platform, spec=FUNCTIONS)
    completed = {e["data"]["step_id"]: e["data"]["output"] for e in events if e["type"] == "step.completed"}
    failed = [e["data"] for e in events if e["type"] == "step.failed"]
    assert run["status"] == "succeeded", run
    assert completed["short"] == "the auth"
    assert failed and failed[0]["step_id"] == "broken" and "cannot import" in failed[0]["error"]
    assert completed["say"].startswith("On Say the auth")


async def test_concurrent_example_fans_out_and_aggregates(platform: Any) -> None:
    run, events = await _run(platform, spec_path="examples/concurrent_review_workflow.yaml")
    assert run["status"] == "succeeded" and run["workflow_kind"] == "concurrent"
    scheduled = [e for e in events if e["type"] == "step.scheduled"]
    assert [e["data"]["step_id"] for e in scheduled] == ["security", "accessibility", "performance"]
    assert len({e["version"] for e in scheduled}) == 3 and scheduled[0]["version"] == 3  # all at compile time
    assert sorted(run["visited_steps"]) == ["accessibility", "performance", "security"]
    # examples.app_functions:merge_reviews: one section per reviewer, in declaration order
    assert (
        run["output_text"].index("## security")
        < run["output_text"].index("## accessibility")
        < run["output_text"].index("## performance")
    )


FANOUT = """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 2}}}
components:
  agents:
    flaky: {name: flaky, model: {provider: dummy, params: {fail_attempts: 9}}}
workflow:
  name: fan
  kind: concurrent
  participants:
    - {id: one, kind: agent, prompt: "one {input}"}
    - {id: two, kind: agent, ref: flaky, prompt: "two {input}", on_error: %s}
    - {id: three, kind: agent, prompt: "three {input}"}
  aggregation: {kind: json}
"""


async def test_a_failed_branch_follows_its_on_error(platform: Any) -> None:
    cont, events = await _run(platform, spec=FANOUT % "continue")
    assert cont["status"] == "succeeded"
    import json

    assert sorted(json.loads(cont["output_text"])) == ["one", "three"]
    assert [e["data"]["step_id"] for e in events if e["type"] == "step.failed"] == ["two"]
    fail, _ = await _run(platform, spec=FANOUT % "fail")
    assert fail["status"] == "failed" and "branch two failed" in fail["error"]


ESCAPE = """
version: v1
agent: {name: a, model: {provider: dummy}}
workflow:
  name: escape
  kind: sequential
  steps:
    - {id: shell, kind: function, function: "asyncio.subprocess:create_subprocess_shell", args: {cmd: "touch /tmp/kneo-pwned"}}
"""


async def test_function_steps_only_import_allowed_packages(platform: Any) -> None:
    from pathlib import Path

    run, events = await _run(platform, spec=ESCAPE)
    assert run["status"] == "failed"
    failed = next(e["data"] for e in events if e["type"] == "step.failed")
    assert "not in KNEO_SERV_FUNCTION_PACKAGES" in failed["error"]
    assert not await asyncio.to_thread(Path("/tmp/kneo-pwned").exists)
