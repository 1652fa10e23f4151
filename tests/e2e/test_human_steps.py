"""Human steps on the runner's side: the run pauses with its request, and continues once a decision is recorded
(the human service's resume route records decisions; here the test plays that part through the same kernel)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from kneo_events.ids import run_stream
from kneo_events.schemas import HumanDecided, new_event, resume_human_command


async def _decide(platform: Any, run_id: str, decision: str, content: str | None = None) -> None:
    kernel = platform.kernel
    state = await kernel.store.get_run(run_id)
    request = state["metadata"]["pending_human_request"]
    event = HumanDecided(
        continuation_id=request["continuation_id"],
        request_id=request["request_id"],
        decision=decision,
        content=content,
        reviewer="release-manager",
    )
    await kernel.commit(
        run_stream(run_id),
        [new_event(event, {"actor": "release-manager"})],
        state["version"],
        prior_state=state,
        commands=[resume_human_command(run_id, run_stream(run_id), request["continuation_id"], {})],
    )


async def _terminal(platform: Any, run_id: str) -> dict[str, Any]:
    for _ in range(500):
        state = await platform.kernel.store.get_run(run_id)
        if state["status"] in ("succeeded", "failed", "cancelled"):
            return state
        await asyncio.sleep(0.02)
    raise AssertionError(f"run stuck in {state['status']}")


async def test_human_approval_pauses_then_continues_to_publish(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        resp = await http.post(
            "/v1/runs", json={"input": "quarterly numbers", "spec_path": "examples/human_approval_workflow.yaml"}
        )
        body = resp.json()
        assert resp.status_code == 200 and body["status"] == "paused"
        assert body["human_intervention_required"] is True
        assert body["continuation_id"].startswith("cont_")
        pending = body["metadata"]["pending_human_request"]
        assert pending["request_id"].startswith("req_") and pending["prompt"].startswith("Approve the draft?")
        assert pending["deadline_epoch"] > 0 and pending["options"] == ["approve", "reject"]
        await _decide(platform, body["run_id"], "approved", "Looks good. Ship it.")
        final = await _terminal(platform, body["run_id"])
        events = (await http.get(f"/v1/runs/{body['run_id']}/events")).json()["events"]
    assert final["status"] == "succeeded", final
    assert final["visited_steps"] == ["draft", "approval", "publish"]
    types = [e["type"] for e in events]
    assert types.index("human.requested") < types.index("human.decided") < types.index("run.succeeded")
    assert "pending_human_request" not in final["metadata"]


async def test_rejection_fails_the_run_with_the_reason_and_paused_runs_cancel(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        first = (
            await http.post("/v1/runs", json={"input": "x", "spec_path": "examples/human_approval_workflow.yaml"})
        ).json()
        await _decide(platform, first["run_id"], "rejected", "numbers are wrong")
        rejected = await _terminal(platform, first["run_id"])
        assert rejected["status"] == "failed" and "numbers are wrong" in rejected["error"]
        second = (
            await http.post("/v1/runs", json={"input": "y", "spec_path": "examples/human_approval_workflow.yaml"})
        ).json()
        cancelled = await http.post(f"/v1/runs/{second['run_id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
