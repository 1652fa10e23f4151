"""Human-task timeouts fire on their own: fail → expired, continue → synthesized approval, escalate → stamped once;
also when the human service was down at the deadline; and the admin sweep."""

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
    - {id: approve, kind: human, prompt: "Approve? {steps.draft}", timeout_seconds: 0.3, on_timeout: %s}
    - {id: publish, kind: agent, prompt: "Publish {steps.draft}"}
"""


async def _until(http: httpx.AsyncClient, path: str, check: Any) -> dict[str, Any]:
    for _ in range(400):
        body = (await http.get(path)).json()
        if check(body):
            return body
        await asyncio.sleep(0.025)
    raise AssertionError(body)


async def test_each_on_timeout_branch_fires_by_itself(platform_factory: Any) -> None:
    p = await platform_factory(human_timer_interval_seconds=0.1)
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        runs = {}
        for branch in ("fail", "continue", "escalate"):
            runs[branch] = (await http.post("/v1/runs", json={"input": branch, "spec": SPEC % branch})).json()
            assert runs[branch]["status"] == "paused"
        failed = await _until(http, f"/v1/runs/{runs['fail']['run_id']}", lambda b: b["status"] != "paused")
        assert failed["status"] == "expired" and "timed out" in failed["error"]
        cont = await _until(http, f"/v1/runs/{runs['continue']['run_id']}", lambda b: b["status"] == "succeeded")
        assert cont["visited_steps"] == ["draft", "approve", "publish"]
        task = await _until(
            http, f"/v1/human-tasks/{runs['escalate']['continuation_id']}", lambda b: b["escalated_at"] is not None
        )
        assert task["status"] == "pending"
        stamped = task["escalated_at"]
        await asyncio.sleep(0.4)  # several timer passes later, the stamp has not moved: it fires once
        again = (await http.get(f"/v1/human-tasks/{runs['escalate']['continuation_id']}")).json()
        assert again["escalated_at"] == stamped
        run = (await http.get(f"/v1/runs/{runs['escalate']['run_id']}")).json()
        assert run["status"] == "paused"
        ok = await http.post(
            f"/v1/human-tasks/{task['continuation_id']}/resume",
            json={"request_id": task["request"]["request_id"], "decision": "approved"},
        )
        assert ok.status_code == 200
        await _until(http, f"/v1/runs/{runs['escalate']['run_id']}", lambda b: b["status"] == "succeeded")
        expired = (await http.get(f"/v1/human-tasks/{runs['fail']['continuation_id']}")).json()
        assert expired["status"] == "expired"
        events = (await http.get(f"/v1/runs/{runs['escalate']['run_id']}/events")).json()["events"]
        assert [e["type"] for e in events].count("human.escalated") == 1


async def test_a_deadline_missed_while_the_human_service_was_down_still_fires(platform_factory: Any) -> None:
    front = await platform_factory(("gateway", "compiler", "runner"))
    async with httpx.AsyncClient(base_url=front.url, timeout=30) as http:
        run = (await http.post("/v1/runs", json={"input": "x", "spec": SPEC % "fail"})).json()
        assert run["status"] == "paused"
        await asyncio.sleep(0.5)  # past the deadline, and no human service is running
        assert (await http.get(f"/v1/runs/{run['run_id']}")).json()["status"] == "paused"
        await platform_factory(("human",), human_timer_interval_seconds=0.1)
        final = await _until(http, f"/v1/runs/{run['run_id']}", lambda b: b["status"] != "paused")
    assert final["status"] == "expired"


async def test_the_admin_sweep(platform_factory: Any) -> None:
    p = await platform_factory(human_timer_interval_seconds=3600)  # the timer alone would not fire in time
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        run = (await http.post("/v1/runs", json={"input": "x", "spec": SPEC % "fail"})).json()
        await asyncio.sleep(0.4)
        swept = await http.post("/v1/human-tasks/sweep")
        assert swept.status_code == 200
        assert swept.json()["fired"] == [
            {"continuation_id": run["continuation_id"], "run_id": run["run_id"], "on_timeout": "fail"}
        ]
        assert (await http.post("/v1/human-tasks/sweep")).json()["count"] == 0
        assert (await http.get(f"/v1/runs/{run['run_id']}")).json()["status"] == "expired"
