"""Every decision type does what DECISIONS says; timeouts fire once with several human services and across a
restart of the human service; the smoke example pauses and resumes."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

SPEC = """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 1}}}
workflow:
  name: w
  kind: sequential
  steps:
    - {id: draft, kind: agent, prompt: "Draft {input}"}
    - {id: review, kind: human, prompt: "Review {steps.draft}", options: [ship, hold]}
    - {id: publish, kind: function, function: "examples.human_functions:publish_report", args: {text: "{steps.review}"}}
"""
TIMED = """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 1}}}
workflow:
  name: w
  kind: sequential
  steps:
    - {id: draft, kind: agent, prompt: "Draft {input}"}
    - {id: approve, kind: human, prompt: "Approve?", timeout_seconds: %s, on_timeout: %s}
    - {id: publish, kind: agent, prompt: "Publish {steps.draft}"}
"""


async def _until(http: httpx.AsyncClient, path: str, check: Any) -> dict[str, Any]:
    for _ in range(400):
        body = (await http.get(path)).json()
        if check(body):
            return body
        await asyncio.sleep(0.025)
    raise AssertionError(body)


async def _decide(http: httpx.AsyncClient, decision: str, **extra: Any) -> dict[str, Any]:
    run = (await http.post("/v1/runs", json={"input": decision, "spec": SPEC})).json()
    assert run["status"] == "paused", run
    rid = run["metadata"]["pending_human_request"]["request_id"]
    resp = await http.post(
        f"/v1/human-tasks/{run['continuation_id']}/resume",
        json={"request_id": rid, "decision": decision, **extra},
    )
    assert resp.status_code == 200, resp.text
    final = await _until(http, f"/v1/runs/{run['run_id']}", lambda b: b["status"] not in ("paused", "running"))
    events = (await http.get(f"/v1/runs/{run['run_id']}/events")).json()["events"]
    final["outputs"] = {e["data"]["step_id"]: e["data"]["output"] for e in events if e["type"] == "step.completed"}
    return final


async def test_each_decision_type(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        approved = await _decide(http, "approved")
        assert approved["status"] == "succeeded"
        assert approved["outputs"]["review"] == approved["outputs"]["draft"]  # passed on
        edited = await _decide(http, "edited", content="a better draft")
        assert edited["outputs"]["review"] == "a better draft"
        assert edited["output_text"] == "published (14 characters) to reports/latest.md"  # the next step used it
        provided = await _decide(http, "provided", content="facts the model lacked")
        assert provided["outputs"]["review"] == "facts the model lacked"
        selected = await _decide(http, "selected", selected_option="hold")
        assert selected["outputs"]["review"] == "hold"
        rejected = await _decide(http, "rejected", content="not accurate")
        assert rejected["status"] == "failed" and "not accurate" in rejected["error"]
        assert "publish" not in rejected["outputs"]


async def test_timeouts_fire_once_with_two_human_services(platform_factory: Any) -> None:
    p = await platform_factory(human_timer_interval_seconds=0.05)
    await platform_factory(("human",), human_timer_interval_seconds=0.05)  # a second copy racing the first
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        runs = {
            branch: (await http.post("/v1/runs", json={"input": branch, "spec": TIMED % (0.3, branch)})).json()
            for branch in ("fail", "continue", "escalate")
        }
        await _until(http, f"/v1/runs/{runs['fail']['run_id']}", lambda b: b["status"] == "expired")
        await _until(http, f"/v1/runs/{runs['continue']['run_id']}", lambda b: b["status"] == "succeeded")
        await _until(
            http, f"/v1/human-tasks/{runs['escalate']['continuation_id']}", lambda b: b["escalated_at"] is not None
        )
        await asyncio.sleep(0.3)  # many passes of both copies later
        counts = {}
        for branch, run in runs.items():
            types = [e["type"] for e in (await http.get(f"/v1/runs/{run['run_id']}/events")).json()["events"]]
            counts[branch] = {t: types.count(t) for t in types if t.startswith("human.") or t == "run.expired"}
    assert counts["fail"] == {"human.requested": 1, "human.expired": 1, "run.expired": 1}
    assert counts["continue"] == {"human.requested": 1, "human.continued": 1, "human.decided": 1}
    assert counts["escalate"] == {"human.requested": 1, "human.escalated": 1}


async def test_a_restarted_human_service_fires_a_deadline_that_passed_while_it_was_down(
    platform_factory: Any,
) -> None:
    front = await platform_factory(("gateway", "compiler", "runner"))
    human = await platform_factory(("human",), human_timer_interval_seconds=0.05)
    async with httpx.AsyncClient(base_url=front.url, timeout=30) as http:
        run = (await http.post("/v1/runs", json={"input": "x", "spec": TIMED % (1.0, "continue")})).json()
        assert run["status"] == "paused"
        human.stop.set()  # the human service goes down before the deadline …
        await asyncio.sleep(1.2)  # … and the deadline passes
        assert (await http.get(f"/v1/runs/{run['run_id']}")).json()["status"] == "paused"
        await platform_factory(("human",), human_timer_interval_seconds=0.05)  # back up
        final = await _until(http, f"/v1/runs/{run['run_id']}", lambda b: b["status"] == "succeeded")
    assert final["visited_steps"] == ["draft", "approve", "publish"]


async def test_the_smoke_example_pauses_and_resumes(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        run = (
            await http.post("/v1/runs", json={"input": "smoke", "spec_path": "examples/smoke_human_workflow.yaml"})
        ).json()
        assert run["status"] == "paused" and run["metadata"]["pending_human_request"]["options"] == [
            "approve",
            "reject",
        ]
        rid = run["metadata"]["pending_human_request"]["request_id"]
        resp = await http.post(
            f"/v1/continuations/{run['continuation_id']}/resume",
            json={"request_id": rid, "decision": "selected", "selected_option": "approve"},
        )
        assert resp.status_code == 200
        final = await _until(http, f"/v1/runs/{run['run_id']}", lambda b: b["status"] == "succeeded")
    assert final["output_text"] == "approve" and final["visited_steps"] == ["answer", "approve"]
